"""res10 SSD face detector (OpenCV dnn, Caffe model): preprocess, forward, decode, filter, NMS → list[Face]."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.config import DetectorConfig
from edge.errors import ModelError
from edge.types import Face

INPUT_SIZE_PX = 300
# Per-channel BGR means the res10 model was trained with (OpenCV's face_detector sample).
MEAN_BGR = (104.0, 177.0, 123.0)
PROTOTXT = "deploy.prototxt"
CAFFEMODEL = "res10_300x300_ssd_iter_140000.caffemodel"


class FaceDetector:
    """Finds faces in a BGR image; boxes come back in the input image's pixel coordinates, largest first."""

    def __init__(self, *, models_dir: Path, config: DetectorConfig | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.config = config or DetectorConfig()
        self._net = None

    def _load(self) -> cv2.dnn.Net:
        if self._net is None:
            proto, weights = self.models_dir / PROTOTXT, self.models_dir / CAFFEMODEL
            if not (proto.exists() and weights.exists()):
                raise ModelError(f"detector model missing in {self.models_dir}: run `make models`")
            self._net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
        return self._net

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces passing the score, geometry and size filters (empty list when none)."""
        height, width = image.shape[:2]
        scale = min(1.0, self.config.max_side_px / max(height, width))
        small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        blob = cv2.dnn.blobFromImage(small, 1.0, (INPUT_SIZE_PX, INPUT_SIZE_PX), MEAN_BGR, swapRB=False, crop=False)
        net = self._load()
        net.setInput(blob)
        raw = net.forward()[0, 0]
        return decode(raw, width, height, self.config)


def decode(raw: np.ndarray, width: int, height: int, config: DetectorConfig) -> list[Face]:
    """SSD rows (_, _, score, x1, y1, x2, y2 in [0, 1]) → filtered, clipped, NMS-merged faces, largest first."""
    rows = raw[raw[:, 2] >= config.confidence]
    if len(rows) == 0:
        return []
    scores = rows[:, 2].astype(np.float32)
    x1, y1, x2, y2 = (rows[:, i] for i in range(3, 7))
    bw, bh = x2 - x1, y2 - y1
    ok = (bw > 0) & (bh > 0)
    # The res10 SSD often emits a spurious box running off the image: reject boxes that overhang the edges
    # by more than a fraction of their own size, or whose shape is not face-like (in pixels).
    over = config.max_overhang
    ok &= (x1 > -over * bw) & (y1 > -over * bh) & (x2 < 1 + over * bw) & (y2 < 1 + over * bh)
    aspect = (bh * height) / np.maximum(bw * width, 1e-6)
    ok &= (aspect < config.max_aspect) & (aspect > 1.0 / config.max_aspect)
    boxes = np.stack([x1 * width, y1 * height, x2 * width, y2 * height], axis=1)[ok]
    scores = scores[ok]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height - 1)
    keep_size = (boxes[:, 2] - boxes[:, 0]) >= config.min_face_px
    boxes, scores = boxes[keep_size], scores[keep_size]
    if len(boxes) == 0:
        return []
    xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes]
    keep = np.asarray(cv2.dnn.NMSBoxes(xywh, scores.tolist(), config.confidence, config.nms_iou)).reshape(-1)
    faces = [Face(box=tuple(float(v) for v in boxes[i]), score=float(scores[i])) for i in keep]
    return sorted(faces, key=lambda f: f.area_px, reverse=True)
