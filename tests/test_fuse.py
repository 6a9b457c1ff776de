"""Track fusion: a track's quality-weighted fused embedding decides, so a stranger's lucky frames never open the door."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import AnalyzeFake
from edge.config import Config, DecideConfig, LivenessConfig
from edge.decide import Decider
from edge.door import SimulatedDoor
from edge.fuse import TrackTemplate
from edge.kiosk import Kiosk
from edge.store import Store
from edge.types import EmbeddedFace, Face, Frame

BOX = (100.0, 100.0, 260.0, 280.0)  # 160 px wide: full size weight
FRONTAL_LANDMARKS = np.array([[220, 170], [200, 170], [160, 170], [140, 170], [180, 215]], np.float64)
SHARP_CHIP = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
FRAMES = 150
FPS = 25.0


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_track_template_fuses_the_last_frames_by_weight():
    a, b = unit(np.eye(128)[0]), unit(np.eye(128)[1])
    template = TrackTemplate(window_frames=3)
    template.add(b, 0.0)
    assert template.vector() is None and template.frames == 0  # a side-on frame alone counts for nothing
    template.add(a, 1.0)
    assert np.allclose(template.vector(), a)
    template.add(b, 1.0)
    assert np.allclose(template.vector(), unit(a + b))
    template.add(b, 1.0)  # the window is full: the zero-weight b left, the a stays
    template.add(b, 1.0)  # now a has left too
    assert np.allclose(template.vector(), b) and template.frames == 3


class ScriptedFaces(AnalyzeFake):
    """analyze(image) → one frontal, sharp face whose embedding is script[frame index] (the image carries the index)."""

    def __init__(self, script: np.ndarray) -> None:
        self.script = script

    def analyze(self, image: np.ndarray) -> list[EmbeddedFace]:
        vector = self.script[int(image[0, 0, 0])]
        return [EmbeddedFace(Face(BOX, 0.99, FRONTAL_LANDMARKS), SHARP_CHIP, vector)]


@pytest.fixture
def world(tmp_path):
    """A store with Ann (the template the stranger resembles) and two others; the stranger's frames: a face
    0.36 from Ann that light and expression push toward her or away, frame by frame."""
    rng = np.random.default_rng(3)
    ann = unit(rng.standard_normal(128))
    store = Store.open(tmp_path / "s.edgestore", fingerprint="test")
    with store.edit():
        store.add_person("ann", ann)
        store.add_person("bob", unit(rng.standard_normal(128)))
        store.add_person("cy", unit(rng.standard_normal(128)))
    side = rng.standard_normal(128)
    side -= side @ ann * ann
    stranger = unit(ann + 0.37 * side / np.linalg.norm(side))
    pull = rng.normal(0.0, 0.2, FRAMES)  # toward Ann (> 0) or away, per frame
    frames = np.stack([unit(stranger + p * (ann - stranger) + 0.004 * rng.standard_normal(128)) for p in pull])
    return store, ann, stranger, frames


def run_door(store: Store, script: np.ndarray, config: Config, emit=None) -> tuple[Kiosk, list]:
    """The real door loop over the scripted frames: the kiosk and each frame's (fused) match. The frames are flat
    4×4 images with no face to show depth, so liveness (tested in test_liveness.py) is off: these tests are about
    what recognition alone decides."""
    config = config.model_copy(update={"liveness": LivenessConfig(mode="off")})
    kiosk = Kiosk(config=config, pipeline=ScriptedFaces(script), store=store, door=SimulatedDoor(pulse_s=0.2), emit=emit)
    matches = []
    for i in range(len(script)):
        kiosk.step(Frame(np.full((4, 4, 3), i, np.uint16), index=i, t_s=i / FPS))
        matches += kiosk.last_matches
    return kiosk, matches


def test_a_stranger_whose_single_frames_sometimes_pass_never_unlocks(world):
    store, ann, stranger, frames = world
    config = Config()
    threshold = config.match.threshold_l2
    assert float(np.linalg.norm(stranger - ann)) == pytest.approx(0.36, abs=0.01)
    single = store.match(frames, threshold_l2=threshold, margin_l2=config.match.margin_l2)
    lucky = [i for i, m in enumerate(single) if m.person == "ann"]
    assert len(lucky) >= 10, "the stranger's single frames must sometimes pass the threshold"
    # Deciding frame by frame, those lucky frames do open the door for him:
    per_frame = Decider(config.decide)
    opened = [d for i, m in enumerate(single) for d in per_frame.update([(BOX, m)], i, i / FPS) if d.event == "unlock"]
    assert opened, "with per-frame decisions the stranger would get in"
    # The door loop decides on the track's fused embedding: it passes a tenth as often as single frames do, and
    # never `votes_needed` times within the vote window, so the door stays shut.
    kiosk, fused = run_door(store, frames, config)
    assert kiosk.counts["unlock"] == 0
    passed = np.array([m.person == "ann" for m in fused])
    assert passed.sum() <= len(lucky) / 10
    window = config.decide.window_frames
    assert max(passed[i:i + window].sum() for i in range(FRAMES)) < config.decide.votes_needed
    assert np.median([m.distance_l2 for m in fused]) > threshold + 0.03


def test_ann_herself_with_the_same_frame_to_frame_noise_unlocks_once(world):
    store, ann, stranger, frames = world
    offset = frames - stranger  # the same variation around her own face
    kiosk, _ = run_door(store, np.stack([unit(ann + d) for d in offset]), Config())
    assert kiosk.counts["unlock"] == 1


def test_fuse_frames_1_is_the_frame_alone(world):
    store, ann, stranger, frames = world
    config = Config(decide=DecideConfig(fuse_frames=1))
    assert run_door(store, frames, config)[0].counts["unlock"] >= 1  # what fusion protects against


# ---- button enrolment keeps the best distinct frames; template auto-update -------------------------------------


def test_button_enrolment_keeps_the_best_few_distinct_frames():
    from edge.kiosk import best_distinct

    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal(128))
    def face(vector, width):
        return EmbeddedFace(Face((0.0, 0.0, width, width), 0.99, FRONTAL_LANDMARKS), SHARP_CHIP, vector)
    near_duplicate = unit(base + 0.001 * rng.standard_normal(128))
    other = unit(base + 0.02 * rng.standard_normal(128))
    candidates = [(face(base, 200.0), 41), (face(near_duplicate, 190.0), 42), (face(other, 150.0), 43)]
    chosen = best_distinct(candidates, 3)
    assert [index for _, index in chosen] == [41, 43]  # the best, then the next one that is not a duplicate of it
    assert [index for _, index in best_distinct(candidates, 1)] == [41]


def ann_in_new_light(world, shift_l2: float) -> np.ndarray:
    """Ann's frames moved `shift_l2` away from her enrolled row (a new condition), with small frame noise."""
    store, ann, stranger, frames = world
    rng = np.random.default_rng(11)
    side = rng.standard_normal(128)
    side -= side @ ann * ann
    moved = unit(ann + shift_l2 * side / np.linalg.norm(side))
    return np.stack([unit(moved + 0.002 * rng.standard_normal(128)) for _ in range(30)])


def test_auto_update_adds_a_new_condition_once_logged_and_reversible(world):
    store = world[0]
    frames = ann_in_new_light(world, 0.16)
    assert run_door(store, frames, Config())[0].counts["template_updated"] == 0  # off by default
    assert len(store.rows("ann")) == 1
    config = Config.model_validate({"enroll": {"auto_update": True, "auto_update_max_rows": 1},
                                    "decide": {"cooldown_s": 0.0}})
    kiosk, _ = run_door(store, frames, config)
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 1
    rows = store.rows("ann")
    assert [r.source for r in rows] == ["enrolment", "auto-update, track 1"]
    # the cap: a second visit in another new condition adds nothing more
    assert run_door(store, ann_in_new_light(world, 0.2), config)[0].counts["template_updated"] == 0
    with store.edit():
        store.forget_row("ann", 1)  # reversible
    assert [r.source for r in store.rows("ann")] == ["enrolment"]


def test_auto_update_skips_a_visit_that_looks_like_the_enrolment(world):
    store = world[0]
    config = Config.model_validate({"enroll": {"auto_update": True}})
    kiosk, _ = run_door(store, ann_in_new_light(world, 0.05), config)
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 0
