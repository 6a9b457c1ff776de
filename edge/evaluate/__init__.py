"""Accuracy evaluation: 1:1 pair lists (LFW pairs.txt, file_x,file_y,Decision CSV), open-set 1:N, threshold calibration.

Every metric follows the product's rule: a pair is accepted ("same person") when the L2 distance between the unit
embeddings is strictly below the threshold. An image in which no face is found gives distance +inf, i.e. a rejection
(the pair counts as "different"). The metric functions are pure (arrays in, numbers out); the `cmd_*` handlers do the
reading, embedding (each distinct image once, optionally in worker processes) and printing.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge.config import Config
from edge.console import emit_json, positive_int, say
from edge.errors import InputError
from edge.images import photos_by_person

DEFAULT_FOLDS = 10
# VAL is reported at these false-accept rates; a rate is only reported when the impostor pairs can resolve it
# for the smallest one (1e-4 needs 10k impostor pairs), the two larger ones always (with their resolution).
FAR_TARGETS = ("1e-2", "1e-3")
FINE_FAR_TARGET = "1e-4"
FINE_FAR_MIN_IMPOSTOR_PAIRS = 10_000
# Thresholds written into config.yaml are rounded down to this many decimals: down keeps the FAR at or below target.
THRESHOLD_DECIMALS = 4
# eval-ident reports DIR/FPIR over this grid of thresholds (plus the configured one).
SWEEP_THRESHOLDS_L2 = tuple(round(0.20 + 0.05 * i, 2) for i in range(13))  # 0.20 … 0.80
# calibrate --store: above this many templates a seeded subsample keeps the pair matrix small (3000 → 4.5M pairs).
MAX_CALIBRATION_TEMPLATES = 3000
SUBSAMPLE_SEED = 0
PROGRESS_STEPS = 20  # non-interactive stderr gets about this many progress lines
CSV_YES = {"yes", "true", "1", "same"}
CSV_NO = {"no", "false", "0", "different"}


class Pair(NamedTuple):
    """One verification trial: two image paths, whether they show the same person, the LFW fold (None for CSV)."""

    path_a: Path
    path_b: Path
    same: bool
    fold: int | None


# ---- pair files -----------------------------------------------------------------------------------------------


def read_pairs_csv(path: Path | str, root: Path | str | None = None) -> list[Pair]:
    """`file_x,file_y,Decision` rows (Yes/No; header optional; CR, LF or CRLF line ends); files relative to `root`.

    `root` defaults to the CSV's folder. A malformed row raises InputError naming file:line.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    pairs, rows = [], 0
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        for row in reader:
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            rows += 1
            label = cells[2].casefold() if len(cells) >= 3 else ""
            if len(cells) != 3 or not cells[0] or not cells[1] or label not in CSV_YES | CSV_NO:
                if rows == 1:
                    continue  # the header line
                raise InputError(f"{path}:{reader.line_num}: expected 'file_x,file_y,Yes|No', got {','.join(row)!r}")
            pairs.append(Pair(root / cells[0], root / cells[1], label in CSV_YES, None))
    if not pairs:
        raise InputError(f"{path}: no pairs found (expected 'file_x,file_y,Decision' rows)")
    return pairs


def lfw_image_path(root: Path, name: str, number: int) -> Path:
    """LFW layout: root/Name/Name_000N.jpg (4-digit, zero padded)."""
    return root / name / f"{name}_{number:04d}.jpg"


def read_pairs_lfw(path: Path | str, root: Path | str) -> list[Pair]:
    """LFW pairs.txt: header `folds n` (or just `n`: one fold), then per fold n `name i j` and n `name1 i name2 j`.

    A pair's fold is its position: fold k holds lines 2nk+1 … 2n(k+1) after the header.
    """
    path, root = Path(path), Path(root)
    with _open_text(path) as fh:
        lines = [(number, line.split()) for number, line in enumerate(fh, 1) if line.strip()]
    if not lines:
        raise InputError(f"{path}: empty pairs file")
    header_line, header = lines[0]
    if not 1 <= len(header) <= 2 or not all(h.isdigit() and int(h) > 0 for h in header):
        raise InputError(f"{path}:{header_line}: expected the header 'folds pairs_per_fold' (e.g. '10 300')")
    folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    body = lines[1:]
    if len(body) != 2 * folds * per_fold:
        raise InputError(f"{path}: header says {folds} fold(s) of {per_fold} same + {per_fold} different pairs "
                         f"({2 * folds * per_fold} lines), found {len(body)}")
    pairs = []
    for position, (number, fields) in enumerate(body):
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            a, b, same = (fields[0], int(fields[1])), (fields[0], int(fields[2])), True
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            a, b, same = (fields[0], int(fields[1])), (fields[2], int(fields[3])), False
        else:
            raise InputError(f"{path}:{number}: expected 'name i j' or 'name1 i name2 j', got {' '.join(fields)!r}")
        pairs.append(Pair(lfw_image_path(root, *a), lfw_image_path(root, *b), same, position // (2 * per_fold)))
    return pairs


def read_pairs(path: Path, root: Path, kind: str | None) -> list[Pair]:
    """Either reader; `kind` None picks csv for a .csv file, else lfw."""
    kind = kind or ("csv" if path.suffix.lower() == ".csv" else "lfw")
    return read_pairs_csv(path, root) if kind == "csv" else read_pairs_lfw(path, root)


def _open_text(path: Path):
    """Text handle with untranslated line ends (csv wants newline=''; bare CR still ends a line)."""
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None


# ---- metrics (pure) -------------------------------------------------------------------------------------------


def _split(distances, same) -> tuple[np.ndarray, np.ndarray]:
    """Sorted genuine and impostor distances."""
    d, s = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    if d.shape != s.shape or d.ndim != 1:
        raise ValueError(f"distances and same must be 1-D of equal length, got {d.shape} and {s.shape}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    return np.sort(d[s]), np.sort(d[~s])


def _below(sorted_values: np.ndarray, thresholds) -> np.ndarray:
    """How many values are strictly below each threshold (= accepted under `distance < threshold`)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def accuracy_at(distances, same, threshold: float) -> float:
    """Fraction of pairs decided right by `distance < threshold` ⇔ same person."""
    genuine, impostor = _split(distances, same)
    correct = _below(genuine, threshold) + len(impostor) - _below(impostor, threshold)
    return float(correct / (len(genuine) + len(impostor)))


def best_threshold(distances, same) -> float:
    """The threshold maximising accuracy among the midpoints between sorted distinct finite distances.

    Ties go to the smallest (strictest) one; with a single distinct distance, just above it.
    """
    genuine, impostor = _split(distances, same)
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


def _allowed_false_accepts(far: float, impostor_pairs: int) -> int:
    """floor(far · m), tolerant of float error (1e-3 · 1000 must give 1)."""
    return int(math.floor(far * impostor_pairs + 1e-9))


def val_at_far(distances, same, far: float) -> tuple[float, float]:
    """(VAL, threshold): the largest threshold t with FAR(t) ≤ far and the fraction of genuine pairs below it.

    FAR(t) = fraction of impostor pairs with distance < t, so t is the (⌊far·m⌋+1)-th smallest impostor distance
    (+inf when far allows every impostor). With m impostor pairs, FAR is only resolved in steps of 1/m.
    """
    genuine, impostor = _split(distances, same)
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("VAL@FAR needs both genuine and impostor pairs")
    allowed = _allowed_false_accepts(far, len(impostor))
    threshold = float(impostor[allowed]) if allowed < len(impostor) else math.inf
    return float(_below(genuine, threshold) / len(genuine)), threshold


def roc_auc(distances, same) -> float:
    """Area under the ROC: P(genuine distance < impostor distance), ties counting one half (Mann–Whitney)."""
    genuine, impostor = _split(distances, same)
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    above = len(impostor) - np.searchsorted(impostor, genuine, side="right")
    ties = np.searchsorted(impostor, genuine, side="right") - np.searchsorted(impostor, genuine, side="left")
    return float((above.sum() + 0.5 * ties.sum()) / (len(genuine) * len(impostor)))


def d_prime(distances, same) -> float:
    """Separation (μ_impostor − μ_genuine) / √((σ²_genuine + σ²_impostor) / 2), population σ; +inf distances left out."""
    genuine, impostor = _split(distances, same)
    genuine, impostor = genuine[np.isfinite(genuine)], impostor[np.isfinite(impostor)]
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("d' needs finite genuine and impostor distances")
    spread = math.sqrt((genuine.var() + impostor.var()) / 2)
    return math.inf if spread == 0 else float((impostor.mean() - genuine.mean()) / spread)


def error_rates(distances, same, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, FRR) at each threshold: impostors accepted, genuine pairs rejected (for ROC/DET curves)."""
    genuine, impostor = _split(distances, same)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return _below(impostor, thresholds) / len(impostor), 1.0 - _below(genuine, thresholds) / len(genuine)


# ---- embedding (each distinct image once) ---------------------------------------------------------------------

Embeddings = dict[Path, "np.ndarray | None"]
_worker_pipeline = None


def largest_face(pipeline, path: Path):
    """The largest face in the image (EmbeddedFace: chip and embedding), found as photos are searched
    (thorough); None when there is no face."""
    from edge.images import load_image

    faces = pipeline.analyze(load_image(path, max_megapixels=pipeline.config.images.max_megapixels), thorough=True)
    return max(faces, key=lambda f: f.face.area_px) if faces else None


def largest_face_embedding(pipeline, path: Path) -> np.ndarray | None:
    """Unit embedding of the largest face in the image, None when there is no face."""
    face = largest_face(pipeline, path)
    return face.embedding if face is not None else None


def centre_face(pipeline, path: Path):
    """The face whose box centre is nearest the image centre (LFW's subject), found as photos are searched;
    None when there is no face."""
    from edge.images import load_image

    image = load_image(path)
    faces = pipeline.analyze(image, thorough=True)
    return min(faces, key=lambda f: _offset_from_centre(f.face.box, image.shape)) if faces else None


def _offset_from_centre(box, shape) -> float:
    return math.hypot((box[0] + box[2] - shape[1]) / 2, (box[1] + box[3] - shape[0]) / 2)


def centre_face_embedding(pipeline, path: Path) -> np.ndarray | None:
    """Unit embedding of the face nearest the image centre, None when there is no face."""
    face = centre_face(pipeline, path)
    return face.embedding if face is not None else None


FACE_RULES = {"largest": largest_face_embedding, "centre": centre_face_embedding}
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


def pair_distances(pairs: Sequence[Pair], embeddings: Embeddings) -> np.ndarray:
    """L2 distance per pair; +inf where either image has no face (a rejection)."""
    out = np.full(len(pairs), np.inf)
    for i, pair in enumerate(pairs):
        a, b = embeddings[pair.path_a], embeddings[pair.path_b]
        if a is not None and b is not None:
            out[i] = float(np.linalg.norm(a - b))
    return out


# ---- reports --------------------------------------------------------------------------------------------------


def _json_number(value: float, digits: int = 6) -> float | None:
    """Rounded float, None for ±inf (JSON has no infinity)."""
    return round(float(value), digits) if math.isfinite(value) else None


def far_targets(impostor_pairs: int) -> list[str]:
    return list(FAR_TARGETS) + ([FINE_FAR_TARGET] if impostor_pairs >= FINE_FAR_MIN_IMPOSTOR_PAIRS else [])


def pairs_report(distances: np.ndarray, same: np.ndarray, folds, threshold_l2: float) -> dict:
    """Every eval-pairs number for one set of distances (JSON-ready)."""
    genuine, impostor = _split(distances, same)
    mean, std, fold_thresholds = ten_fold_accuracy(distances, same, folds)
    report = {
        "pairs": len(distances), "genuine_pairs": len(genuine), "impostor_pairs": len(impostor),
        "folds": folds if isinstance(folds, int) else len(set(folds)),
        "far_resolution": _json_number(1 / len(impostor)),
        "accuracy_10fold": round(mean, 6), "accuracy_10fold_std": round(std, 6),
        "thresholds_10fold": [_json_number(t) for t in fold_thresholds],
        "threshold_l2": threshold_l2, "accuracy_at_threshold": round(accuracy_at(distances, same, threshold_l2), 6),
        "roc_auc": round(roc_auc(distances, same), 6), "d_prime": _json_number(d_prime(distances, same), 4),
        "genuine_max_l2": _json_number(genuine[np.isfinite(genuine)].max(initial=0.0)),
        "impostor_min_l2": _json_number(impostor.min()),
    }
    for label in far_targets(len(impostor)):
        val, threshold = val_at_far(distances, same, float(label))
        far, _ = error_rates(distances, same, [threshold])
        report[f"val_at_far_{label}"] = {"val": round(val, 6), "threshold_l2": _json_number(threshold),
                                         "far": round(float(far[0]), 6)}
    return report


def _emit(args, document: dict) -> None:
    if args.json:
        emit_json(document)


def _say_pairs_report(report: dict) -> None:
    say(f"10-fold accuracy {report['accuracy_10fold']:.4f} ± {report['accuracy_10fold_std']:.4f} "
         f"(fold thresholds {min(report['thresholds_10fold']):.3f}–{max(report['thresholds_10fold']):.3f})")
    say(f"accuracy at threshold_l2 {report['threshold_l2']}: {report['accuracy_at_threshold']:.4f}")
    for key in (k for k in report if k.startswith("val_at_far_")):
        entry = report[key]
        say(f"VAL {entry['val']:.4f} at FAR {key.removeprefix('val_at_far_')} (threshold {entry['threshold_l2']}, "
             f"measured FAR {entry['far']:.4f}; {report['impostor_pairs']} impostor pairs resolve "
             f"{report['far_resolution']:.2g})")
    say(f"ROC AUC {report['roc_auc']:.4f}, d' {report['d_prime']}, genuine max {report['genuine_max_l2']}, "
         f"impostor min {report['impostor_min_l2']}")


def plot_roc(distances, same, path: Path, *, threshold_l2: float, title: str) -> None:
    """PNG with ROC (VAL vs FAR), DET (FRR vs FAR) and the two distance histograms; zero rates drawn at ½ step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genuine, impostor = _split(distances, same)
    values = np.unique(np.asarray(distances, dtype=np.float64))
    finite = values[np.isfinite(values)]
    thresholds = np.concatenate([[0.0], finite, np.nextafter(finite[-1:], np.inf)])
    far, frr = error_rates(distances, same, thresholds)
    far_at, frr_at = error_rates(distances, same, [threshold_l2])
    far_floor, frr_floor = 0.5 / len(impostor), 0.5 / len(genuine)
    figure, (roc, det, hist) = plt.subplots(1, 3, figsize=(15, 4.6))
    roc.plot(np.maximum(far, far_floor), 1 - frr, drawstyle="steps-post")
    roc.plot(max(far_at[0], far_floor), 1 - frr_at[0], "o", color="C3", label=f"threshold {threshold_l2}")
    roc.set(xscale="log", xlabel=f"FAR (0 drawn at {far_floor:.1e})", ylabel="VAL (genuine accepted)", title="ROC")
    det.plot(np.maximum(far, far_floor), np.maximum(frr, frr_floor), drawstyle="steps-post")
    det.plot(max(far_at[0], far_floor), max(frr_at[0], frr_floor), "o", color="C3", label=f"threshold {threshold_l2}")
    det.set(xscale="log", yscale="log", xlabel="FAR", ylabel=f"FRR (0 drawn at {frr_floor:.1e})", title="DET")
    bins = np.linspace(0.0, max(1.2, float(finite.max())), 49)
    hist.hist(genuine[np.isfinite(genuine)], bins=bins, alpha=0.6, label=f"same ({len(genuine)})", density=True)
    hist.hist(impostor[np.isfinite(impostor)], bins=bins, alpha=0.6, label=f"different ({len(impostor)})", density=True)
    hist.axvline(threshold_l2, color="C3", linestyle="--", label=f"threshold {threshold_l2}")
    hist.set(xlabel="L2 distance between unit embeddings", ylabel="density", title="distances")
    for axes in (roc, det, hist):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def _check_writable_target(path: Path | None) -> None:
    """Fail before minutes of embedding, not after."""
    if path is not None and not os.access(path.parent, os.W_OK):
        raise InputError(f"{path}: folder {path.parent} does not exist or is not writable")


def _add_workers_argument(parser) -> None:
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="embed with N processes, each with its own models (default 1)")


def _evaluate_pairs(pairs: list[Pair], config: Config, workers: int,
                    face: str = "largest") -> tuple[np.ndarray, np.ndarray, dict]:
    """Distances, same-person flags and the face-finding counts of a pair list (`face`: a FACE_RULES key)."""
    embeddings = embed_images([p for pair in pairs for p in pair[:2]], config, workers=workers,
                              progress=stderr_progress(), measure=FACE_RULES[face])
    distances = pair_distances(pairs, embeddings)
    counts = {"images": len(embeddings), "images_without_face": sum(e is None for e in embeddings.values()),
              "pairs_without_face": int(np.isinf(distances).sum())}
    return distances, np.array([p.same for p in pairs]), counts


# ---- eval-pairs -----------------------------------------------------------------------------------------------


def add_eval_pairs_arguments(parser) -> None:
    parser.add_argument("pairs", type=Path, metavar="PAIRS", help="LFW pairs.txt or a file_x,file_y,Decision CSV")
    parser.add_argument("images_root", type=Path, metavar="IMAGES_ROOT", help="folder the pair file's images are in")
    parser.add_argument("--format", choices=("lfw", "csv"), default=None, help="default: csv for *.csv, else lfw")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write ROC, DET and distance plots")
    add_face_argument(parser)
    _add_workers_argument(parser)


def add_face_argument(parser) -> None:
    parser.add_argument("--face", choices=tuple(FACE_RULES), default="largest",
                        help="which face of a photo with several: largest (the product's rule, default) or centre "
                             "(the one nearest the image centre: LFW's subject)")


def cmd_eval_pairs(args, config: Config) -> int:
    """1:1 accuracy of a pair list: 10-fold accuracy, accuracy at the configured threshold, VAL@FAR, AUC, d'."""
    pairs = read_pairs(args.pairs, args.images_root, args.format)
    given = [p.fold for p in pairs]
    folds = given if len(set(given) - {None}) > 1 else DEFAULT_FOLDS  # one LFW fold: split like a CSV
    if len(pairs) < (DEFAULT_FOLDS if folds == DEFAULT_FOLDS else 2) or len({p.same for p in pairs}) < 2:
        raise InputError(f"{args.pairs}: {len(pairs)} pairs; 10-fold evaluation needs at least {DEFAULT_FOLDS}, "
                         "some of the same person and some of different people")
    _check_writable_target(args.plot)
    distances, same, counts = _evaluate_pairs(pairs, config, args.workers, args.face)
    if not (np.isfinite(distances[same]).any() and np.isfinite(distances[~same]).any()):
        raise InputError(f"{args.pairs}: faces found in too few images ({counts['images_without_face']} of "
                         f"{counts['images']} without a face) to compare same and different pairs")
    report = {"pairs_file": str(args.pairs), "face": args.face, **counts, **pairs_report(distances, same, folds, config.match.threshold_l2)}
    say(f"eval-pairs: {report['pairs']} pairs ({report['genuine_pairs']} same, {report['impostor_pairs']} different), "
         f"{counts['images']} images, {counts['images_without_face']} without a face "
         f"({counts['pairs_without_face']} pairs counted as rejected)")
    _say_pairs_report(report)
    if args.plot:
        plot_roc(distances, same, args.plot, threshold_l2=config.match.threshold_l2, title=f"{args.pairs.name}: "
                 f"{report['pairs']} pairs, 10-fold accuracy {report['accuracy_10fold']:.4f}")
        report["plot"] = str(args.plot)
        say(f"plot written to {args.plot}")
    _emit(args, report)
    return 0


# ---- eval-ident -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentSplit:
    """Who is enrolled with which photos, and which photos probe (person None = not enrolled)."""

    enrol: dict[str, list[Path]]
    probes: list[tuple[Path, str | None]]


def split_for_ident(people: dict[str, list[Path]], enrol_k: int, holdout: int = 0) -> IdentSplit:
    """Enrol each person's first `enrol_k` photos (sorted), probe with the rest.

    Non-enrolled people (all their photos probe as impostors): everyone with no more than `enrol_k` photos (nothing
    left to probe with), plus the last `holdout` of the others in name order.
    """
    probing = [name for name in sorted(people) if len(people[name]) > enrol_k]
    held_out = set(probing[max(0, len(probing) - holdout):]) if holdout > 0 else set()
    enrol, probes = {}, []
    for name in sorted(people):
        photos = sorted(people[name])
        if name in held_out or len(photos) <= enrol_k:
            probes += [(p, None) for p in photos]
        else:
            enrol[name] = photos[:enrol_k]
            probes += [(p, name) for p in photos[enrol_k:]]
    return IdentSplit(enrol, probes)


def nearest_two(gallery: np.ndarray, owners: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: best person index, its L2 distance (closest template) and the second-best person's distance.

    `owners[r]` is the person index of gallery row r; one person alone has second distance ABSENT_DISTANCE_L2,
    as in the store.
    """
    from edge.store import ABSENT_DISTANCE_L2

    persons = int(owners.max()) + 1
    per_template = np.sqrt(np.maximum(2.0 - 2.0 * (probes.astype(np.float64) @ gallery.T.astype(np.float64)), 0.0))
    per_person = np.full((len(probes), persons), np.inf)
    for person in range(persons):
        per_person[:, person] = per_template[:, owners == person].min(axis=1)
    order = np.argsort(per_person, axis=1)
    rows = np.arange(len(probes))
    best = order[:, 0]
    second = per_person[rows, order[:, 1]] if persons > 1 else np.full(len(probes), ABSENT_DISTANCE_L2)
    return best, per_person[rows, best], second


def open_set_rates(best: np.ndarray, best_l2: np.ndarray, second_l2: np.ndarray, truth: np.ndarray,
                   threshold_l2: float, margin_l2: float) -> tuple[float | None, float | None]:
    """(DIR, FPIR) under the product rule: accepted when best < threshold and second − best ≥ margin.

    `truth` is the true person index of each probe, −1 for non-enrolled; probes without a face carry best_l2 = inf
    (never accepted, still counted). DIR = enrolled probes accepted as the right person / enrolled probes;
    FPIR = non-enrolled probes accepted as anyone / non-enrolled probes. None where there are no such probes.
    """
    with np.errstate(invalid="ignore"):
        accepted = (best_l2 < threshold_l2) & (second_l2 - best_l2 >= margin_l2)
    mated = truth >= 0
    dir_rate = float((accepted & (best == truth))[mated].mean()) if mated.any() else None
    fpir = float(accepted[~mated].mean()) if (~mated).any() else None
    return dir_rate, fpir


def add_eval_ident_arguments(parser) -> None:
    parser.add_argument("folder", type=Path, metavar="DIR", help="one sub-folder of photos per person")
    parser.add_argument("--enrol-k", type=positive_int, default=1, metavar="K",
                        help="enrol each person's first K photos (sorted) as one mean template, probe with the rest (default 1)")
    parser.add_argument("--holdout", type=int, default=0, metavar="N",
                        help="also leave the last N people (by name) out of enrolment as impostor probes")
    _add_workers_argument(parser)


def cmd_eval_ident(args, config: Config) -> int:
    """Open-set 1:N: DIR and FPIR at the configured threshold and over a sweep (see split_for_ident)."""
    if args.holdout < 0:
        raise InputError(f"--holdout must be 0 or more, got {args.holdout}")
    split = split_for_ident(photos_by_person(args.folder), args.enrol_k, args.holdout)
    paths = [p for photos in split.enrol.values() for p in photos] + [p for p, _ in split.probes]
    embeddings = embed_images(paths, config, workers=args.workers, progress=stderr_progress())
    from edge.fuse import fused

    names, gallery, rows = [], [], 0
    for name, photos in split.enrol.items():
        vectors = [embeddings[p] for p in photos if embeddings[p] is not None]
        if vectors:  # one template per person, the mean of their photos, as the store matches
            gallery.append(fused(np.stack(vectors)))
            rows += len(vectors)
            names.append(name)
    owners = np.arange(len(names))
    if not names:
        raise InputError(f"{args.folder}: nobody could be enrolled (every person needs more than {args.enrol_k} "
                         "photos, with a face in the first ones)")
    index = {name: i for i, name in enumerate(names)}
    truth = np.array([index.get(person, -1) if person else -1 for _, person in split.probes])
    found = np.array([embeddings[p] is not None for p, _ in split.probes])
    best, best_l2, second_l2 = np.full(len(truth), -1), np.full(len(truth), np.inf), np.full(len(truth), np.inf)
    if found.any():
        probe_vectors = np.stack([embeddings[p] for (p, _), ok in zip(split.probes, found) if ok])
        b, b_l2, s_l2 = nearest_two(np.stack(gallery), np.array(owners), probe_vectors)
        best[found], best_l2[found], second_l2[found] = b, b_l2, s_l2
    match = config.match
    dir_rate, fpir = open_set_rates(best, best_l2, second_l2, truth, match.threshold_l2, match.margin_l2)
    sweep = []
    for threshold in sorted(set(SWEEP_THRESHOLDS_L2) | {match.threshold_l2}):
        d, f = open_set_rates(best, best_l2, second_l2, truth, threshold, match.margin_l2)
        sweep.append({"threshold_l2": threshold, "dir": d, "fpir": f})
    mated = truth >= 0
    report = {
        "folder": str(args.folder), "enrol_k": args.enrol_k, "enrolled_persons": len(names),
        "enrolled_templates": rows,
        "nonenrolled_persons": sorted({p.parent.name for (p, _), t in zip(split.probes, truth) if t < 0}),
        "mated_probes": int(mated.sum()), "nonmated_probes": int((~mated).sum()),
        "images_without_face": sum(e is None for e in embeddings.values()),
        "threshold_l2": match.threshold_l2, "margin_l2": match.margin_l2, "dir": dir_rate, "fpir": fpir,
        "rank1": float((best == truth)[mated].mean()) if mated.any() else None,
        "sweep": sweep,
        "probes": [{"image": str(p), "person": names[t] if t >= 0 else None,
                    "best": names[b] if b >= 0 else None, "distance_l2": _json_number(d), "second_l2": _json_number(s)}
                   for (p, _), t, b, d, s in zip(split.probes, truth, best, best_l2, second_l2)],
    }
    say(f"eval-ident: {len(names)} people enrolled ({rows} photos, k={args.enrol_k}), "
         f"{report['mated_probes']} enrolled-person probe(s), {report['nonmated_probes']} non-enrolled probe(s) "
         f"({', '.join(report['nonenrolled_persons']) or 'nobody held out'}), "
         f"{report['images_without_face']} images without a face")
    for row in sweep:
        mark = "  <- configured" if row["threshold_l2"] == match.threshold_l2 else ""
        say(f"  threshold_l2 {row['threshold_l2']:.2f}  DIR {_rate(row['dir'])}  FPIR {_rate(row['fpir'])}{mark}")
    say(f"at threshold_l2 {match.threshold_l2}, margin {match.margin_l2}: DIR {_rate(dir_rate)}, FPIR {_rate(fpir)}, "
         f"rank-1 {_rate(report['rank1'])}")
    _emit(args, report)
    return 0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---- calibrate ------------------------------------------------------------------------------------------------


def recommend_threshold(distances, same, target_far: float) -> dict:
    """The threshold for `target_far` (val_at_far, rounded down to THRESHOLD_DECIMALS) and what it costs.

    `measurable` is False when the impostor pairs are too few to show a FAR as small as the target (m < 1/target):
    the threshold then only keeps every impostor pair of this set out, which says little about strangers.
    """
    genuine, impostor = _split(distances, same)
    if len(impostor) == 0:
        raise InputError("no impostor pairs (different people): a false-accept rate cannot be estimated")
    allowed = _allowed_false_accepts(target_far, len(impostor))
    exact = float(impostor[allowed]) if allowed < len(impostor) else math.inf
    if not math.isfinite(exact):
        raise InputError(f"target FAR {target_far:g} accepts every impostor pair: choose a smaller one")
    scale = 10**THRESHOLD_DECIMALS
    threshold = math.floor(exact * scale) / scale
    if threshold <= 0:
        raise InputError(f"impostor pairs as close as {exact:.4f}: no usable threshold (duplicate images?)")
    far, frr = error_rates(distances, same, [threshold])
    return {
        "target_far": target_far, "threshold_l2": threshold, "far": round(float(far[0]), 8),
        "frr": round(float(frr[0]), 6) if len(genuine) else None,
        "genuine_pairs": len(genuine), "impostor_pairs": len(impostor),
        "far_resolution": 1 / len(impostor), "measurable": len(impostor) * target_far >= 1 - 1e-9,
    }


def store_pairs(matrices: Sequence[np.ndarray], *, max_templates: int = MAX_CALIBRATION_TEMPLATES,
                seed: int = SUBSAMPLE_SEED) -> tuple[np.ndarray, np.ndarray, int]:
    """(distances, same, templates used): every template pair of a store, genuine within a person, impostor across.

    Above `max_templates` templates a seeded random subset of that size is used (the pair count grows with its square).
    """
    owners = np.concatenate([np.full(len(m), i) for i, m in enumerate(matrices)])
    rows = np.concatenate(matrices).astype(np.float32)
    if len(rows) > max_templates:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_templates, replace=False))
        rows, owners = rows[keep], owners[keep]
    upper = np.triu_indices(len(rows), k=1)
    cosines = (rows @ rows.T)[upper]
    return np.sqrt(np.maximum(2.0 - 2.0 * cosines.astype(np.float64), 0.0)), owners[upper[0]] == owners[upper[1]], len(rows)


_STORE_FROM_CONFIG = "(store.path in the config)"


def add_calibrate_arguments(parser) -> None:
    parser.add_argument("--target-far", type=float, default=1e-4, metavar="FAR",
                        help="false-accept rate to aim for (default 1e-4)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, default=None, metavar="PAIRS", help="LFW pairs.txt or CSV pair list")
    source.add_argument("--store", nargs="?", const=_STORE_FROM_CONFIG, default=None, metavar="FILE",
                        help="use the enrolled templates (default file: store.path in the config)")
    parser.add_argument("--images-root", type=Path, default=None, metavar="DIR",
                        help="--pairs: folder of the images (default: the pair file's folder)")
    parser.add_argument("--format", choices=("lfw", "csv"), default=None, help="--pairs: default csv for *.csv, else lfw")
    parser.add_argument("--write", action="store_true",
                        help="write the threshold into the --config file (keeps comments, backup FILE.bak)")
    _add_workers_argument(parser)


def cmd_calibrate(args, config: Config) -> int:
    """Recommend match.threshold_l2 for a target FAR with its expected FRR; --write puts it into the config file."""
    if not 0 < args.target_far < 1:
        raise InputError(f"--target-far must be between 0 and 1, got {args.target_far}")
    if args.write and args.config is None:
        raise InputError("calibrate --write needs --config FILE: the YAML file to change")
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, args.images_root or args.pairs.parent, args.format)
        distances, same, counts = _evaluate_pairs(pairs, config, args.workers)
        source = {"source": str(args.pairs), **counts}
    else:
        from edge.embed import store_fingerprint
        from edge.store import Store

        path = config.store.path if args.store == _STORE_FROM_CONFIG else Path(args.store)
        if not Path(path).is_file():
            raise InputError(f"store {path} not found (enrol people first, or pass --store FILE)")
        store = Store.open(path, fingerprint=store_fingerprint(config), key_path=config.store.key_file)
        matrices = [store.embeddings(person.id) for person in store.persons]
        if len(matrices) < 2:
            raise InputError(f"store {path} has {len(matrices)} person(s): impostor pairs need at least 2")
        distances, same, used = store_pairs(matrices)
        source = {"source": str(path), "persons": len(matrices), "templates": sum(map(len, matrices)),
                  "templates_used": used}
    result = {**source, "configured_threshold_l2": config.match.threshold_l2,
              **recommend_threshold(distances, same, args.target_far)}
    say(f"calibrate: {result['genuine_pairs']} genuine and {result['impostor_pairs']} impostor pairs from {result['source']}")
    frr = "n/a (no genuine pairs)" if result["frr"] is None else f"{result['frr']:.4f}"
    say(f"threshold_l2 {result['threshold_l2']} for FAR <= {args.target_far:g}: measured FAR {result['far']:.4g}, "
         f"expected FRR {frr} (configured: {config.match.threshold_l2})")
    if not result["measurable"]:
        say(f"warning: {result['impostor_pairs']} impostor pairs resolve FAR only down to "
             f"{result['far_resolution']:.2g}, not {args.target_far:g}; this threshold merely rejects every impostor "
             f"pair seen (about {math.ceil(1 / args.target_far)} impostor pairs are needed)")
    if args.write:
        if not result["measurable"]:
            raise InputError(f"not writing {args.config}: {result['impostor_pairs']} impostor pairs cannot show a FAR "
                             f"of {args.target_far:g} (need at least {math.ceil(1 / args.target_far)})")
        old = write_threshold(Path(args.config), result["threshold_l2"])
        result["written"] = {"config": str(args.config), "old": old, "new": result["threshold_l2"],
                             "backup": str(backup_path(Path(args.config)))}
        say(f"{args.config}: match.threshold_l2 {old if old is not None else '(unset)'} -> {result['threshold_l2']} "
             f"(backup {backup_path(Path(args.config))})")
    _emit(args, result)
    return 0


# ---- config.yaml editing --------------------------------------------------------------------------------------

_SECTION = re.compile(r"^match:[ \t]*(#.*)?$")
_FLOW_SECTION = re.compile(r"^match:[ \t]*[^\s#]")
_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w-]*):")
_THRESHOLD = re.compile(r"^(?P<head>[ \t]+threshold_l2:[ \t]*)(?P<value>[^\s#]+)(?P<gap>[ \t]*)(?P<tail>#.*)?$")


def set_threshold_in_yaml(text: str, threshold_l2: float) -> tuple[str, str | None]:
    """(new text, old value text or None): `match.threshold_l2` set to the value, every other byte unchanged.

    The value is replaced in place (a trailing comment keeps its column where it fits); a missing key is added as
    the first key under `match:`, a missing section at the end. Flow style (`match: {…}`) is refused.
    """
    value = repr(round(float(threshold_l2), THRESHOLD_DECIMALS))
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if text.endswith("\r\n") or "\r\n" in text[:200] else "\n"
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line.rstrip("\r\n"))), None)
    if start is None:
        if any(_FLOW_SECTION.match(line) for line in lines):
            raise InputError("match: is written in flow style; set match.threshold_l2 by hand")
        separator = "" if not text or text.endswith("\n") else newline
        return f"{text}{separator}match:{newline}  threshold_l2: {value}{newline}", None
    end, indent = start + 1, None
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        key = _KEY.match(lines[end])
        indent = indent or (key.group("indent") if key else None)
        end += 1
    for i in range(start + 1, end):
        body = lines[i].rstrip("\r\n")
        found = _THRESHOLD.match(body)
        if found and _KEY.match(body).group("indent") == indent:
            old, tail = found.group("value"), found.group("tail") or ""
            gap = " " * max(1, len(found.group("gap")) + len(old) - len(value)) if tail else ""
            lines[i] = f"{found.group('head')}{value}{gap}{tail}{lines[i][len(body):]}"
            return "".join(lines), old
    lines.insert(start + 1, f"{indent or '  '}threshold_l2: {value}{newline}")
    return "".join(lines), None


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def write_threshold(path: Path, threshold_l2: float) -> str | None:
    """Set match.threshold_l2 in a config file: checked, backup FILE.bak first, then an atomic replace. Returns the old value."""
    import yaml

    from edge.config import load_config

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None
    new_text, old = set_threshold_in_yaml(text, threshold_l2)
    written = ((yaml.safe_load(new_text) or {}).get("match") or {}).get("threshold_l2")
    if written != round(threshold_l2, THRESHOLD_DECIMALS):
        raise InputError(f"{path}: could not edit match.threshold_l2 safely; set it to {threshold_l2} by hand")
    shutil.copy2(path, backup_path(path))
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, path.stat().st_mode & 0o7777)
        load_config(temp)  # every other setting must still validate before the file is replaced
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return old
