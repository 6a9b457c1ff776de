"""res10 SSD face detector: preprocess, forward (ONNX Runtime or OpenCV dnn), decode, filter, NMS → list[Face].

Both backends return cv2.dnn's DetectionOutput rows (image_id, label, score, x1, y1, x2, y2 in [0, 1]).
cv2.dnn runs the whole Caffe net; ONNX Runtime runs the backbone and heads converted by engines.ssd_to_onnx,
and the PriorBox and DetectionOutput layers are done here in numpy from the parameters in the model's metadata.
The door loop scans whole frames only now and then and follows each face in a small crop between (detect_near).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edge.config import DetectorConfig
from edge.errors import ModelError
from edge.types import Box, Face, iou

log = logging.getLogger(__name__)

INPUT_SIZE_PX = 300
# Per-channel BGR means the res10 model was trained with (OpenCV's face_detector sample).
MEAN_BGR = (104.0, 177.0, 123.0)
PROTOTXT = "deploy.prototxt"
CAFFEMODEL = "res10_300x300_ssd_iter_140000.caffemodel"
ONNX_FILE = "res10_300x300_ssd_iter_140000.onnx"  # made from the two above by `make models`
INT8_ONNX_FILE = "res10_300x300_ssd_iter_140000.int8.onnx"  # ONNX_FILE quantised by `make models` (engines.ssd_int8)
METADATA_KEY = "ssd_postprocess"  # where engines.ssd_to_onnx stores the PriorBox / DetectionOutput parameters
ROW_WIDTH = 7
PHOTO_PRECISION = "fp32"  # see FaceDetector.detect
TILE_SCALE = 2  # thorough search: tiles of 2 × max_side_px, each downscaled by 2 instead of by the whole photo
TILE_OVERLAP = 0.25  # so that a face cut by one tile's edge lies whole in its neighbour
# Following a face (detect_near): the SSD sees a square crop FOLLOW_CROP_SCALE times the face's longer side, centred on
# where it was, at FOLLOW_INPUT_PX square: the face fills about a third of the input whatever its size in the frame.
FOLLOW_CROP_SCALE = 3.0
FOLLOW_INPUT_PX = 128


class FaceDetector:
    """Finds faces in a BGR image; boxes come back in the input image's pixel coordinates, largest first."""

    def __init__(self, *, models_dir: Path, config: DetectorConfig | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.config = config or DetectorConfig()
        self._ssd: dict[str, OpenCVSSD | OnnxRuntimeSSD] = {}  # by precision, each opened when first needed
        self.last_whole = True  # whether the latest detect_near had to scan the whole image
        self.following: list[Box] = []  # the boxes the latest detect_near says to follow next (see there)

    @property
    def backend(self) -> str:
        """The runtime camera frames go through ("onnxruntime" or "opencv"); opens the model."""
        return self._load(self.config.precision).name

    def _load(self, precision: str) -> OpenCVSSD | OnnxRuntimeSSD:
        if precision not in self._ssd:
            self._ssd[precision] = open_ssd(self.models_dir, self.config.backend, precision, self.config.threads)
        return self._ssd[precision]

    def detect(self, image: np.ndarray, *, thorough: bool = False) -> list[Face]:
        """All faces passing the score, geometry and size filters (empty list when none).

        The SSD sees the whole image at 300×300, so in a large photo a face narrower than ~5 % of its longest
        side is missed. With `thorough` (photos, not camera frames), an image with no face found that way is
        searched again in overlapping tiles of TILE_SCALE × max_side_px, each seen at the usual scale.
        A camera frame (not `thorough`) goes through the `precision` model (int8 by default) at up to
        300·max_input_aspect × 300 (see input_size). Photos, where enrolment templates and the accuracy figures come
        from, keep the fp32 model at 300×300: the wider input found 2 false faces in 88 test photos and no new one,
        and int8 boxes of small faces are a few pixels less exact.
        """
        if thorough:
            faces = self._detect_whole(image, PHOTO_PRECISION, 1.0)
            if faces or max(image.shape[:2]) <= TILE_SCALE * self.config.max_side_px:
                return faces
            return self._detect_tiled(image)
        return self._detect_whole(image, self.config.precision, self.config.max_input_aspect)

    def detect_near(self, image: np.ndarray, boxes: Sequence[Box]) -> list[Face]:
        """The faces of a camera frame, looked for only near `boxes` (the faces followed from the previous frame):
        each in its own crop (follow_crop), the face found there that overlaps it most taken as where it went. If any
        of them is not found there, or `boxes` is empty, the whole frame is scanned as `detect` does instead;
        `last_whole` says which happened. A face new to the frame is therefore found only by a whole scan (the door
        loop runs one every detector.scan_every_s). `following` holds the boxes to follow in the next frame: a face
        re-found narrower than min_face_px is not returned but still followed (it is there, only too small yet).
        A crop costs a fraction of the whole frame (128 × 128 against 360 × 300 px) and sees a small face larger
        than the whole frame's squashed copy does, so it misses fewer of them."""
        seen = []
        for box in boxes:
            face = self._refind(image, box)
            if face is None:  # lost: the whole scan below looks for every face anyway
                break
            seen.append(face)
        else:
            if seen:
                self.last_whole, self.following = False, [f.box for f in merge(seen, self.config)]
                return merge([f for f in seen if f.width_px >= self.config.min_face_px], self.config)
        found = self.detect(image)
        self.last_whole, self.following = True, [f.box for f in found]
        return found

    def _refind(self, image: np.ndarray, box: Box) -> Face | None:
        """The face in box's crop that overlaps box most, of any width (None when no face there overlaps it)."""
        height, width = image.shape[:2]
        input_w, input_h = input_size(height, width, self.config.max_input_aspect)
        left, top, right, bottom = follow_crop(box, width, height, (input_w / width, input_h / height))
        blob = cv2.dnn.blobFromImage(image[top:bottom, left:right], 1.0, (FOLLOW_INPUT_PX, FOLLOW_INPUT_PX), MEAN_BGR,
                                     swapRB=False, crop=False)
        raw = self._load(self.config.precision).rows(blob, min_score=self.config.confidence)
        faces = [Face(box=(f.box[0] + left, f.box[1] + top, f.box[2] + left, f.box[3] + top), score=f.score)
                 for f in decode(raw, right - left, bottom - top, self.config, min_face_px=0)]
        overlaps = [iou(f.box, box) for f in faces]
        return max(zip(overlaps, faces), key=lambda of: of[0])[1] if any(o > 0 for o in overlaps) else None

    def _detect_whole(self, image: np.ndarray, precision: str, max_aspect: float) -> list[Face]:
        height, width = image.shape[:2]
        blob = preprocess(image, self.config.max_side_px, max_aspect)
        raw = self._load(precision).rows(blob, min_score=self.config.confidence)
        return decode(raw, width, height, self.config)

    def _detect_tiled(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        side = TILE_SCALE * self.config.max_side_px
        step = int(side * (1 - TILE_OVERLAP))
        found: list[Face] = []
        for top in range(0, max(height - side, 0) + step, step):
            for left in range(0, max(width - side, 0) + step, step):
                tile = image[top : top + side, left : left + side]
                found += [
                    Face(box=(f.box[0] + left, f.box[1] + top, f.box[2] + left, f.box[3] + top), score=f.score)
                    for f in self._detect_whole(tile, PHOTO_PRECISION, 1.0)
                ]
        return merge(found, self.config)


def follow_crop(box: Box, width: int, height: int, squash_xy: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the crop in which a followed face is looked for. `squash_xy` is how the whole
    frame is scaled on its way into the SSD (x, y); the crop is squashed the same way (it reaches the SSD square), so
    a face's box has the same shape whether found by a whole scan or followed. In the SSD's view the crop is
    FOLLOW_CROP_SCALE × the face's longer side, centred on it; it is moved (not cut) to lie inside the image and cut
    only where the image is smaller."""
    side = FOLLOW_CROP_SCALE * max((box[2] - box[0]) * squash_xy[0], (box[3] - box[1]) * squash_xy[1])
    crop_w, crop_h = min(round(side / squash_xy[0]), width), min(round(side / squash_xy[1]), height)
    left = min(max(round((box[0] + box[2] - crop_w) / 2), 0), width - crop_w)
    top = min(max(round((box[1] + box[3] - crop_h) / 2), 0), height - crop_h)
    return left, top, left + crop_w, top + crop_h


def input_size(height: int, width: int, max_aspect: float = 1.0) -> tuple[int, int]:
    """(width, height) of the SSD input for an image: 300 px on the short side, the long side following the image's
    aspect up to max_aspect × 300. The fully convolutional net was trained on 300×300 squashes; a 16:9 camera frame
    squashed to 400×300 instead keeps more horizontal detail (sample video at 640 px: faces in 86 frames, not 79)."""
    long_px = round(INPUT_SIZE_PX * min(max(height, width) / min(height, width), max_aspect))
    return (long_px, INPUT_SIZE_PX) if width >= height else (INPUT_SIZE_PX, long_px)


def preprocess(image: np.ndarray, max_side_px: int, max_aspect: float = 1.0) -> np.ndarray:
    """BGR image → (1, 3, H, W) float32 blob minus the training means (downscaled first when larger); H × W is
    300 × 300, or up to 300 × 300·max_aspect for a wide image (see input_size)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side_px / max(height, width))
    small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    size = input_size(height, width, max_aspect)
    return cv2.dnn.blobFromImage(small, 1.0, size, MEAN_BGR, swapRB=False, crop=False)


def open_ssd(models_dir: Path, backend: str, precision: str, threads: int) -> OpenCVSSD | OnnxRuntimeSSD:
    """The configured runtime. ONNX Runtime runs the int8 or the fp32 model; `auto` takes the first converted
    model present (int8, then fp32, each step down logged), else OpenCV dnn (always the Caffe fp32 model)."""
    wanted = [INT8_ONNX_FILE, ONNX_FILE] if precision == "int8" else [ONNX_FILE]
    paths = [Path(models_dir) / name for name in wanted]
    if backend == "onnxruntime":
        return OnnxRuntimeSSD(onnx_path=paths[0], threads=threads)
    if backend == "auto":
        for path in paths:
            if path.exists():
                return OnnxRuntimeSSD(onnx_path=path, threads=threads)
            log.warning("detector_fallback missing=%s fix='make models'", path)
    return OpenCVSSD(models_dir=Path(models_dir))


class OpenCVSSD:
    """The Caffe model in cv2.dnn, DetectionOutput included."""

    name = "opencv"

    def __init__(self, *, models_dir: Path) -> None:
        proto, weights = models_dir / PROTOTXT, models_dir / CAFFEMODEL
        if not (proto.exists() and weights.exists()):
            raise ModelError(f"detector model missing in {models_dir}: run `make models`")
        self._net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))

    def rows(self, blob: np.ndarray, min_score: float = 0.0) -> np.ndarray:
        """DetectionOutput rows for a (1, 3, H, W) blob; min_score is left to decode() here."""
        self._net.setInput(blob)
        return self._net.forward()[0, 0]


class OnnxRuntimeSSD:
    """The converted backbone in ONNX Runtime, then PriorBox + DetectionOutput in numpy."""

    name = "onnxruntime"

    def __init__(self, *, onnx_path: Path, threads: int) -> None:
        from edge.backends.onnxruntime import cpu_session

        if not onnx_path.exists():
            raise ModelError(f"detector model {onnx_path} missing: run `make models`")
        self.path = onnx_path
        self._session = cpu_session(onnx_path, threads)
        try:
            params = json.loads(self._session.get_modelmeta().custom_metadata_map[METADATA_KEY])
            self._heads, self._detection = params["priors"], params["detection"]
        except (KeyError, ValueError, TypeError):
            raise ModelError(f"{onnx_path} lacks the SSD metadata: delete it and run `make models`") from None
        self._input = self._session.get_inputs()[0].name
        self._priors: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, blob: np.ndarray, min_score: float = 0.0) -> np.ndarray:
        """DetectionOutput rows for a (1, 3, H, W) blob, leaving out scores below min_score (a speed-up only:
        greedy NMS never lets a lower score suppress a higher one, so the rows above it are unchanged)."""
        loc, conf, grids = self._session.run(None, {self._input: blob})
        key = (tuple(grids.tolist()), blob.shape[2], blob.shape[3])
        if key not in self._priors:
            self._priors[key] = prior_boxes(self._heads, key[0], image_hw=key[1:])
        priors, variances = self._priors[key]
        scores = conf.reshape(len(priors), -1)
        return detection_output(loc.reshape(-1, 4), scores, priors, variances, self._detection, min_score)


def prior_boxes(heads: list[dict], grids: Sequence[int], image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Caffe SSD's PriorBox layers, concatenated: (P, 4) boxes (x1, y1, x2, y2 normalised) and (P, 4) variances.
    `grids` is (rows, cols) of each head's feature map; boxes run row, column, then box shape (OpenCV's order)."""
    image_h, image_w = image_hw
    boxes, variances = [], []
    for head, rows, cols in zip(heads, grids[0::2], grids[1::2]):
        step_y = head["step_px"] or image_h / rows
        step_x = head["step_px"] or image_w / cols
        sizes = np.asarray(head["sizes_px"], dtype=np.float32)  # (K, 2) width, height
        cy = ((np.arange(rows, dtype=np.float32) + head["offset"]) * np.float32(step_y))[:, None, None]
        cx = ((np.arange(cols, dtype=np.float32) + head["offset"]) * np.float32(step_x))[None, :, None]
        half_w, half_h = sizes[:, 0] * np.float32(0.5), sizes[:, 1] * np.float32(0.5)
        corners = np.stack(
            np.broadcast_arrays((cx - half_w) / image_w, (cy - half_h) / image_h, (cx + half_w) / image_w,
                                (cy + half_h) / image_h),
            axis=-1,
        ).reshape(-1, 4)
        boxes.append(corners.clip(0, 1) if head["clip"] else corners)
        variances.append(np.broadcast_to(np.asarray(head["variance"], dtype=np.float32), corners.shape))
    return np.concatenate(boxes).astype(np.float32), np.concatenate(variances).astype(np.float32)


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Caffe's CENTER_SIZE decoding (variances kept in the priors): offsets (P, 4) → boxes (P, 4) x1, y1, x2, y2."""
    prior_wh = priors[:, 2:] - priors[:, :2]
    prior_center = priors[:, :2] + prior_wh * np.float32(0.5)
    center = variances[:, :2] * loc[:, :2] * prior_wh + prior_center
    half = np.exp(variances[:, 2:] * loc[:, 2:]) * prior_wh * np.float32(0.5)
    return np.concatenate([center - half, center + half], axis=1)


def nms_keep(boxes: np.ndarray, threshold: float, limit: int) -> np.ndarray:
    """Greedy NMS over boxes sorted by score (best first): indices kept, at most `limit`. A box is kept when its
    IoU with every kept box is at most threshold (Caffe's ApplyNMSFast with eta 1)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inter_w = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    inter_h = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    inter = np.where((inter_w > 0) & (inter_h > 0), inter_w * inter_h, 0)
    iou = inter / np.maximum(areas[:, None] + areas[None, :] - inter, np.finfo(np.float32).tiny)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        suppressed |= iou[i] > threshold
    return np.asarray(keep, dtype=np.int64)


def detection_output(
    loc: np.ndarray, scores: np.ndarray, priors: np.ndarray, variances: np.ndarray, params: dict, min_score: float = 0.0
) -> np.ndarray:
    """Caffe SSD's DetectionOutput as cv2.dnn runs it: per class (background skipped) the top_k scores above the
    threshold, greedy NMS, then the keep_top_k best over all classes; rows sorted by score, best first."""
    threshold = params["confidence_threshold"]
    classes = [c for c in range(params["num_classes"]) if c != params["background_label_id"]]
    top_k = params["top_k"] if params["top_k"] > 0 else len(priors)
    keep_top_k = params["keep_top_k"] if params["keep_top_k"] > -1 else len(priors) * len(classes)
    limit = keep_top_k if len(classes) == 1 else len(priors)
    found = []
    for label in classes:
        candidates = np.flatnonzero((scores[:, label] > threshold) & (scores[:, label] >= min_score))
        order = candidates[np.argsort(-scores[candidates, label], kind="stable")][:top_k]
        boxes = decode_boxes(loc[order], priors[order], variances[order])
        if params["clip"]:
            boxes = boxes.clip(0, 1)
        kept = nms_keep(boxes, params["nms_threshold"], limit)
        rows = np.zeros((len(kept), ROW_WIDTH), dtype=np.float32)
        rows[:, 1], rows[:, 2], rows[:, 3:] = label, scores[order[kept], label], boxes[kept]
        found.append(rows)
    rows = np.concatenate(found) if found else np.zeros((0, ROW_WIDTH), np.float32)
    return rows[np.argsort(-rows[:, 2], kind="stable")][:keep_top_k]


def decode(raw: np.ndarray, width: int, height: int, config: DetectorConfig, *, min_face_px: int | None = None) -> list[Face]:
    """SSD rows (_, _, score, x1, y1, x2, y2 in [0, 1]) → filtered, clipped, NMS-merged faces, largest first; faces
    narrower than min_face_px (config.min_face_px unless given) are left out."""
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
    keep_size = (boxes[:, 2] - boxes[:, 0]) >= (config.min_face_px if min_face_px is None else min_face_px)
    return merge([Face(box=tuple(float(v) for v in b), score=float(s)) for b, s in zip(boxes[keep_size], scores[keep_size])],
                 config)


def merge(faces: list[Face], config: DetectorConfig) -> list[Face]:
    """Overlapping boxes of one face merged by NMS (the best score wins), largest face first."""
    if not faces:
        return []
    xywh = [[f.box[0], f.box[1], f.width_px, f.height_px] for f in faces]
    keep = np.asarray(cv2.dnn.NMSBoxes(xywh, [f.score for f in faces], config.confidence, config.nms_iou)).reshape(-1)
    return sorted((faces[i] for i in keep), key=lambda f: f.area_px, reverse=True)
