"""The recognition chain for one image: detect → landmarks → align → embed (the kiosk adds match/decide/door)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.align import align_chip
from edge.config import Config
from edge.detect import FaceDetector
from edge.embed import CHIP_PX, Embedder, create_embedder
from edge.landmarks import LandmarkPredictor, predictor_boxes
from edge.types import Box, EmbeddedFace, Face

LANDMARKS_FILE = "shape_predictor_5_face_landmarks.npz"


class Pipeline:
    """Owns the three models; `last_ms` holds the per-stage milliseconds since the latest detect (for bench/logs)."""

    def __init__(self, config: Config, *, embedder: Embedder | None = None) -> None:
        self.config = config
        models_dir = config.resolved_models_dir()
        self.detector = FaceDetector(models_dir=models_dir, config=config.detector)
        self.landmarks = LandmarkPredictor(npz_path=Path(models_dir) / LANDMARKS_FILE)
        self.embedder = embedder or create_embedder(config.embedder, models_dir)
        self.last_ms: dict[str, float] = {}

    def _tick(self, stage: str, start: float) -> float:
        """Add the time since `start` to `stage` (a stage run twice since detect, as landmarks for the embedding and
        for the blink cue, counts both); returns now."""
        now = time.perf_counter()
        self.last_ms[stage] = self.last_ms.get(stage, 0.0) + (now - start) * 1e3
        return now

    def detect(self, image: np.ndarray, *, thorough: bool = False, near: Sequence[Box] | None = None) -> list[Face]:
        """Face boxes without landmarks, largest first (the door loop asks for landmarks only where it embeds).
        With `near` (a camera frame, the boxes of the faces followed from the previous frame), see
        FaceDetector.detect_near."""
        self.last_ms = {}
        start = time.perf_counter()
        found = self.detector.detect(image, thorough=thorough) if near is None else self.detector.detect_near(image, near)
        self._tick("detect", start)
        return found

    def add_landmarks(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """The faces with their 5-point landmarks (predicted where missing)."""
        start = time.perf_counter()
        missing = [i for i, f in enumerate(faces) if f.landmarks is None]
        if missing:
            points = self.landmarks.predict(image, predictor_boxes(np.array([faces[i].box for i in missing])))
            faces = list(faces)
            for i, p in zip(missing, points):
                faces[i] = Face(box=faces[i].box, score=faces[i].score, landmarks=p)
        self._tick("landmarks", start)
        return faces

    def locate(self, image: np.ndarray, *, thorough: bool = False) -> list[Face]:
        """Faces with 5-point landmarks, largest first; `thorough` for photos (see FaceDetector.detect)."""
        return self.add_landmarks(image, self.detect(image, thorough=thorough))

    def embed_faces(self, image: np.ndarray, faces: list[Face]) -> list[EmbeddedFace]:
        """Aligned chips and unit embeddings (landmarks predicted first for faces without them)."""
        faces = self.add_landmarks(image, faces)
        start = time.perf_counter()
        chips = np.stack([align_chip(image, f.landmarks, size_px=CHIP_PX) for f in faces]) if faces else np.zeros(
            (0, CHIP_PX, CHIP_PX, 3), np.uint8
        )
        start = self._tick("align", start)
        vectors = self.embedder.embed(chips)
        self._tick("embed", start)
        return [EmbeddedFace(face=f, chip=c, embedding=v) for f, c, v in zip(faces, chips, vectors)]

    def analyze(self, image: np.ndarray, *, thorough: bool = False) -> list[EmbeddedFace]:
        """Every face in the image, embedded; empty list when there is none."""
        return self.embed_faces(image, self.locate(image, thorough=thorough))

    def close(self) -> None:
        self.embedder.close()
