"""Degradation suite: does an embedding configuration still separate people on small, blurred, dark or badly
compressed faces? Re-runs a pairs set on degraded copies and reports accuracy, ROC AUC and d′ per variant for
raw descriptors, unit vectors and unit + mirror averaging (and face_recognition, measured in the same run).

`python -m edge bench degrade --pairs master.csv --root DIR` prints the table the README quotes.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edge.align import mirror_chip
from edge.config import Config
from edge.console import say
from edge.embed import unit
from edge.evaluate.pairs import Pair, pair_distances
from edge.evaluate.rates import accuracy_at, d_prime, roc_auc
from edge.images import load_image

SMALL_FACE_PX = 40  # "downscaled": the largest face ends up about this wide
BLUR_SIGMA_PER_FACE = 1 / 40  # Gaussian σ as a fraction of the face width (σ = 4 px on a 160-px face)
DARK_GAMMA = 2.5
DARK_NOISE_SIGMA = 8.0
JPEG_QUALITY = 20
NOISE_SEED = 0
RAW_THRESHOLD_L2 = 0.6  # dlib's / face_recognition's threshold for raw (not unit) descriptors
CONFIGURATIONS = ("raw", "unit", "unit+mirror")
DEFAULT_CONFIGURATION = "unit+mirror"


def downscale(image: np.ndarray, face_px: float) -> np.ndarray:
    scale = min(1.0, SMALL_FACE_PX / face_px)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def blur(image: np.ndarray, face_px: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), max(0.5, face_px * BLUR_SIGMA_PER_FACE))


def darken(image: np.ndarray, face_px: float) -> np.ndarray:
    """Under-exposure: gamma on the normalised intensities, then sensor-like Gaussian noise (seeded)."""
    dark = 255.0 * (image / 255.0) ** DARK_GAMMA
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, DARK_NOISE_SIGMA, image.shape)
    return np.clip(dark + noise, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, face_px: float) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


VARIANTS: dict[str, Callable[[np.ndarray, float], np.ndarray] | None] = {
    "clean": None, "small": downscale, "blur": blur, "dark": darken, f"jpeg{JPEG_QUALITY}": jpeg,
}


def embed_variants(pipeline, path: Path, variants) -> dict[str, dict[str, np.ndarray] | None]:
    """Per variant: raw, unit and unit+mirror embeddings of the largest face (None: no face found)."""
    image = load_image(path)
    clean = pipeline.analyze(image)
    face_px = clean[0].face.width_px if clean else float(max(image.shape[:2]))
    out = {}
    for name in variants:
        degrade = VARIANTS[name]
        faces = clean if degrade is None else pipeline.analyze(degrade(image, face_px))
        if not faces:
            out[name] = None
            continue
        chip = faces[0].chip[None]
        raw = pipeline.embedder.embed_raw(np.concatenate([chip, mirror_chip(chip)]))
        both = unit(raw)
        out[name] = {"raw": raw[0], "unit": both[0], "unit+mirror": unit((both[0] + both[1])[None])[0]}
    return out


def face_recognition_variants(path: Path, variants) -> dict[str, np.ndarray | None]:
    """face_recognition (HOG + encode, raw descriptors) on the same degraded copies."""
    import face_recognition

    image = load_image(path)
    rgb = np.ascontiguousarray(image[..., ::-1])
    boxes = face_recognition.face_locations(rgb)
    face_px = max((b[1] - b[3] for b in boxes), default=max(image.shape[:2]))
    out = {}
    for name in variants:
        degrade = VARIANTS[name]
        degraded = rgb if degrade is None else np.ascontiguousarray(degrade(image, face_px)[..., ::-1])
        found = face_recognition.face_locations(degraded)
        if not found:
            out[name] = None
            continue
        largest = max(found, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
        out[name] = face_recognition.face_encodings(degraded, [largest])[0]
    return out


def scores(distances: np.ndarray, same: np.ndarray, threshold_l2: float) -> dict:
    return {
        "accuracy": round(accuracy_at(distances, same, threshold_l2), 4),
        "auc": round(roc_auc(distances, same), 4),
        "d_prime": round(d_prime(distances, same), 3),
    }


def recommend_threshold(clean: np.ndarray, pooled: np.ndarray, same_clean: np.ndarray, same_pooled: np.ndarray,
                        *, min_clean_accuracy: float) -> dict:
    """The threshold with the best accuracy over clean + degraded pairs among those with no false accept on the
    clean pairs (a door must not open for a stranger photographed well) and clean accuracy at least
    `min_clean_accuracy` (the reference stack's: we must not do worse on good photos)."""
    limit = float(clean[~same_clean].min())
    candidates = np.unique(np.round(pooled[np.isfinite(pooled) & (pooled < limit)], 3))
    candidates = [t for t in candidates if round(accuracy_at(clean, same_clean, t), 4) >= min_clean_accuracy]
    if not candidates:
        raise ValueError("no threshold keeps the clean pairs free of false accepts at the required accuracy")
    best = max(candidates, key=lambda t: (accuracy_at(pooled, same_pooled, t), -t))
    impostors, genuine = pooled[~same_pooled], pooled[same_pooled]
    return {
        "threshold_l2": float(best),
        "accuracy_all_variants": round(accuracy_at(pooled, same_pooled, best), 4),
        "false_accepts": int((impostors < best).sum()), "impostor_pairs": len(impostors),
        "false_rejects": int((genuine >= best).sum()), "genuine_pairs": len(genuine),
        "clean_accuracy": round(accuracy_at(clean, same_clean, best), 4),
        "clean_impostor_min_l2": round(limit, 4),
    }


def run_suite(pairs: list[Pair], config: Config, *, reference: bool, variants=tuple(VARIANTS)) -> tuple[list[dict], dict]:
    """Rows of {variant, configuration, threshold_l2, accuracy, auc, d_prime, images_without_face}, and the
    threshold recommended for the shipped configuration (unit + mirror) from all variants pooled."""
    from edge.pipeline import Pipeline

    pipeline = Pipeline(config)
    paths = sorted({p.path_a for p in pairs} | {p.path_b for p in pairs})
    ours, theirs = {}, {}
    for i, path in enumerate(paths, 1):
        say(f"degrade: {i}/{len(paths)} images")
        ours[path] = embed_variants(pipeline, path, variants)
        if reference:
            theirs[path] = face_recognition_variants(path, variants)
    same = np.array([p.same for p in pairs])
    rows, default_distances = [], {}

    def add_row(variant: str, configuration: str, threshold: float, per_image: dict) -> np.ndarray:
        distances = pair_distances(pairs, per_image)
        rows.append({"variant": variant, "configuration": configuration, "threshold_l2": threshold,
                     **scores(distances, same, threshold), "images_without_face": sum(v is None for v in per_image.values())})
        return distances

    for variant in variants:
        if reference:
            add_row(variant, "face_recognition", RAW_THRESHOLD_L2, {p: theirs[p][variant] for p in paths})
        for configuration in CONFIGURATIONS:
            threshold = RAW_THRESHOLD_L2 if configuration == "raw" else config.match.threshold_l2
            per_image = {p: None if ours[p][variant] is None else ours[p][variant][configuration] for p in paths}
            distances = add_row(variant, configuration, threshold, per_image)
            if configuration == DEFAULT_CONFIGURATION:
                default_distances[variant] = distances
    pooled = np.concatenate(list(default_distances.values()))
    reference_row = next(r for r in rows if r["variant"] == "clean" and r["configuration"] in ("face_recognition", "raw"))
    recommendation = recommend_threshold(default_distances["clean"], pooled, same, np.tile(same, len(variants)),
                                         min_clean_accuracy=reference_row["accuracy"])
    return rows, recommendation


def format_rows(rows: list[dict]) -> str:
    lines = ["| variant | configuration | threshold | accuracy | AUC | d′ | no face |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['configuration']} | {r['threshold_l2']} | {100 * r['accuracy']:.2f} % | "
                     f"{r['auc']:.4f} | {r['d_prime']:.2f} | {r['images_without_face']} |")
    return "\n".join(lines)
