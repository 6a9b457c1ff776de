"""eval-templates and calibrate --folder: the K/M protocol on hand-built vectors, FRR@FAR resolution, security-level
thresholds per regime, and both commands on a few LFW people (one shared embedding cache)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import SECURITY_LEVELS
from edge.evaluate.calibrate import regime_levels, security_thresholds
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


def noisy_people(persons: int, photos_each: int, seed: int = 3) -> list[tuple[int, np.ndarray]]:
    """Synthetic people: each photo a noisy copy of the person's random direction (unit vectors)."""
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(persons):
        base = rng.standard_normal(128)
        for _ in range(photos_each):
            vector = base + 0.6 * rng.standard_normal(128)
            rows.append((person, (vector / np.linalg.norm(vector)).astype(np.float32)))
    return rows


def test_security_levels_are_the_far_quantiles_of_the_regime_trials():
    rows = noisy_people(persons=80, photos_each=3)
    vectors = np.stack([v for _, v in rows]).astype(np.float64)
    p = photos(rows)
    one = regime_levels(p, enrol_k=1, probe_m=1)
    # Worked out independently: K=1 enrols photo 0 of each person, photos 1 and 2 probe alone against all 80.
    gallery, probes = np.arange(0, 240, 3), np.array([i for i in range(240) if i % 3])
    l2 = np.linalg.norm(vectors[probes][:, None, :] - vectors[gallery][None, :, :], axis=2)
    own = (probes // 3)[:, None] == np.arange(80)[None, :]
    genuine, impostor = l2[own], np.sort(l2[~own])
    assert (one["genuine"], one["impostor"]) == (160, 160 * 79)
    standard, high = one["levels"]["standard"], one["levels"]["high"]
    # FAR 1e-4 of 12,640 impostor trials allows 1 below the threshold: the 2nd smallest, rounded down to 4 decimals.
    assert standard["target_far"] == SECURITY_LEVELS["standard"][0] and standard["measurable"]
    assert standard["threshold_l2"] == pytest.approx(np.floor(impostor[1] * 1e4) / 1e4, abs=1e-4)
    assert standard["frr"] == pytest.approx(np.mean(genuine >= standard["threshold_l2"]), abs=1 / 160)
    # 1e-5 would need 100,000 impostor trials: the smallest impostor distance, flagged as not measurable.
    assert not high["measurable"] and high["threshold_l2"] == pytest.approx(np.floor(impostor[0] * 1e4) / 1e4, abs=1e-4)
    two = regime_levels(p, enrol_k=2, probe_m=1)
    assert (two["genuine"], two["impostor"]) == (80, 80 * 79)
    levels = security_thresholds([one, two])
    for level in SECURITY_LEVELS:  # the strictest regime decides, and a level is measurable only if it is everywhere
        pair = (one["levels"][level], two["levels"][level])
        assert levels[level]["threshold_l2"] == min(row["threshold_l2"] for row in pair)
        assert levels[level]["measurable"] == all(row["measurable"] for row in pair)
    assert one["levels"]["standard"]["measurable"] and not levels["standard"]["measurable"]  # K=2: 6,320 trials
    assert regime_levels(p, enrol_k=2, probe_m=2) is None  # nobody has 4 photos


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
    assert report["face"] == "centre" and "face rule centre (the face nearest the image centre" in result.stderr
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


def test_calibrate_folder_gives_every_security_level_for_the_regime(small_lfw, cache, tmp_path, models_dir):
    args = ["--cache", cache, "--config", CONFIG, "--json"]
    templates = cli("eval-templates", small_lfw, "--enrol-k", "1,2", "--probe-m", "1", *args)
    result = cli("calibrate", "--folder", small_lfw, "--enrol-k", "1,2", "--probe-m", "1", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["photos"], report["images_without_face"], report["face"]) == (18, 1, "centre")  # as eval-templates
    # the same trials as eval-templates: K=1 M=1 12 genuine / 48 impostor, K=2 M=1 8 / 32
    assert [(r["enrol_k"], r["probe_m"], r["genuine"], r["impostor"]) for r in report["regimes"]] == \
        [(r["enrol_k"], r["probe_m"], r["genuine"], r["impostor"]) for r in json.loads(templates.stdout)["results"]]
    assert set(report["levels"]) == set(SECURITY_LEVELS)
    for level, row in report["levels"].items():
        assert row["threshold_l2"] == min(r["levels"][level]["threshold_l2"] for r in report["regimes"])
        assert not row["measurable"] and row["impostor_pairs"] == 32  # 32 trials resolve no level
    assert "match.security high (FAR 1e-5): threshold_l2" in result.stderr and "cannot show FAR 1e-5" in result.stderr


def test_calibrate_folder_write_uses_the_configured_level_and_refuses_an_unmeasurable_far(small_lfw, cache, tmp_path,
                                                                                         models_dir):
    config_file = tmp_path / "config.yaml"
    for security, far in (("high", "1e-05"), ("standard", "0.0001")):
        config_file.write_text(CONFIG.read_text().replace("security: high", f"security: {security}"))
        result = cli("calibrate", "--folder", small_lfw, "--cache", cache, "--write", "--config", config_file)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: not writing {config_file}: 48 impostor pairs cannot show a FAR of {far} (need at least "
            f"{round(1 / float(far))})")
        assert not (tmp_path / "config.yaml.bak").exists()


def test_calibrate_folder_bad_input_is_one_line_and_exit_2(small_lfw, cache, models_dir):
    for bad, says in ((["--folder", small_lfw, "--enrol-k", "0"], "every value must be 1 or more"),
                      (["--folder", small_lfw, "--probe-m", "1,x"], "whole numbers"),
                      (["--folder", small_lfw, "--target-far", "1e-4"], "--target-far goes with --pairs or --store"),
                      (["--store", "absent.edgestore", "--enrol-k", "2"], "--enrol-k goes with --folder"),
                      (["--folder", small_lfw, "--enrol-k", "3", "--probe-m", "2", "--cache", cache,
                        "--config", CONFIG],
                       f"error: {small_lfw}: nobody has 5 photos with a face (K + M) to probe with; 1 of 18 photos "
                       "had no face")):
        result = cli("calibrate", *bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert says in result.stderr.strip().splitlines()[-1]
        assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
