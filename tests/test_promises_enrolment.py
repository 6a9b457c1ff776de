"""The enrolment gates, pinned one by one: each quality gate (size, sharpness, frontal) at its documented boundary,
then the same gates through the real CLI and through button enrolment, and the duplicate check's threshold.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, AnalyzeFake, cli
from test_kiosk import ALICE, FRONTAL_LANDMARKS, SHARP_CHIP, embedding_of, face_of, frames, store  # noqa: F401
from test_store import nudged

from edge.config import Config, EnrollConfig
from edge.door import SimulatedDoor
from edge.kiosk import Kiosk
from edge.quality import quality_problem, quality_score, sharpness, yaw_ratio
from edge.store import Store
from edge.types import EmbeddedFace, Face

GATES = EnrollConfig()
SOFT_CHIP = cv2.GaussianBlur(SHARP_CHIP, (0, 0), 1)  # sharp enough (~280), but less sharp than SHARP_CHIP
FLAT_CHIP = np.full_like(SHARP_CHIP, 128)  # no detail at all: sharpness 0
NOSE = 4


def face(*, width_px: float = 200.0, chip: np.ndarray = SHARP_CHIP, nose_shift_px: float = 0.0,
         embedding: np.ndarray | None = None) -> EmbeddedFace:
    """A face (FRONTAL_LANDMARKS: eyes 60 px apart) changed in one respect; the nose moves along the eye line."""
    landmarks = FRONTAL_LANDMARKS.copy()
    landmarks[NOSE, 0] += nose_shift_px
    box = (100.0, 100.0, 100.0 + width_px, 100.0 + width_px)
    return EmbeddedFace(Face(box, 0.99, landmarks), chip, embedding_of(7) if embedding is None else embedding)


def gates(**changes) -> EnrollConfig:
    return EnrollConfig.model_validate({**GATES.model_dump(), **changes})


# ---- each gate at its boundary -----------------------------------------------------------------------------------


def test_a_good_face_passes_every_gate():
    assert quality_problem(face(), GATES) is None


def test_size_gate_at_its_boundary():
    assert quality_problem(face(width_px=GATES.min_face_px), GATES) is None, "exactly the minimum width is enough"
    problem = quality_problem(face(width_px=GATES.min_face_px - 0.5), GATES)
    assert problem == f"face too small (80 px wide, need {GATES.min_face_px}): come closer or use a larger photo"


def test_sharpness_is_the_variance_of_the_laplacian_of_the_grey_chip():
    dot = np.zeros_like(SHARP_CHIP)
    dot[75, 75] = 255  # one white pixel: the Laplacian is -4·255 there and 255 at its 4 neighbours, 0 elsewhere
    assert sharpness(dot) == pytest.approx(20 * 255**2 / dot[..., 0].size)


def test_sharpness_gate_at_its_boundary():
    score = sharpness(SOFT_CHIP)
    assert GATES.min_sharpness < score < sharpness(SHARP_CHIP)
    assert quality_problem(face(chip=SOFT_CHIP), gates(min_sharpness=score)) is None, "exactly the minimum is enough"
    problem = quality_problem(face(chip=SOFT_CHIP), gates(min_sharpness=math.nextafter(score, math.inf)))
    assert problem is not None and problem.startswith(f"face too blurred (sharpness {score:.0f}, need")
    assert quality_problem(face(chip=FLAT_CHIP), GATES) == (
        "face too blurred (sharpness 0, need 10): hold still, add light")


@pytest.mark.parametrize("side", [1, -1], ids=["nose_right", "nose_left"])
def test_frontal_gate_at_its_boundary(side):
    # eyes 60 px apart: a nose 15 px off the eyes' midpoint is a yaw ratio of exactly 0.25, the default limit
    assert yaw_ratio(face(nose_shift_px=15 * side).face.landmarks) == GATES.max_yaw_ratio == 0.25
    assert quality_problem(face(nose_shift_px=15 * side), GATES) is None, "exactly the limit is still frontal"
    assert quality_problem(face(nose_shift_px=16 * side), GATES) == (
        "face not frontal enough (yaw 0.27, limit 0.25): look at the camera")


def test_yaw_is_measured_along_the_eye_line_only():
    frontal = face().face.landmarks
    assert yaw_ratio(frontal) == 0.0
    lower_nose = frontal.copy()
    lower_nose[NOSE, 1] += 40  # a longer face, not a turned one
    assert yaw_ratio(lower_nose) == 0.0
    rotated = frontal @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # the whole face turned 90° in the image plane
    assert yaw_ratio(rotated) == pytest.approx(0.0, abs=1e-12)
    closed = frontal.copy()
    closed[[0, 1, 2, 3]] = frontal[[2, 3, 2, 3]]  # both eyes on one point: no eye line, never frontal
    assert yaw_ratio(closed) == math.inf
    assert quality_problem(face(), gates(max_yaw_ratio=0.0)) is None


@pytest.mark.parametrize(("worse", "better"), [
    ({"width_px": 120.0}, {"width_px": 200.0}),
    ({"chip": SOFT_CHIP}, {"chip": SHARP_CHIP}),
    ({"nose_shift_px": 12.0}, {"nose_shift_px": 3.0}),
], ids=["bigger", "sharper", "more_frontal"])
def test_quality_score_ranks_bigger_sharper_more_frontal_first(worse, better):
    assert quality_score(face(**better)) > quality_score(face(**worse)) > 0


def test_quality_score_of_a_face_turned_past_the_eye_distance_is_zero():
    assert quality_score(face(nose_shift_px=60)) == 0.0 == quality_score(face(nose_shift_px=-90))


# ---- the gates in the CLI ------------------------------------------------------------------------------------------

OBAMA = ROOT / "samples" / "photos" / "obama.jpg"  # ~240 px wide, sharpness ~1100, yaw ~0.01


@pytest.mark.parametrize(("tightened", "reason"), [
    ({"min_face_px": 400}, "face too small"),
    ({"min_sharpness": 5000.0}, "face too blurred"),
    ({"max_yaw_ratio": 0.0}, "face not frontal enough"),
], ids=["size", "sharpness", "frontal"])
def test_cli_enrolment_applies_each_gate(tmp_path, models_dir, tightened, reason):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"enroll": tightened}))
    store = tmp_path / "gates.edgestore"
    result = cli("enroll", "obama", OBAMA, "--store", store, "--config", config)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert reason in line and str(OBAMA) in line
    assert not store.exists(), "nothing enrolled, nothing written"


# ---- the gates in button enrolment -----------------------------------------------------------------------------------

SMALL, BLURRED, TURNED, GOOD, BETTER = 10, 11, 12, 13, 14
GATE_FACES = {
    SMALL: face(width_px=GATES.min_face_px - 1, embedding=embedding_of(SMALL)),
    BLURRED: face(chip=FLAT_CHIP, embedding=embedding_of(BLURRED)),
    TURNED: face(width_px=400.0, nose_shift_px=18.0, embedding=embedding_of(TURNED)),  # would outscore BETTER
    GOOD: face(width_px=120.0, embedding=embedding_of(GOOD)),
    BETTER: face(width_px=220.0, embedding=embedding_of(BETTER)),
}


class GatePipeline(AnalyzeFake):
    """analyze(image) → the face of GATE_FACES (or test_kiosk's face_of) whose code fills the image."""

    def __init__(self, extra: dict[int, EmbeddedFace] | None = None) -> None:
        self.faces = {**GATE_FACES, **(extra or {})}

    def analyze(self, image: np.ndarray) -> list[EmbeddedFace]:
        code = int(image[0, 0, 0])
        return [self.faces[code] if code in self.faces else face_of(code)]


def button_enrolment(store: Store, codes: list[int], *, config: Config | None = None, pipeline=None):
    """Press the button at the first frame (set-up mode: anyone may) and watch len(codes) frames."""
    config = config or Config.model_validate({"enroll": {"capture_frames": len(codes)}})
    door = SimulatedDoor()
    events: list[dict] = []
    kiosk = Kiosk(config=config, pipeline=pipeline or GatePipeline(), store=store, door=door, emit=events.append,
                  press_button_at={0})
    for frame in frames(codes):
        kiosk.step(frame)
    confirms = [action for _, action in door.history if action.startswith("confirm")]
    return [e for e in events if e["event"].startswith("enrol")], confirms


@pytest.mark.parametrize("code", [SMALL, BLURRED, TURNED], ids=["small", "blurred", "turned"])
def test_button_enrolment_refuses_a_face_failing_any_one_gate(store, code):
    events, confirms = button_enrolment(store, [code] * 3)
    assert [(e["event"], e["frame"], e.get("reason")) for e in events] == [
        ("enroll_started", 0, None), ("enroll_refused", 2, "no face good enough (size, sharpness, frontal)")]
    assert confirms == []
    assert [p.name for p in Store.open(store.path, fingerprint=store.fingerprint).persons] == ["alice"]


def test_button_enrolment_takes_the_best_face_that_passes_the_gates(store):
    events, confirms = button_enrolment(store, [SMALL, GOOD, BLURRED, BETTER, TURNED, GOOD])
    assert [(e["event"], e["frame"]) for e in events] == [("enroll_started", 0), ("enrolled", 5)]
    assert confirms == ["confirm x1"]
    stored = Store.open(store.path, fingerprint=store.fingerprint)
    # the best face first, then the next best that is not a duplicate (GOOD twice is one row; enroll.button_rows)
    np.testing.assert_allclose(stored.embeddings(events[1]["person"]), np.stack([embedding_of(BETTER), embedding_of(GOOD)]),
                               atol=1e-6)


def test_button_enrolment_duplicate_check_refuses_only_closer_than_the_threshold(store):
    newcomer = 20
    lookalike = face(embedding=nudged(embedding_of(ALICE), np.random.default_rng(1), 0.3).astype(np.float32))
    distance = store.nearest(lookalike.embedding)[1]
    pipeline = GatePipeline({newcomer: lookalike})
    for threshold_l2, outcome in [(math.nextafter(distance, math.inf), "enroll_refused"), (distance, "enrolled")]:
        config = Config.model_validate({"enroll": {"capture_frames": 1}, "match": {"threshold_l2": threshold_l2}})
        events, _ = button_enrolment(store, [newcomer], config=config, pipeline=pipeline)
        assert events[-1]["event"] == outcome, threshold_l2
        if outcome == "enroll_refused":
            assert events[-1]["reason"] == "already enrolled as alice"
            assert events[-1]["distance_l2"] == round(distance, 4) != round(distance, 5)
    assert events[-1]["person"] != "alice"
    assert len(Store.open(store.path, fingerprint=store.fingerprint)) == 2
