"""The embedding pass every evaluation shares: which face of a photo counts, each distinct image once, workers.

A photo may show several faces. The product's rule (enrolment, identify, the door) takes the largest; LFW labels
the face in the middle of the picture, so evaluations on LFW can take the one nearest the image centre instead.
"""
from __future__ import annotations

import math
import multiprocessing
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edge.config import Config
from edge.console import positive_int
from edge.errors import InputError

PROGRESS_STEPS = 20  # non-interactive stderr gets about this many progress lines
FACE_RULE_HELP = {"largest": "the largest face: the product's rule at the door",
                  "centre": "the face nearest the image centre: LFW's labelled subject"}

Embeddings = dict[Path, "np.ndarray | None"]


def detected_faces(pipeline, path: Path) -> tuple[list, tuple[int, ...]]:
    """(EmbeddedFaces, image shape) of a photo, searched as photos are (thorough), loaded under the configured size cap."""
    from edge.images import load_image

    image = load_image(path, max_megapixels=pipeline.config.images.max_megapixels)
    return pipeline.analyze(image, thorough=True), image.shape


def pick_face(faces: list, shape: tuple[int, ...], rule: str):
    """The face a FACE_RULES rule takes from `faces` (None when there is none)."""
    if not faces:
        return None
    if rule == "largest":
        return max(faces, key=lambda f: f.face.area_px)
    return min(faces, key=lambda f: _offset_from_centre(f.face.box, shape))


def _offset_from_centre(box, shape) -> float:
    return math.hypot((box[0] + box[2] - shape[1]) / 2, (box[1] + box[3] - shape[0]) / 2)


def largest_face(pipeline, path: Path):
    """The largest face in the image (EmbeddedFace: chip and embedding); None when there is no face."""
    return pick_face(*detected_faces(pipeline, path), "largest")


def centre_face(pipeline, path: Path):
    """The face whose box centre is nearest the image centre (LFW's subject); None when there is no face."""
    return pick_face(*detected_faces(pipeline, path), "centre")


def largest_face_embedding(pipeline, path: Path) -> np.ndarray | None:
    """Unit embedding of the largest face in the image, None when there is no face."""
    face = largest_face(pipeline, path)
    return face.embedding if face is not None else None


def centre_face_embedding(pipeline, path: Path) -> np.ndarray | None:
    """Unit embedding of the face nearest the image centre, None when there is no face."""
    face = centre_face(pipeline, path)
    return face.embedding if face is not None else None


FACE_RULES = {"largest": largest_face_embedding, "centre": centre_face_embedding}
_worker_pipeline = None
_worker_measure: Callable | None = None


def _start_worker(config: Config, measure: Callable) -> None:
    global _worker_pipeline, _worker_measure
    from edge.pipeline import Pipeline

    _worker_pipeline, _worker_measure = Pipeline(config), measure


def _measure_in_worker(path: Path):
    return _worker_measure(_worker_pipeline, path)


def embed_images(paths: Iterable[Path], config: Config, *, workers: int = 1,
                 progress: Callable[[int, int], None] | None = None,
                 measure: Callable = largest_face_embedding) -> Embeddings:
    """`measure(pipeline, path)` of every distinct path (default: the largest face's embedding, None without a face);
    `workers` > 1 spreads them over processes (`measure` must then be a module-level function)."""
    unique = list(dict.fromkeys(paths))
    missing = [p for p in unique if not Path(p).is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(unique)} images not found, first {missing[0]} (check IMAGES_ROOT)")
    if workers <= 1:
        from edge.pipeline import Pipeline

        pipeline = Pipeline(config)
        try:
            return _collect(unique, (measure(pipeline, p) for p in unique), progress)
        finally:
            pipeline.close()
    # spawn: a fresh interpreter per worker, so no inference-runtime threads are inherited through fork
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker,
                                                   initargs=(config, measure)) as pool:
        return _collect(unique, pool.imap(_measure_in_worker, unique), progress)


def _collect(paths: list[Path], results: Iterable, progress) -> Embeddings:
    embeddings = {}
    for done, (path, embedding) in enumerate(zip(paths, results), 1):
        embeddings[path] = embedding
        if progress:
            progress(done, len(paths))
    return embeddings


def stderr_progress() -> Callable[[int, int], None]:
    """`eval: 37/62 images` on stderr: rewritten in place on a terminal, about PROGRESS_STEPS lines otherwise."""
    interactive = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if interactive:
            print(f"\reval: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % math.ceil(total / PROGRESS_STEPS) == 0:
            print(f"eval: {done}/{total} images", file=sys.stderr)

    return report


def add_workers_argument(parser) -> None:
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="embed with N processes, each with its own models (default 1)")


def add_face_argument(parser, default: str) -> None:
    """--face largest|centre, with this command's default."""
    choices = "; ".join(f"{rule}: {FACE_RULE_HELP[rule]}" for rule in FACE_RULES)
    parser.add_argument("--face", choices=tuple(FACE_RULES), default=default,
                        help=f"which face of a photo with several counts ({choices}; default {default})")
