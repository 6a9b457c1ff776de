"""How well does the unknown-face inbox group faces by person, and how fast? Measured on an identity-labelled folder.

Embeds every photo of DIR/<Name>/*.jpg once (cached in out/, keyed by the model fingerprint), then groups them with
each candidate method over a range of thresholds and prints pairwise precision/recall/F1 and BCubed
precision/recall/F1 against the true names, and the time to group N faces (median of several runs).
Usage: python bench/cluster_unknown.py [--photos ../shared/data/lfw_dev] [--faces 1000] [--workers 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.config import Config, UnknownConfig  # noqa: E402
from edge.embed import store_fingerprint  # noqa: E402
from edge.evaluate.embedding import embed_images, stderr_progress  # noqa: E402
from edge.images import photos_by_person  # noqa: E402
from edge.unknown import GROUPING_METHODS, group_faces  # noqa: E402

TIMING_RUNS = 5
GROUP_L2 = UnknownConfig().group_l2
THRESHOLDS_L2 = (0.30, 0.33, 0.34, 0.35, 0.36, 0.37, 0.38, 0.40, 0.44, 0.48)


def cached_embeddings(folder: Path, config: Config, workers: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings, integer labels) of every photo with a face; computed once and kept in `cache`."""
    fingerprint = store_fingerprint(config)
    if cache.exists():
        data = np.load(cache)
        if str(data["fingerprint"]) == fingerprint and str(data["folder"]) == str(folder.resolve()):
            return data["embeddings"], data["labels"]
    people = photos_by_person(folder)
    paths = [p for photos in people.values() for p in photos]
    owner = {p: i for i, photos in enumerate(people.values()) for p in photos}
    found = embed_images(paths, config, workers=workers, progress=stderr_progress())
    kept = [p for p in paths if found[p] is not None]
    print(f"{len(paths) - len(kept)} of {len(paths)} photos without a face", file=sys.stderr)
    embeddings = np.stack([found[p] for p in kept]).astype(np.float32)
    labels = np.array([owner[p] for p in kept])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=embeddings, labels=labels, fingerprint=fingerprint, folder=str(folder.resolve()))
    return embeddings, labels


def pairwise_scores(truth: np.ndarray, found: np.ndarray) -> tuple[float, float, float]:
    """Precision/recall/F1 over all pairs of faces: a pair is positive when both are in one group."""
    def same_pairs(labels: np.ndarray) -> int:
        counts = np.unique(labels, return_counts=True)[1]
        return int((counts * (counts - 1) // 2).sum())

    both = same_pairs(truth.astype(np.int64) * (found.max() + 1) + found)
    precision = both / max(same_pairs(found), 1)
    recall = both / max(same_pairs(truth), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def bcubed_scores(truth: np.ndarray, found: np.ndarray) -> tuple[float, float, float]:
    """BCubed precision/recall/F1 (Amigó et al. 2009): per face, the share of its group that is its person and back."""
    joint = truth.astype(np.int64) * (found.max() + 1) + found
    _, joint_inverse, joint_counts = np.unique(joint, return_inverse=True, return_counts=True)
    _, found_inverse, found_counts = np.unique(found, return_inverse=True, return_counts=True)
    _, truth_inverse, truth_counts = np.unique(truth, return_inverse=True, return_counts=True)
    shared = joint_counts[joint_inverse]
    precision = float(np.mean(shared / found_counts[found_inverse]))
    recall = float(np.mean(shared / truth_counts[truth_inverse]))
    return precision, recall, 2 * precision * recall / (precision + recall)


def chinese_whispers(embeddings: np.ndarray, threshold_l2: float) -> np.ndarray | None:
    """dlib's chinese_whispers_clustering (what face_recognition's examples use), for reference; None without dlib."""
    try:
        import dlib
    except ImportError:
        return None
    vectors = [dlib.vector(row.astype(np.float64).tolist()) for row in embeddings]
    return np.array(dlib.chinese_whispers_clustering(vectors, threshold_l2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "lfw_dev")
    parser.add_argument("--faces", type=int, default=1000, help="group this many faces for the timing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "cluster_unknown_embeddings.npz")
    args = parser.parse_args()
    embeddings, labels = cached_embeddings(args.photos, Config(), args.workers, args.cache)
    print(f"{len(embeddings)} faces of {len(np.unique(labels))} people")
    print(f"{'method':<18} {'t_l2':>5} {'groups':>6} {'pair P':>7} {'pair R':>7} {'pair F':>7} {'B3 P':>6} {'B3 R':>6} {'B3 F':>6}")
    methods = {name: (lambda e, t, m=name: group_faces(e, t, method=m)) for name in GROUPING_METHODS}
    methods["chinese-whispers"] = chinese_whispers
    for name, group in methods.items():
        for threshold in THRESHOLDS_L2:
            found = group(embeddings, threshold)
            if found is None:
                break
            pair, bcubed = pairwise_scores(labels, found), bcubed_scores(labels, found)
            print(f"{name:<18} {threshold:>5.2f} {len(np.unique(found)):>6} "
                  + " ".join(f"{v:>7.4f}" for v in pair) + " " + " ".join(f"{v:>6.4f}" for v in bcubed))
    rng = np.random.default_rng(0)
    sample = embeddings[rng.choice(len(embeddings), size=min(args.faces, len(embeddings)), replace=False)]
    for name, group in methods.items():
        times = []
        for _ in range(TIMING_RUNS):
            started = time.perf_counter()
            if group(sample, GROUP_L2) is None:
                break
            times.append(time.perf_counter() - started)
        if times:
            print(f"grouping {len(sample)} faces with {name}: median {statistics.median(times) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
