"""calibrate: the threshold_l2 for a false-accept rate, from a pair list, the enrolled store, or a folder per person.

`--pairs` and `--store` give one threshold for `--target-far`. `--folder DIR --enrol-k K --probe-m M` gives, for
the template regime in use (K photos enrolled per person, probes fused from M photos; a door track's fused frames
count as M = 1, README Security levels), the threshold of every security level (standard / high / highest =
FAR 1e-4 / 1e-5 / 1e-6), from the same cached embedding pass and trials as `eval-templates`. With several K or M it
also gives the strictest threshold over them, which is how the shipped SECURITY_LEVELS were chosen.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.config import SECURITY_LEVELS, Config
from edge.console import say
from edge.errors import InputError
from edge.evaluate.config_file import THRESHOLD_DECIMALS, backup_path, write_threshold
from edge.evaluate.embedding import FACE_RULES, add_workers_argument
from edge.evaluate.pairs import DEFAULT_FACE_RULE as PAIRS_FACE_RULE
from edge.evaluate.pairs import evaluate_pairs, read_pairs
from edge.evaluate.rates import error_rates, far_resolves, labelled, split_distances, threshold_at_far
from edge.evaluate.report import emit, percent
from edge.evaluate.templates import (DEFAULT_FACE_RULE as TEMPLATES_FACE_RULE, DEFAULT_TEMPLATE_RULE, Photos,
                                     add_cache_arguments, add_regime_arguments, describe_photos, load_photos,
                                     no_probes_error, template_trials)

DEFAULT_TARGET_FAR = 1e-4
# calibrate --store: above this many templates a seeded subsample keeps the pair matrix small (3000 → 4.5M pairs).
MAX_CALIBRATION_TEMPLATES = 3000
SUBSAMPLE_SEED = 0
_STORE_FROM_CONFIG = "(store.path in the config)"


def recommend_threshold(distances, same, target_far: float) -> dict:
    """The threshold for `target_far` (threshold_at_far, rounded down to THRESHOLD_DECIMALS) and what it costs.

    `measurable` is False when the impostor pairs are too few to show a FAR as small as the target (m < 1/target):
    the threshold then only keeps every impostor pair of this set out, which says little about strangers.
    """
    genuine, impostor = split_distances(distances, same)
    if len(impostor) == 0:
        raise InputError("no impostor pairs (different people): a false-accept rate cannot be estimated")
    exact = threshold_at_far(impostor, target_far)
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
        "far_resolution": 1 / len(impostor), "measurable": far_resolves(target_far, len(impostor)),
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


def regime_levels(photos: Photos, enrol_k: int, probe_m: int) -> dict | None:
    """Each security level's recommend_threshold for one (K, M) regime of eval-templates' trials (mean templates);
    None when nobody has K + M photos with a face."""
    trials = template_trials(photos, enrol_k, probe_m, DEFAULT_TEMPLATE_RULE)
    if not len(trials.genuine):
        return None
    distances, same = labelled(trials.genuine, trials.impostor)
    return {"enrol_k": enrol_k, "probe_m": probe_m, "genuine": len(trials.genuine), "impostor": len(trials.impostor),
            "levels": {level: recommend_threshold(distances, same, far) for level, (far, _) in SECURITY_LEVELS.items()}}


def security_thresholds(regimes: list[dict]) -> dict[str, dict]:
    """Per security level, the strictest threshold over the regimes and whether every regime could measure it."""
    levels = {}
    for level in SECURITY_LEVELS:
        rows = [regime["levels"][level] for regime in regimes]
        strictest = min(rows, key=lambda row: row["threshold_l2"])
        levels[level] = {"target_far": strictest["target_far"], "threshold_l2": strictest["threshold_l2"],
                         "shipped_threshold_l2": SECURITY_LEVELS[level][1],
                         "measurable": all(row["measurable"] for row in rows),
                         "impostor_pairs": min(row["impostor_pairs"] for row in rows)}
    return levels


# ---- the command ----------------------------------------------------------------------------------------------


def add_calibrate_arguments(parser) -> None:
    parser.add_argument("--target-far", type=float, default=None, metavar="FAR",
                        help=f"--pairs/--store: false-accept rate to aim for (default {DEFAULT_TARGET_FAR:g})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, default=None, metavar="PAIRS", help="LFW pairs.txt or CSV pair list")
    source.add_argument("--store", nargs="?", const=_STORE_FROM_CONFIG, default=None, metavar="FILE",
                        help="use the enrolled templates (default file: store.path in the config)")
    source.add_argument("--folder", type=Path, default=None, metavar="DIR",
                        help="one sub-folder of photos per person: the security levels' thresholds for the "
                             "--enrol-k/--probe-m regime, as eval-templates measures it")
    parser.add_argument("--images-root", type=Path, default=None, metavar="DIR",
                        help="--pairs: folder of the images (default: the pair file's folder)")
    parser.add_argument("--format", choices=("lfw", "csv"), default=None, help="--pairs: default csv for *.csv, else lfw")
    add_regime_arguments(parser, default=None)
    add_cache_arguments(parser)
    parser.add_argument("--face", choices=tuple(FACE_RULES), default=None,
                        help=f"--pairs/--folder: which face of a photo with several counts (default {PAIRS_FACE_RULE} "
                             f"for --pairs, {TEMPLATES_FACE_RULE} for --folder, as eval-pairs and eval-templates)")
    parser.add_argument("--write", action="store_true",
                        help="write the threshold into the --config file (keeps comments, backup FILE.bak); with "
                             "--folder, the one of the configured match.security")
    add_workers_argument(parser)


def cmd_calibrate(args, config: Config) -> int:
    """Recommend match.threshold_l2 for a target FAR (or each security level) with its expected FRR; --write puts it
    into the config file."""
    if args.write and args.config is None:
        raise InputError("calibrate --write needs --config FILE: the YAML file to change")
    if args.folder is None:
        for option, value in (("--enrol-k", args.enrol_k), ("--probe-m", args.probe_m)):
            if value is not None:
                raise InputError(f"{option} goes with --folder (the template regime of a folder per person)")
        result = _calibrate_target(args, config)
        chosen = result
    else:
        if args.target_far is not None:
            raise InputError("--target-far goes with --pairs or --store; --folder reports every security level")
        result = _calibrate_folder(args, config)
        chosen = result["levels"][config.match.security]
    if args.write:
        _write(args, result, chosen)
    emit(args, result)
    return 0


def _calibrate_target(args, config: Config) -> dict:
    target_far = DEFAULT_TARGET_FAR if args.target_far is None else args.target_far
    if not 0 < target_far < 1:
        raise InputError(f"--target-far must be between 0 and 1, got {target_far}")
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, args.images_root or args.pairs.parent, args.format)
        distances, same, counts = evaluate_pairs(pairs, config, args.workers, args.face or PAIRS_FACE_RULE)
        source = {"source": str(args.pairs), **counts}
    else:
        if args.face is not None:
            raise InputError("--face goes with --pairs or --folder (a store holds embeddings, not photos)")
        distances, same, source = _store_distances(args, config)
    result = {**source, "configured_threshold_l2": config.match.threshold_l2,
              **recommend_threshold(distances, same, target_far)}
    say(f"calibrate: {result['genuine_pairs']} genuine and {result['impostor_pairs']} impostor pairs from {result['source']}")
    frr = "n/a (no genuine pairs)" if result["frr"] is None else f"{result['frr']:.4f}"
    say(f"threshold_l2 {result['threshold_l2']} for FAR <= {target_far:g}: measured FAR {result['far']:.4g}, "
        f"expected FRR {frr} (configured: {config.match.threshold_l2})")
    if not result["measurable"]:
        say(f"warning: {result['impostor_pairs']} impostor pairs resolve FAR only down to "
            f"{result['far_resolution']:.2g}, not {target_far:g}; this threshold merely rejects every impostor "
            f"pair seen (about {math.ceil(1 / target_far)} impostor pairs are needed)")
    return result


def _store_distances(args, config: Config) -> tuple[np.ndarray, np.ndarray, dict]:
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
    return distances, same, {"source": str(path), "persons": len(matrices), "templates": sum(map(len, matrices)),
                             "templates_used": used}


def _calibrate_folder(args, config: Config) -> dict:
    """Every security level's threshold for each (K, M) regime on a folder per person, and the strictest over them."""
    face = args.face or TEMPLATES_FACE_RULE
    enrol_ks, probe_ms = args.enrol_k or [1], args.probe_m or [1]
    photos = load_photos(args.folder, config, face=face, workers=args.workers, cache_dir=args.cache)
    regimes = []
    for k in enrol_ks:
        for m in probe_ms:
            regime = regime_levels(photos, k, m)
            if regime is None:
                raise no_probes_error(args.folder, photos, k, m)
            regimes.append(regime)
    result = {"source": str(args.folder), **describe_photos("calibrate", photos, face), "rule": DEFAULT_TEMPLATE_RULE,
              "regimes": regimes, "levels": security_thresholds(regimes),
              "configured_security": config.match.security, "configured_threshold_l2": config.match.threshold_l2}
    for regime in regimes:
        cells = "  ".join(f"{level} {row['threshold_l2']:.4f} (FRR {percent(row['frr']).strip()}"
                          f"{'' if row['measurable'] else ', FAR not resolved'})"
                          for level, row in regime["levels"].items())
        say(f"  K={regime['enrol_k']} M={regime['probe_m']} genuine {regime['genuine']} impostor {regime['impostor']}: "
            f"{cells}")
    over = "" if len(regimes) == 1 else f" (strictest over {len(regimes)} regimes)"
    for level, row in result["levels"].items():
        warning = "" if row["measurable"] else (f"  warning: {row['impostor_pairs']} impostor trials cannot show "
                                                f"FAR {far_label(row['target_far'])}")
        say(f"match.security {level} (FAR {far_label(row['target_far'])}): threshold_l2 {row['threshold_l2']}{over}; "
            f"shipped {row['shipped_threshold_l2']}{warning}")
    return result


def far_label(far: float) -> str:
    """1e-05 → '1e-5', as the README and eval-templates write rates."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _write(args, result: dict, chosen: dict) -> None:
    """Put the chosen threshold into the --config file, refusing one whose FAR the impostors cannot show."""
    target_far = chosen["target_far"]
    if not chosen["measurable"]:
        raise InputError(f"not writing {args.config}: {chosen['impostor_pairs']} impostor pairs cannot show a FAR "
                         f"of {target_far:g} (need at least {math.ceil(1 / target_far)})")
    old = write_threshold(Path(args.config), chosen["threshold_l2"])
    result["written"] = {"config": str(args.config), "old": old, "new": chosen["threshold_l2"],
                         "backup": str(backup_path(Path(args.config)))}
    say(f"{args.config}: match.threshold_l2 {old if old is not None else '(unset)'} -> {chosen['threshold_l2']} "
        f"(backup {backup_path(Path(args.config))})")
