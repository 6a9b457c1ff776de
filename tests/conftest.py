"""Shared fixtures: where the models and the development data live, and dlib when it is installed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
SAMPLE_VIDEO_FRAMES = 105
MODEL_FILES = (
    "deploy.prototxt",
    "res10_300x300_ssd_iter_140000.caffemodel",
    "dlib_face_recognition_resnet_model_v1.onnx",
    "shape_predictor_5_face_landmarks.npz",
    "res10_300x300_ssd_iter_140000.onnx",
)
SHARED_DATA = Path(os.environ.get("EDGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


class WholeFrames:
    """The `detector` of a pipeline double: every frame counts as scanned whole, and no face is followed into the next
    (so the door loop asks for whole frames only)."""

    last_whole = True
    following: list = []


class AnalyzeFake:
    """Base of pipeline doubles that define `analyze(image)` → EmbeddedFaces: serves the door loop's two phases
    (`detect`, then `embed_faces` for the faces the loop chose to embed) from it and counts the faces embedded."""

    embedded = 0
    detector = WholeFrames()

    def detect(self, image, near=None):
        self._analyzed = self.analyze(image)
        return [f.face for f in self._analyzed]

    def embed_faces(self, image, faces):
        self.embedded += len(faces)
        return [next(e for e in self._analyzed if e.face is face) for face in faces]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The models folder filled by `make models`; tests need the real models, so a missing one is an error."""
    from engines.fetch import default_models_dir

    path = default_models_dir()
    missing = [name for name in MODEL_FILES if not (path / name).exists()]
    if missing:
        pytest.fail(f"models missing in {path} ({', '.join(missing)}): run `make models` first")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Development photos and video (../shared/data); tests that need them skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dlib():
    """dlib (dev dependency `dlib-bin`) for parity tests: they skip, not fail, without it."""
    return pytest.importorskip("dlib")


CLI_TIMEOUT_S = 120


def cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line (`python -m edge …`), as a user runs it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


WAIT_S = 3.0
POLL_S = 0.01


def wait_until(predicate, timeout_s: float = WAIT_S) -> bool:
    """Poll a condition instead of sleeping a fixed time: True as soon as it holds, False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def sigterm_when_ready(child: subprocess.Popen, ready, timeout_s: float) -> tuple[str, str]:
    """Call ready() (it asserts that the moment has come), send SIGTERM, return the child's (stdout, stderr);
    the child is killed rather than left behind if anything fails."""
    try:
        ready()
        child.send_signal(signal.SIGTERM)
        return child.communicate(timeout=timeout_s)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def untrusted_text(max_size: int = 200):
    """A hypothesis strategy for text a hostile user may type or name a folder: any code point (control, format
    such as zero-width and bidi overrides, lone surrogates, private use, unassigned, line separators), very long
    runs, path and markup characters, and the known troublemakers."""
    from hypothesis import strategies as st

    every_code_point = st.characters(exclude_categories=())
    return st.one_of(
        st.text(every_code_point, max_size=max_size),
        st.text(st.sampled_from("aZ /\\.:<>&\"'%$`*?|;-_~é\u0301\u00a0\u3000\t\n"), min_size=1, max_size=80),
        st.sampled_from(["AC/DC", "../../etc/passwd", "\u202eamabo", "Obama\u200b", "Ob\u00a0ama", "a\nb", "x" * 65,
                         "\U0001f600" * 64, "\ud800", "<script>alert(1)</script>", "deadbeef0123", "NUL\x00"]),
    )


@pytest.fixture(scope="session")
def pair_chips(models_dir, data_dir) -> tuple[list, dict]:
    """pairs/master.csv and, for each of its photos, the chip of its largest face found as `eval-pairs` finds it."""
    from edge.config import Config, EmbedderConfig
    from edge.evaluate.embedding import largest_face
    from edge.evaluate.pairs import read_pairs_csv
    from edge.pipeline import Pipeline

    pairs = read_pairs_csv(data_dir / "pairs" / "master.csv")
    pipeline = Pipeline(Config(models_dir=models_dir, embedder=EmbedderConfig(backend="onnxruntime")))
    chips = {}
    try:
        for path in dict.fromkeys(p for pair in pairs for p in (pair.path_a, pair.path_b)):
            face = largest_face(pipeline, path)
            assert face is not None, f"no face in {path}"
            chips[path] = face.chip
    finally:
        pipeline.close()
    return pairs, chips


def pairs_accuracy(backend, pair_chips, onnx_sha: str) -> float:
    """Accuracy on master.csv at the default threshold with this backend behind the product's Embedder
    (unit vectors, mirror averaging, batches of 8), from the chips of `pair_chips`."""
    import numpy as np

    from edge.config import Config
    from edge.embed import Embedder
    from edge.evaluate.pairs import pair_distances
    from edge.evaluate.rates import accuracy_at

    pairs, chips = pair_chips
    paths = list(chips)
    vectors = Embedder(backend, onnx_sha256=onnx_sha).embed(np.stack([chips[p] for p in paths]))
    distances = pair_distances(pairs, dict(zip(paths, vectors)))
    return accuracy_at(distances, np.array([pair.same for pair in pairs]), Config().match.threshold_l2)


@pytest.fixture(scope="session")
def video_frames_640() -> list:
    """Every frame of the bundled sample video, resized to 640 px wide as the door loop's camera delivers them."""
    import cv2

    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    images = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        height, width = frame.shape[:2]
        size = (640, round(height * 640 / width))
        images.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
    capture.release()
    assert len(images) == SAMPLE_VIDEO_FRAMES, f"could not read {SAMPLE_VIDEO}"
    return images
