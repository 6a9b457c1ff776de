"""Fit the SSD-box → shape-predictor-box mapping used by edge.landmarks.predictor_boxes.

dlib's 5-point predictor was trained on boxes from dlib's HOG detector, which are square and sit lower and
tighter on the face than res10 SSD boxes. This pairs SSD and HOG detections of the same faces (IoU ≥ 0.3)
on real photos and fits, by median (robust to odd pairs), the HOG box's centre offset as a fraction of the SSD box's
width/height and its side as a fraction of the SSD box's geometric-mean side √(w·h) (the least
spread of w, h, √(w·h) and (w+h)/2 on these pairs). Dev-only: needs dlib. Usage: python bench/fit_box_mapping.py DATA_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.config import DetectorConfig  # noqa: E402
from edge.detect import FaceDetector  # noqa: E402
from edge.images import load_image  # noqa: E402
from engines.fetch import default_models_dir  # noqa: E402

MAX_SIDE_PX = 1200  # HOG is slow on big photos; both detectors see the same downscaled image


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def paired_boxes(data_dir: Path):
    import cv2
    import dlib

    hog = dlib.get_frontal_face_detector()
    ssd = FaceDetector(models_dir=default_models_dir(), config=DetectorConfig(min_face_px=20))
    photos = sorted(data_dir.glob("pairs/*.jpg")) + sorted(data_dir.glob("people/**/*.jp*g")) + sorted(data_dir.glob("stills/*.jpg"))
    for path in photos:
        image = load_image(path)
        scale = min(1.0, MAX_SIDE_PX / max(image.shape[:2]))
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
        rgb = np.ascontiguousarray(image[..., ::-1])
        hog_boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(rgb, 1)]
        for face in ssd.detect(image):
            best = max(hog_boxes, key=lambda h: iou(face.box, h), default=None)
            if best is not None and iou(face.box, best) >= 0.3:
                yield face.box, best


def fit(pairs) -> dict[str, float]:
    s = np.array([p[0] for p in pairs], float)
    h = np.array([p[1] for p in pairs], float)
    sw, sh = s[:, 2] - s[:, 0], s[:, 3] - s[:, 1]
    scx, scy = (s[:, 0] + s[:, 2]) / 2, (s[:, 1] + s[:, 3]) / 2
    hw, hh = h[:, 2] - h[:, 0], h[:, 3] - h[:, 1]
    hcx, hcy = (h[:, 0] + h[:, 2]) / 2, (h[:, 1] + h[:, 3]) / 2
    return {
        "n_pairs": len(s),
        "dx_per_w": float(np.median((hcx - scx) / sw)),
        "dy_per_h": float(np.median((hcy - scy) / sh)),
        "side_per_sqrt_wh": float(np.median(hw / np.sqrt(sw * sh))),
        "hog_aspect": float(np.median(hh / hw)),
    }


if __name__ == "__main__":
    result = fit(list(paired_boxes(Path(sys.argv[1]))))
    for key, value in result.items():
        print(f"{key} = {value:.4f}" if isinstance(value, float) else f"{key} = {value}")
