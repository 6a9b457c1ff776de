"""eval-ident: open-set 1:N identification on a folder per person (DIR and FPIR), under the product's rule."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.config import Config
from edge.console import positive_int, say
from edge.errors import InputError
from edge.evaluate.embedding import add_workers_argument, embed_images, stderr_progress
from edge.evaluate.report import emit, json_number
from edge.images import photos_by_person

# eval-ident reports DIR/FPIR over this grid of thresholds (plus the configured one).
SWEEP_THRESHOLDS_L2 = tuple(round(0.20 + 0.05 * i, 2) for i in range(13))  # 0.20 … 0.80


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
    add_workers_argument(parser)


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
                    "best": names[b] if b >= 0 else None, "distance_l2": json_number(d), "second_l2": json_number(s)}
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
    emit(args, report)
    return 0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
