"""Error-rate maths, pure (arrays in, numbers out): accuracy, cross-validated thresholds, VAL/FRR at a FAR, AUC, d′.

Every metric follows the product's rule: a pair is accepted ("same person") when the L2 distance between the unit
embeddings is strictly below the threshold. A distance of +inf (an image without a face) is always a rejection.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_FOLDS = 10


def split_distances(distances, same) -> tuple[np.ndarray, np.ndarray]:
    """Sorted genuine and impostor distances."""
    d, s = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    if d.shape != s.shape or d.ndim != 1:
        raise ValueError(f"distances and same must be 1-D of equal length, got {d.shape} and {s.shape}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    return np.sort(d[s]), np.sort(d[~s])


def labelled(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distances, same) from separate genuine and impostor distances: the inverse of split_distances."""
    same = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
    return np.concatenate([genuine, impostor]), same


def _below(sorted_values: np.ndarray, thresholds) -> np.ndarray:
    """How many values are strictly below each threshold (= accepted under `distance < threshold`)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def accuracy_at(distances, same, threshold: float) -> float:
    """Fraction of pairs decided right by `distance < threshold` ⇔ same person."""
    genuine, impostor = split_distances(distances, same)
    correct = _below(genuine, threshold) + len(impostor) - _below(impostor, threshold)
    return float(correct / (len(genuine) + len(impostor)))


def best_threshold(distances, same) -> float:
    """The threshold maximising accuracy among the midpoints between sorted distinct finite distances.

    Ties go to the smallest (strictest) one; with a single distinct distance, just above it.
    """
    genuine, impostor = split_distances(distances, same)
    values = np.unique(np.concatenate([genuine, impostor]))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise ValueError("no finite distance to place a threshold between")
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else np.nextafter(values, np.inf)
    correct = _below(genuine, candidates) + len(impostor) - _below(impostor, candidates)
    return float(candidates[int(np.argmax(correct))])


def ten_fold_accuracy(distances, same, folds: int | Sequence[int] = DEFAULT_FOLDS) -> tuple[float, float, list[float]]:
    """Cross-validated accuracy: per fold, the best threshold on the other folds, accuracy on this one.

    `folds` is either the fold of every pair (LFW files give them by position) or a number k: then pair i (in the
    order given, i.e. file order) goes to fold i % k, a deterministic split. Returns mean, standard deviation
    (population, ddof 0) of the per-fold accuracies and the per-fold thresholds.
    """
    d, s = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    if isinstance(folds, int) and len(d) < folds:
        raise ValueError(f"{len(d)} pairs cannot fill {folds} folds")
    labels = np.arange(len(d)) % folds if isinstance(folds, int) else np.asarray(folds)
    if labels.shape != d.shape:
        raise ValueError(f"{len(labels)} fold labels for {len(d)} pairs")
    fold_ids = np.unique(labels)
    if len(fold_ids) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {len(fold_ids)}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = labels == fold
        threshold = best_threshold(d[~test], s[~test])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(d[test], s[test], threshold))
    return float(np.mean(accuracies)), float(np.std(accuracies)), thresholds


def far_resolves(far: float, impostors: int) -> bool:
    """Whether `impostors` trials can show a false-accept rate as small as `far` (at least 1/far of them)."""
    return impostors * far >= 1 - 1e-9


def threshold_at_far(sorted_impostor: np.ndarray, far: float) -> float:
    """The largest threshold t with FAR(t) ≤ far: the (⌊far·m⌋+1)-th smallest of m impostor distances, +inf when
    `far` allows every impostor (floor tolerant of float error: 1e-3 · 1000 must allow 1)."""
    allowed = int(math.floor(far * len(sorted_impostor) + 1e-9))
    return float(sorted_impostor[allowed]) if allowed < len(sorted_impostor) else math.inf


def val_at_far(distances, same, far: float) -> tuple[float, float]:
    """(VAL, threshold): the largest threshold t with FAR(t) ≤ far and the fraction of genuine pairs below it.

    FAR(t) = fraction of impostor pairs with distance < t (see threshold_at_far). With m impostor pairs, FAR is only
    resolved in steps of 1/m.
    """
    genuine, impostor = split_distances(distances, same)
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("VAL@FAR needs both genuine and impostor pairs")
    threshold = threshold_at_far(impostor, far)
    return float(_below(genuine, threshold) / len(genuine)), threshold


def roc_auc(distances, same) -> float:
    """Area under the ROC: P(genuine distance < impostor distance), ties counting one half (Mann–Whitney)."""
    genuine, impostor = split_distances(distances, same)
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    above = len(impostor) - np.searchsorted(impostor, genuine, side="right")
    ties = np.searchsorted(impostor, genuine, side="right") - np.searchsorted(impostor, genuine, side="left")
    return float((above.sum() + 0.5 * ties.sum()) / (len(genuine) * len(impostor)))


def d_prime(distances, same) -> float:
    """Separation (μ_impostor − μ_genuine) / √((σ²_genuine + σ²_impostor) / 2), population σ; +inf distances left out."""
    genuine, impostor = split_distances(distances, same)
    genuine, impostor = genuine[np.isfinite(genuine)], impostor[np.isfinite(impostor)]
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("d' needs finite genuine and impostor distances")
    spread = math.sqrt((genuine.var() + impostor.var()) / 2)
    return math.inf if spread == 0 else float((impostor.mean() - genuine.mean()) / spread)


def error_rates(distances, same, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, FRR) at each threshold: impostors accepted, genuine pairs rejected (for ROC/DET curves)."""
    genuine, impostor = split_distances(distances, same)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return _below(impostor, thresholds) / len(impostor), 1.0 - _below(genuine, thresholds) / len(genuine)
