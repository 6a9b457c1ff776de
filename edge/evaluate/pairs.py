"""eval-pairs: 1:1 verification on a pair list (LFW pairs.txt, or file_x,file_y,Decision CSV).

An image in which no face is found gives distance +inf, i.e. a rejection (the pair counts as "different"). Each
distinct image is embedded once (edge.evaluate.embedding); the numbers come from edge.evaluate.rates.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge.config import Config
from edge.console import say
from edge.errors import InputError
from edge.evaluate.embedding import FACE_RULES, add_face_argument, add_workers_argument, embed_images, stderr_progress
from edge.evaluate.rates import (DEFAULT_FOLDS, accuracy_at, d_prime, error_rates, roc_auc, split_distances,
                                 ten_fold_accuracy, val_at_far)
from edge.evaluate.report import check_writable_target, emit, json_number, note_plot, png_figure

# VAL is reported at these false-accept rates; a rate is only reported when the impostor pairs can resolve it
# for the smallest one (1e-4 needs 10k impostor pairs), the two larger ones always (with their resolution).
FAR_TARGETS = ("1e-2", "1e-3")
FINE_FAR_TARGET = "1e-4"
FINE_FAR_MIN_IMPOSTOR_PAIRS = 10_000
CSV_YES = {"yes", "true", "1", "same"}
CSV_NO = {"no", "false", "0", "different"}
DEFAULT_FACE_RULE = "largest"  # pair lists test the product's rule


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



def pair_distances(pairs: Sequence[Pair], embeddings: Embeddings) -> np.ndarray:
    """L2 distance per pair; +inf where either image has no face (a rejection)."""
    out = np.full(len(pairs), np.inf)
    for i, pair in enumerate(pairs):
        a, b = embeddings[pair.path_a], embeddings[pair.path_b]
        if a is not None and b is not None:
            out[i] = float(np.linalg.norm(a - b))
    return out


def far_targets(impostor_pairs: int) -> list[str]:
    return list(FAR_TARGETS) + ([FINE_FAR_TARGET] if impostor_pairs >= FINE_FAR_MIN_IMPOSTOR_PAIRS else [])


def pairs_report(distances: np.ndarray, same: np.ndarray, folds, threshold_l2: float) -> dict:
    """Every eval-pairs number for one set of distances (JSON-ready)."""
    genuine, impostor = split_distances(distances, same)
    mean, std, fold_thresholds = ten_fold_accuracy(distances, same, folds)
    report = {
        "pairs": len(distances), "genuine_pairs": len(genuine), "impostor_pairs": len(impostor),
        "folds": folds if isinstance(folds, int) else len(set(folds)),
        "far_resolution": json_number(1 / len(impostor)),
        "accuracy_10fold": round(mean, 6), "accuracy_10fold_std": round(std, 6),
        "thresholds_10fold": [json_number(t) for t in fold_thresholds],
        "threshold_l2": threshold_l2, "accuracy_at_threshold": round(accuracy_at(distances, same, threshold_l2), 6),
        "roc_auc": round(roc_auc(distances, same), 6), "d_prime": json_number(d_prime(distances, same), 4),
        "genuine_max_l2": json_number(genuine[np.isfinite(genuine)].max(initial=0.0)),
        "impostor_min_l2": json_number(impostor.min()),
    }
    for label in far_targets(len(impostor)):
        val, threshold = val_at_far(distances, same, float(label))
        far, _ = error_rates(distances, same, [threshold])
        report[f"val_at_far_{label}"] = {"val": round(val, 6), "threshold_l2": json_number(threshold),
                                         "far": round(float(far[0]), 6)}
    return report


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
    genuine, impostor = split_distances(distances, same)
    values = np.unique(np.asarray(distances, dtype=np.float64))
    finite = values[np.isfinite(values)]
    thresholds = np.concatenate([[0.0], finite, np.nextafter(finite[-1:], np.inf)])
    far, frr = error_rates(distances, same, thresholds)
    far_at, frr_at = error_rates(distances, same, [threshold_l2])
    far_floor, frr_floor = 0.5 / len(impostor), 0.5 / len(genuine)
    with png_figure(path, ncols=3, figsize=(15, 4.6)) as (figure, (roc, det, hist)):
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


def evaluate_pairs(pairs: list[Pair], config: Config, workers: int,
                   face: str = DEFAULT_FACE_RULE) -> tuple[np.ndarray, np.ndarray, dict]:
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
    add_face_argument(parser, DEFAULT_FACE_RULE)
    add_workers_argument(parser)


def cmd_eval_pairs(args, config: Config) -> int:
    """1:1 accuracy of a pair list: 10-fold accuracy, accuracy at the configured threshold, VAL@FAR, AUC, d'."""
    pairs = read_pairs(args.pairs, args.images_root, args.format)
    given = [p.fold for p in pairs]
    folds = given if len(set(given) - {None}) > 1 else DEFAULT_FOLDS  # one LFW fold: split like a CSV
    if len(pairs) < (DEFAULT_FOLDS if folds == DEFAULT_FOLDS else 2) or len({p.same for p in pairs}) < 2:
        raise InputError(f"{args.pairs}: {len(pairs)} pairs; 10-fold evaluation needs at least {DEFAULT_FOLDS}, "
                         "some of the same person and some of different people")
    check_writable_target(args.plot)
    distances, same, counts = evaluate_pairs(pairs, config, args.workers, args.face)
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
        note_plot(report, args.plot)
    emit(args, report)
    return 0


