"""calibrate: the threshold_l2 for a target false-accept rate, from a pair list or the enrolled store."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.config import Config
from edge.console import say
from edge.errors import InputError
from edge.evaluate.config_file import THRESHOLD_DECIMALS, backup_path, write_threshold
from edge.evaluate.embedding import add_workers_argument
from edge.evaluate.pairs import evaluate_pairs, read_pairs
from edge.evaluate.rates import error_rates, far_resolves, split_distances, threshold_at_far
from edge.evaluate.report import emit

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


# ---- the command ----------------------------------------------------------------------------------------------


def add_calibrate_arguments(parser) -> None:
    parser.add_argument("--target-far", type=float, default=DEFAULT_TARGET_FAR, metavar="FAR",
                        help=f"false-accept rate to aim for (default {DEFAULT_TARGET_FAR:g})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, default=None, metavar="PAIRS", help="LFW pairs.txt or CSV pair list")
    source.add_argument("--store", nargs="?", const=_STORE_FROM_CONFIG, default=None, metavar="FILE",
                        help="use the enrolled templates (default file: store.path in the config)")
    parser.add_argument("--images-root", type=Path, default=None, metavar="DIR",
                        help="--pairs: folder of the images (default: the pair file's folder)")
    parser.add_argument("--format", choices=("lfw", "csv"), default=None, help="--pairs: default csv for *.csv, else lfw")
    parser.add_argument("--write", action="store_true",
                        help="write the threshold into the --config file (keeps comments, backup FILE.bak)")
    add_workers_argument(parser)


def cmd_calibrate(args, config: Config) -> int:
    """Recommend match.threshold_l2 for a target FAR with its expected FRR; --write puts it into the config file."""
    if args.write and args.config is None:
        raise InputError("calibrate --write needs --config FILE: the YAML file to change")
    result = _calibrate_target(args, config)
    if args.write:
        _write(args, result)
    emit(args, result)
    return 0


def _calibrate_target(args, config: Config) -> dict:
    target_far = args.target_far
    if not 0 < target_far < 1:
        raise InputError(f"--target-far must be between 0 and 1, got {target_far}")
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, args.images_root or args.pairs.parent, args.format)
        distances, same, counts = evaluate_pairs(pairs, config, args.workers)
        source = {"source": str(args.pairs), **counts}
    else:
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


def _write(args, result: dict) -> None:
    """Put the result threshold into the --config file, refusing one whose FAR the impostors cannot show."""
    target_far = result["target_far"]
    if not result["measurable"]:
        raise InputError(f"not writing {args.config}: {result['impostor_pairs']} impostor pairs cannot show a FAR "
                         f"of {target_far:g} (need at least {math.ceil(1 / target_far)})")
    old = write_threshold(Path(args.config), result["threshold_l2"])
    result["written"] = {"config": str(args.config), "old": old, "new": result["threshold_l2"],
                         "backup": str(backup_path(Path(args.config)))}
    say(f"{args.config}: match.threshold_l2 {old if old is not None else '(unset)'} -> {result['threshold_l2']} "
        f"(backup {backup_path(Path(args.config))})")
