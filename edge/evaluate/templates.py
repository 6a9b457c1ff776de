"""eval-templates: verification with multi-image templates on a folder per person, down to FAR 1e-6.

Protocol (per enrol-k K and probe-m M): of each person's photos with a face (sorted by name), the first K are the
enrolment; everyone with at least one such photo is in the gallery. Each person with at least K + M of them probes
with every disjoint group of M of the rest, fused into one template. A genuine trial compares a probe with its own
person's template, an impostor trial with every other person's. FRR at a FAR is read at the threshold that
accepts at most ⌊FAR·impostors⌋ impostor trials; null when there are fewer than 1/FAR impostor trials.

One embedding pass per folder: every photo's largest and centre face (embedding and quality) is cached in
`--cache` (default out/eval-cache/), keyed by the model fingerprint, the detector settings and the photo list.
`calibrate --folder` reads the same pass to turn the security levels into thresholds for a (K, M) regime.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge.config import Config
from edge.console import say
from edge.errors import InputError
from edge.evaluate.embedding import (FACE_RULE_HELP, FACE_RULES, add_face_argument, add_workers_argument,
                                     detected_faces, embed_images, pick_face, stderr_progress)
from edge.evaluate.rates import error_rates, far_resolves, labelled, threshold_at_far
from edge.evaluate.report import check_writable_target, emit, json_number, note_plot, percent, png_figure
from edge.fuse import fused, quality_weight
from edge.images import photos_by_person

FAR_LEVELS = ("1e-3", "1e-4", "1e-5", "1e-6")
# How a person's K rows meet a probe: one template (plain or quality-weighted mean) or the nearest row.
TEMPLATE_RULES = ("mean", "qmean", "nearest")
DEFAULT_TEMPLATE_RULE = "mean"  # measured best on lfw_dev (README, Templates)
RULE_LINES = {"mean": "-", "qmean": "--", "nearest": ":"}
# A folder per person labels one face per photo; LFW's is the one in the middle, and there the largest face is
# sometimes a bystander (11 of lfw_dev's 3,768 photos), which would count a labelling slip as a matcher error and
# an impostor trial between two photos of the same bystander as a false accept (README, Templates).
DEFAULT_FACE_RULE = "centre"
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("out/eval-cache")
QUALITY_FIELDS = ("width_px", "sharpness", "yaw", "score")


class FaceSample(NamedTuple):
    """What a photo gives a template: the unit embedding and the quality of its face."""

    embedding: np.ndarray
    width_px: float
    sharpness: float
    yaw: float
    score: float


def face_samples(pipeline, path: Path) -> dict[str, FaceSample | None]:
    """The photo's largest and centre face as FaceSamples (None: no face); one detection serves both rules."""
    from edge.quality import sharpness, yaw_ratio

    def sample(face) -> FaceSample | None:
        if face is None:
            return None
        return FaceSample(face.embedding, face.face.width_px, sharpness(face.chip), yaw_ratio(face.face.landmarks),
                          face.face.score)

    faces, shape = detected_faces(pipeline, path)
    return {rule: sample(pick_face(faces, shape, rule)) for rule in FACE_RULES}


# ---- the embedding pass and its cache -------------------------------------------------------------------------


@dataclass(frozen=True)
class Photos:
    """Every photo of a folder per person, with one face rule's embeddings (NaN rows: no face) and quality."""

    names: list[str]
    owner: np.ndarray  # person index per photo
    paths: list[Path]
    vectors: np.ndarray  # (photos, 128) float32
    weights: np.ndarray  # quality weight per photo, 0 where no face

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.vectors[:, 0])


def cache_key(config: Config, paths: list[Path], root: Path) -> str:
    """Digest of what the embeddings depend on: model fingerprint, detector settings, the photos (name, size, mtime)."""
    from edge.embed import store_fingerprint

    digest = hashlib.sha256(f"v{CACHE_VERSION}|{store_fingerprint(config)}|".encode())
    digest.update(config.detector.model_dump_json().encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"|{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def load_photos(folder: Path, config: Config, *, face: str, workers: int, cache_dir: Path | None) -> Photos:
    """Embed every photo once (or read the cache) and return them for the `face` rule."""
    people = photos_by_person(folder)
    names = sorted(people)
    paths = [p for name in names for p in people[name]]
    owner = np.array([i for i, name in enumerate(names) for _ in people[name]], dtype=np.int64)
    cache = None if cache_dir is None else cache_dir / f"{folder.name}-{cache_key(config, paths, folder)}.npz"
    if cache is not None and cache.is_file():
        say(f"embeddings from the cache {cache}")
        arrays = dict(np.load(cache))
    else:
        samples = embed_images(paths, config, workers=workers, progress=stderr_progress(), measure=face_samples)
        arrays = _arrays([samples[p] for p in paths])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temp = cache.with_suffix(".tmp.npz")
            np.savez(temp, **arrays)
            temp.replace(cache)
            say(f"embeddings cached in {cache}")
    quality = [arrays[f"{face}_{field}"] for field in QUALITY_FIELDS[:3]]
    weights = np.nan_to_num(quality_weight(*quality), nan=0.0)
    return Photos(names, owner, paths, arrays[f"{face}_embedding"], weights)


def _arrays(samples: list[dict[str, FaceSample | None]]) -> dict[str, np.ndarray]:
    arrays = {}
    for rule in FACE_RULES:
        found = [s[rule] for s in samples]
        arrays[f"{rule}_embedding"] = np.stack(
            [f.embedding if f is not None else np.full(128, np.nan, np.float32) for f in found]).astype(np.float32)
        for field in QUALITY_FIELDS:
            arrays[f"{rule}_{field}"] = np.array([getattr(f, field) if f is not None else np.nan for f in found])
    return arrays


# ---- trials (pure) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trials:
    """Genuine and impostor distances of one (K, M, rule) protocol."""

    genuine: np.ndarray
    impostor: np.ndarray
    probing_persons: int
    gallery_persons: int


def split_templates(photos: Photos, enrol_k: int, probe_m: int) -> tuple[list[np.ndarray], list[tuple[int, np.ndarray]]]:
    """(enrolment photo indices per person, [(person, probe photo indices)]) over photos with a face."""
    with_face = np.flatnonzero(photos.found)
    enrol, probes = [], []
    for person in range(len(photos.names)):
        own = with_face[photos.owner[with_face] == person]
        enrol.append(own[:enrol_k])
        rest = own[enrol_k:]
        if len(own) >= enrol_k + probe_m:
            probes += [(person, rest[i * probe_m:(i + 1) * probe_m]) for i in range(len(rest) // probe_m)]
    return enrol, probes


def template_trials(photos: Photos, enrol_k: int, probe_m: int, rule: str) -> Trials:
    """Every probe (fused from M photos) against every gallery person (K photos, compared by `rule`)."""
    if rule not in TEMPLATE_RULES:
        raise ValueError(f"unknown template rule {rule!r}")
    enrol, probes = split_templates(photos, enrol_k, probe_m)
    weighted = rule == "qmean"
    gallery = [i for i, rows in enumerate(enrol) if len(rows)]
    if not probes:
        return Trials(np.empty(0), np.empty(0), 0, len(gallery))
    probe_vectors = np.stack([_template(photos, rows, weighted) for _, rows in probes])
    if rule == "nearest":
        rows = np.concatenate([enrol[i] for i in gallery])
        starts = np.cumsum([0] + [len(enrol[i]) for i in gallery[:-1]])
        cosines = np.maximum.reduceat(photos.vectors[rows].astype(np.float64) @ probe_vectors.T.astype(np.float64),
                                      starts, axis=0)
    else:
        templates = np.stack([_template(photos, enrol[i], weighted) for i in gallery])
        cosines = templates.astype(np.float64) @ probe_vectors.T.astype(np.float64)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * cosines, 0.0))  # (gallery persons, probes)
    own = np.array([p for p, _ in probes])[None, :] == np.array(gallery)[:, None]
    return Trials(np.sort(distances[own]), np.sort(distances[~own]), len({p for p, _ in probes}), len(gallery))


def _template(photos: Photos, rows: np.ndarray, weighted: bool) -> np.ndarray:
    vectors = photos.vectors[rows]
    weights = photos.weights[rows] if weighted else None
    template = fused(vectors, weights)
    return template if template is not None else fused(vectors)  # all weights 0: fall back to the plain mean


def frr_at_far(trials: Trials) -> dict[str, dict]:
    """{"1e-3": {"frr", "threshold_l2"}, …}; both None where the impostor trials cannot resolve the FAR."""
    out = {}
    for label in FAR_LEVELS:
        if not far_resolves(float(label), len(trials.impostor)) or not len(trials.genuine):
            out[label] = {"frr": None, "threshold_l2": None}
            continue
        threshold = threshold_at_far(trials.impostor, float(label))
        accepted = np.searchsorted(trials.genuine, threshold, side="left") / len(trials.genuine)
        out[label] = {"frr": round(1.0 - float(accepted), 6), "threshold_l2": json_number(threshold)}
    return out


# ---- the command ----------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """'1,3' → [1, 3]; every entry a whole number ≥ 1 (argparse type)."""
    import argparse

    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be 1 or more, got {text!r}")
    return sorted(set(values))


def add_regime_arguments(parser, *, default: list[int] | None) -> None:
    """--enrol-k and --probe-m (lists), shared by eval-templates and calibrate --folder."""
    parser.add_argument("--enrol-k", type=int_list, default=default, metavar="K[,K…]",
                        help="photos enrolled per person (default 1); a list reports every combination")
    parser.add_argument("--probe-m", type=int_list, default=default, metavar="M[,M…]",
                        help="photos fused into one probe (default 1; a door track's fused frames count as 1, "
                             "see README, Security levels)")


def add_cache_arguments(parser) -> None:
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR",
                        help=f"embedding cache folder (default {DEFAULT_CACHE_DIR}); --no-cache to embed afresh")
    parser.add_argument("--no-cache", dest="cache", action="store_const", const=None)


def add_eval_templates_arguments(parser) -> None:
    parser.add_argument("folder", type=Path, metavar="DIR", help="one sub-folder of photos per person")
    add_regime_arguments(parser, default=[1])
    parser.add_argument("--rule", choices=TEMPLATE_RULES + ("all",), default=DEFAULT_TEMPLATE_RULE,
                        help="how K photos make a template: mean (the product's rule, default), qmean (quality-weighted "
                             "mean) or nearest (closest row); all reports each")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write a DET plot (FRR vs FAR)")
    add_cache_arguments(parser)
    add_face_argument(parser, DEFAULT_FACE_RULE)
    add_workers_argument(parser)


def no_probes_error(folder: Path, photos: Photos, enrol_k: int, probe_m: int) -> InputError:
    """The one line for a folder where nobody has enrol_k + probe_m photos with a face."""
    without_face = int((~photos.found).sum())
    return InputError(f"{folder}: nobody has {enrol_k + probe_m} photos with a face (K + M) to probe with; "
                      f"{without_face} of {len(photos.paths)} photos had no face")


def describe_photos(command: str, photos: Photos, face: str) -> dict:
    """The photo counts and the face rule a report starts with (JSON), also said on stderr."""
    without_face = [str(p) for p, ok in zip(photos.paths, photos.found) if not ok]
    say(f"{command}: {len(photos.paths)} photos of {len(photos.names)} people, {len(without_face)} without a face; "
        f"face rule {face} ({FACE_RULE_HELP[face]})")
    return {"face": face, "photos": len(photos.paths), "persons": len(photos.names),
            "images_without_face": len(without_face), "without_face": without_face}


def cmd_eval_templates(args, config: Config) -> int:
    """FRR at FAR 1e-3 … 1e-6 for every (K, M) combination and template rule, from one embedding pass."""
    check_writable_target(args.plot)
    photos = load_photos(args.folder, config, face=args.face, workers=args.workers, cache_dir=args.cache)
    rules = TEMPLATE_RULES if args.rule == "all" else (args.rule,)
    results, curves = [], []
    for k in args.enrol_k:
        for m in args.probe_m:
            for rule in rules:
                trials = template_trials(photos, k, m, rule)
                if not len(trials.genuine):
                    continue
                results.append({"enrol_k": k, "probe_m": m, "rule": rule, "probing_persons": trials.probing_persons,
                                "gallery_persons": trials.gallery_persons, "genuine": len(trials.genuine),
                                "impostor": len(trials.impostor), "frr_at_far": frr_at_far(trials)})
                curves.append((k, m, rule, trials))
    if not results:
        raise no_probes_error(args.folder, photos, min(args.enrol_k), min(args.probe_m))
    report = {"folder": str(args.folder), **describe_photos("eval-templates", photos, args.face), "results": results}
    for row in results:
        rates = "  ".join(f"FRR@{label} {percent(v['frr'])} ({v['threshold_l2']})" for label, v in row["frr_at_far"].items())
        say(f"  K={row['enrol_k']} M={row['probe_m']} {row['rule']:7s} genuine {row['genuine']:5d} impostor "
            f"{row['impostor']:9d}  {rates}")
    if args.plot:
        plot_det(curves, args.plot, title=f"{args.folder.name}: {len(photos.names)} people, {args.face} face")
        note_plot(report, args.plot)
    emit(args, report)
    return 0


def plot_det(curves: list[tuple[int, int, str, Trials]], path: Path, *, title: str) -> None:
    """DET curves (FRR vs FAR, log-log) of (K, M, rule) protocols in one PNG: a colour per (K, M), a line style per
    rule; zero rates drawn at ½ step."""
    with png_figure(path, figsize=(8, 6)) as (_, axes):
        colours = {}
        for k, m, rule, trials in curves:
            colour = colours.setdefault((k, m), f"C{len(colours) % 10}")
            genuine, impostor = trials.genuine, trials.impostor
            thresholds = np.unique(np.concatenate([[0.0], impostor[: 10 * math.isqrt(len(impostor)) + 1000], genuine]))
            far, frr = error_rates(*labelled(genuine, impostor), thresholds)
            axes.plot(np.maximum(far, 0.5 / len(impostor)), np.maximum(frr, 0.5 / len(genuine)),
                      drawstyle="steps-post", color=colour, linestyle=RULE_LINES[rule], label=f"K={k} M={m} {rule}")
        for label in FAR_LEVELS:
            axes.axvline(float(label), color="grey", linestyle=":", linewidth=0.8)
        axes.set(xscale="log", yscale="log", xlabel="FAR (impostor trials accepted)", ylabel="FRR (genuine rejected)",
                 title=title, xlim=(1e-7, 1e-1))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="best", fontsize="small")
