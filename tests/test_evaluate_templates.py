"""eval-templates: the K/M protocol on hand-built vectors, FRR@FAR resolution, and the command on a few LFW people."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.evaluate.templates import Photos, Trials, frr_at_far, split_templates, template_trials
from edge.fuse import fused, quality_weight
from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


def unit(*values: float) -> np.ndarray:
    vector = np.zeros(128, np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


def photos(rows: list[tuple[int, np.ndarray | None]], weights=None) -> Photos:
    """Photos of persons 0..n from (owner, vector or None = no face)."""
    owners = np.array([o for o, _ in rows])
    vectors = np.stack([v if v is not None else np.full(128, np.nan, np.float32) for _, v in rows])
    names = [f"p{i}" for i in range(owners.max() + 1)]
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)
    return Photos(names, owners, [Path(f"{i}.jpg") for i in range(len(rows))], vectors, w)


def test_split_enrols_first_k_probes_disjoint_groups_and_skips_photos_without_face():
    p = photos([(0, unit(1)), (0, None), (0, unit(1, 0.1)), (0, unit(1, 0.2)), (0, unit(1, 0.3)), (0, unit(1, 0.4)),
                (1, unit(0, 1)), (1, unit(0, 1, 0.1)), (2, unit(0, 0, 1))])
    enrol, probes = split_templates(p, enrol_k=2, probe_m=2)
    assert [e.tolist() for e in enrol] == [[0, 2], [6, 7], [8]]  # photo 1 has no face: skipped, not enrolled
    assert [(person, rows.tolist()) for person, rows in probes] == [(0, [3, 4])]  # 5 is left over (not a full group)


def test_mean_and_nearest_templates_give_the_distances_worked_out_by_hand():
    a0, a1, b0, b1 = unit(1, 0), unit(0, 1), unit(-1, 0), unit(1, 1)
    p = photos([(0, a0), (0, a1), (0, b1), (1, b0), (1, b0), (1, b0)])
    mean = template_trials(p, enrol_k=2, probe_m=1, rule="mean")
    # person 0: template (a0 + a1)/√2 = b1, probe b1 → 0; person 1: template b0, probe b0 → 0.
    # Impostors: probe b1 vs template b0 and probe b0 vs template b1. (abs 1e-3: √(2 − 2·cos) of float32 near 0)
    assert mean.genuine.tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    cross = float(np.linalg.norm(b1 - b0))
    assert mean.impostor.tolist() == pytest.approx([cross, cross], abs=1e-6)
    nearest = template_trials(p, enrol_k=2, probe_m=1, rule="nearest")
    # nearest row: b1 is √(2 − √2) from both a0 and a1; b0 vs person 0's rows: nearest is a1 (distance √2)
    assert nearest.genuine.tolist() == pytest.approx(sorted([0.0, np.sqrt(2 - np.sqrt(2))]), abs=1e-3)
    assert nearest.impostor.tolist() == pytest.approx(sorted([np.sqrt(2.0), cross]), abs=1e-6)
    assert (mean.probing_persons, mean.gallery_persons) == (2, 2)


def test_quality_weighted_mean_leans_on_the_good_photo():
    good, poor = unit(1, 0), unit(0, 1)
    p = photos([(0, good), (0, poor), (0, good), (1, unit(-1, 0))], weights=[1.0, 0.0, 1.0, 1.0])
    assert template_trials(p, 2, 1, "qmean").genuine.tolist() == pytest.approx([0.0], abs=1e-6)
    assert template_trials(p, 2, 1, "mean").genuine[0] > 0.7
    assert fused(np.stack([good, poor]), [0.0, 0.0]) is None


def test_quality_weight_ranks_size_blur_and_pose():
    full = quality_weight(120, 200, 0.0)
    assert 0.9 < full <= 1.0
    assert quality_weight(40, 200, 0.0) == pytest.approx(full / 2)  # half the full-weight width
    assert quality_weight(120, 20, 0.0) < quality_weight(120, 200, 0.0)
    assert quality_weight(120, 200, 0.6) == 0.0  # side-on: does not count


def test_frr_at_far_is_null_where_the_impostors_cannot_resolve_it():
    trials = Trials(genuine=np.array([0.1, 0.2, 0.3, 0.5]), impostor=np.sort(np.linspace(0.25, 1.0, 2000)),
                    probing_persons=2, gallery_persons=3)
    rates = frr_at_far(trials)
    # 1e-3 of 2000 impostors = 2 may pass: the threshold is the 3rd smallest impostor distance; 0.1 0.2 accepted.
    assert rates["1e-3"]["threshold_l2"] == pytest.approx(trials.impostor[2], abs=1e-6)
    assert rates["1e-3"]["frr"] == 0.5
    assert rates["1e-4"] == rates["1e-5"] == rates["1e-6"] == {"frr": None, "threshold_l2": None}


@pytest.fixture(scope="module")
def small_lfw(tmp_path_factory, data_dir) -> Path:
    """Four LFW people with 4 photos each, one with a single photo, and a photo without a face."""
    root = tmp_path_factory.mktemp("lfw_small")
    for name in ("Ari_Fleischer", "Alvaro_Uribe", "Colin_Powell", "Donald_Rumsfeld", "AJ_Cook"):
        (root / name).mkdir()
        for photo in sorted((data_dir / "lfw_dev" / name).iterdir())[: 1 if name == "AJ_Cook" else 4]:
            (root / name / photo.name).symlink_to(photo)
    cv2.imwrite(str(root / "Colin_Powell" / "Colin_Powell_9999.jpg"), np.full((150, 150, 3), 128, np.uint8))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_cache")


def test_eval_templates_every_combination_from_one_pass(small_lfw, cache, tmp_path, models_dir):
    plot = tmp_path / "det.png"
    args = ["eval-templates", small_lfw, "--enrol-k", "1,2", "--probe-m", "1,2", "--cache", cache, "--config",
            CONFIG, "--json"]
    result = cli(*args, "--plot", plot)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["photos"], report["persons"], report["images_without_face"]) == (18, 5, 1)
    assert report["without_face"] == [str(small_lfw / "Colin_Powell" / "Colin_Powell_9999.jpg")]
    combos = {(r["enrol_k"], r["probe_m"]): r for r in report["results"]}
    assert set(combos) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    # K=1 M=1: 4 people × 3 probes, each against the 4 other gallery people (AJ_Cook is in the gallery only).
    assert (combos[1, 1]["genuine"], combos[1, 1]["impostor"]) == (12, 48)
    assert (combos[2, 2]["genuine"], combos[2, 2]["impostor"]) == (4, 16)
    assert combos[1, 1]["frr_at_far"]["1e-3"] == {"frr": None, "threshold_l2": None}  # 48 impostors: unresolvable
    assert set(combos[1, 1]["frr_at_far"]) == {"1e-3", "1e-4", "1e-5", "1e-6"}
    assert plot.read_bytes().startswith(b"\x89PNG")
    again = cli(*args)  # the second run reads the cache: same numbers, no embedding pass
    assert again.returncode == 0 and "from the cache" in again.stderr and "eval: " not in again.stderr
    assert json.loads(again.stdout)["results"] == report["results"]


def test_eval_templates_bad_input_is_one_line_and_exit_2(small_lfw, cache, tmp_path, models_dir):
    for bad in (["--enrol-k", "0"], ["--probe-m", "1,0"], ["--enrol-k", "x"]):
        result = cli("eval-templates", small_lfw, *bad)
        assert result.returncode == 2 and ("1 or more" in result.stderr or "whole numbers" in result.stderr)
    too_few = cli("eval-templates", small_lfw, "--enrol-k", "3", "--probe-m", "2", "--cache", cache,
                  "--config", CONFIG)
    assert too_few.returncode == 2
    assert too_few.stderr.strip().splitlines()[-1] == (
        f"error: {small_lfw}: nobody has 5 photos with a face (K + M) to probe with; 1 of 18 photos had no face")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("eval-templates", empty)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_centre_face_rule_picks_the_middle_face_not_the_largest(data_dir, models_dir, tmp_path):
    from edge.config import load_config
    from edge.evaluate.embedding import FACE_RULES, centre_face, largest_face
    from edge.pipeline import Pipeline

    lfw = data_dir / "lfw_dev"
    big = cv2.resize(cv2.imread(str(lfw / "Colin_Powell" / "Colin_Powell_0001.jpg")), (300, 300))
    small = cv2.imread(str(lfw / "Ari_Fleischer" / "Ari_Fleischer_0001.jpg"))
    canvas = np.full((300, 750, 3), 90, np.uint8)
    canvas[:, :300] = big
    canvas[75:225, 300:450] = small  # the smaller face sits in the middle
    photo = tmp_path / "two.jpg"
    cv2.imwrite(str(photo), canvas)
    pipeline = Pipeline(load_config(CONFIG))
    try:
        centre, largest = centre_face(pipeline, photo), largest_face(pipeline, photo)
        assert 300 < (centre.face.box[0] + centre.face.box[2]) / 2 < 450
        assert (largest.face.box[0] + largest.face.box[2]) / 2 < 300
        assert np.array_equal(FACE_RULES["centre"](pipeline, photo), centre.embedding)
    finally:
        pipeline.close()
