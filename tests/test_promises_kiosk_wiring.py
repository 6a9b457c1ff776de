"""What the door loop hands on, pinned where the loop makes it: the liveness verdict of each track gating its unlock
(a turning head passes, a turning picture of the same person fails), the frame by frame feed of the surfaces (the
unknown-face inbox, the live view), every event's common keys, button enrolment's events and row sources, the
template auto-update's event and its logged failure, and the store reload's log line."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import AnalyzeFake
from test_fuse import BOX as FUSE_BOX
from test_fuse import FRONTAL_LANDMARKS, ann_in_new_light, run_door, world  # noqa: F401  (world: a fixture)
from test_kiosk import ALICE, CAROL, FAKES_CONFIG, SHARP_CHIP, FakePipeline, embedding_of, frames, store  # noqa: F401
from test_liveness import FACE_BOX, FPS, TURN_DEG_PER_S, rendered
from test_promises_kiosk import HandClock, kiosk_on

from edge.config import Config, LivenessConfig
from edge.door import SimulatedDoor
from edge.kiosk import Kiosk
from edge.store import ABSENT_DISTANCE_L2, Store
from edge.types import EmbeddedFace, Face, Frame

# ---- liveness gates the unlock, per track -------------------------------------------------------------------------


class AliceOnEveryFrame(AnalyzeFake):
    """analyze(image) → Alice's face in FACE_BOX, whatever the image shows (the rendered head or its picture)."""

    def analyze(self, image: np.ndarray) -> list[EmbeddedFace]:
        return [EmbeddedFace(Face(FACE_BOX, 0.99), SHARP_CHIP, embedding_of(ALICE))]


def turning(store, *, curved: bool) -> tuple[list[dict], SimulatedDoor]:
    events: list[dict] = []
    door = SimulatedDoor()
    kiosk = Kiosk(config=Config(), pipeline=AliceOnEveryFrame(), store=store, door=door, emit=events.append)
    count = int(1.2 * FPS)
    for i in range(count):
        kiosk.step(Frame(rendered(np.radians(TURN_DEG_PER_S) * (i - count / 2) / FPS, curved=curved), i, i / FPS))
    return events, door


def test_the_blink_cue_loads_its_models_from_the_configured_models_dir(store, tmp_path):
    """config.models_dir is where every model comes from, the liveness cue's too (not the default folder)."""
    from edge.errors import ModelError

    config = Config(models_dir=tmp_path, liveness=LivenessConfig(mode="blink"))
    with pytest.raises(ModelError, match=str(tmp_path)):
        Kiosk(config=config, pipeline=AliceOnEveryFrame(), store=store, door=SimulatedDoor())


def test_a_turning_head_unlocks_once_its_track_shows_depth(store):
    events, door = turning(store, curved=True)
    [unlock] = [e for e in events if e["event"] == "unlock"]
    assert unlock["person"] == "alice" and unlock["liveness"] == "pass" and unlock["frame"] > 0
    assert unlock["liveness_evidence"]["parallax"] >= LivenessConfig().min_parallax
    assert [action for _, action in door.history] == ["unlock"]


def test_a_turning_picture_of_an_enrolled_person_keeps_the_door_shut(store):
    events, door = turning(store, curved=False)
    assert [(e["event"], e["person"], e["liveness"], e["door"]) for e in events] == [
        ("liveness_fail", "alice", "fail", "none")]
    assert events[0]["liveness_evidence"]["parallax"] < LivenessConfig().min_parallax
    assert door.history == []
    refused = events[0]  # on the frame the verdict turned: Alice's own vote, on her own track
    assert (refused["t_s"], refused["track"], refused["distance_l2"], refused["margin_l2"]) == (
        refused["frame"] / FPS, 1, 0.0, ABSENT_DISTANCE_L2)
    assert refused["votes"] == Config().decide.window_frames


# ---- what the surfaces are fed, every frame -----------------------------------------------------------------------


class RecordingFeed:
    """Stands where the unknown-face inbox and the live view plug in; keeps what the loop hands over."""

    def __init__(self) -> None:
        self.observed: list[tuple] = []
        self.updated: list[tuple] = []

    def observe(self, frame, faces, matches, tracks) -> None:
        self.observed.append((frame, faces, matches, tracks))

    def update(self, frame, faces, matches, *, door_unlocked: bool, counts: dict, fps: float) -> None:
        self.updated.append((frame, faces, matches, door_unlocked, dict(counts), fps))


def test_every_frame_feeds_the_inbox_and_the_live_view(store):
    clock, inbox, live = HandClock(), RecordingFeed(), RecordingFeed()
    kiosk = Kiosk(config=FAKES_CONFIG, pipeline=FakePipeline(), store=store, door=SimulatedDoor(clock=clock),
                  clock=clock, unknown=inbox, live=live)
    shown = []
    for frame in frames([ALICE] * 4 + [CAROL]):
        kiosk.step(frame)
        shown.append((frame, kiosk.last_faces, kiosk.last_matches, kiosk.recent_fps()))
        clock.now += 0.1
    assert len(inbox.observed) == len(live.updated) == 5
    for (frame, faces, matches, fps), observed, updated in zip(shown, inbox.observed, live.updated):
        assert observed[0] is frame and observed[1] is faces and observed[3] is kiosk.decider.tracks
        assert updated[:3] == (frame, faces, matches) and updated[5] == pytest.approx(fps)
        assert all(face.face is not None and face.face.box for face in faces)
    persons = [[[None if m is None else m.person for m in call[2]] for call in feed] for feed in (inbox.observed,
                                                                                                  live.updated)]
    assert persons[0] == [["alice"]] * 3 + [[None], [None]], "the inbox: this frame's matches (none once decided)"
    assert persons[1] == [["alice"]] * 4 + [[None]], "the live view: what the loop shows (the decided track's match)"
    assert [(unlocked, counts.get("unlock", 0)) for _, _, _, unlocked, counts, _ in live.updated] == [
        (False, 0), (False, 0), (True, 1), (True, 1), (True, 1)]
    assert live.updated[-1][5] == pytest.approx(10.0)


# ---- events ------------------------------------------------------------------------------------------------------


def test_every_event_carries_person_and_distance_and_button_enrolment_reports_what_it_stored(store):
    config = Config.model_validate({**FAKES_CONFIG.model_dump(), "enroll": {"capture_frames": 2}})
    kiosk, events = kiosk_on(store, HandClock(), config=config, press_button_at={0})
    for frame in frames([CAROL] * 2, start_index=0):
        kiosk.step(frame)
    started, enrolled = events[0], events[-1]
    assert started == {"event": "enroll_started", "person": None, "frame": 0, "t_s": 0.0, "distance_l2": None,
                       "frames": 2}
    assert (enrolled["event"], enrolled["distance_l2"], enrolled["rows"]) == ("enrolled", None, 1)
    [row] = kiosk.store.rows(enrolled["person"])
    assert row.source.startswith("button, frame ")


def test_a_store_reload_is_logged_with_the_new_head_count(store, caplog):
    caplog.set_level(logging.INFO, logger="edge.kiosk")
    clock = HandClock()
    kiosk, _ = kiosk_on(store, clock)
    kiosk.step(frames([CAROL])[0])
    with Store.open(store.path, fingerprint=store.fingerprint).edit() as other:
        other.add_person("carol", embedding_of(CAROL)[None, :])
    clock.now += 60.0
    kiosk.step(frames([CAROL], start_index=1)[0])
    assert "event=store_reloaded people=2" in [r.getMessage() for r in caplog.records]


# ---- template auto-update ------------------------------------------------------------------------------------------

AUTO_UPDATE = {"enroll": {"auto_update": True, "auto_update_max_rows": 1}, "decide": {"cooldown_s": 0.0}}


def test_a_template_update_reports_the_row_and_both_distances(world):
    store = world[0]
    events: list[dict] = []
    kiosk, _ = run_door(store, ann_in_new_light(world, 0.16), Config.model_validate(AUTO_UPDATE), emit=events.append)
    [unlock] = [e for e in events if e["event"] == "unlock"]
    [update] = [e for e in events if e["event"] == "template_updated"]
    assert (update["person"], update["row"], update["distance_l2"]) == ("ann", 1, unlock["distance_l2"])
    assert update["new_condition_l2"] == round(update["new_condition_l2"], 4) and 0.1 < update["new_condition_l2"] < 0.2
    assert len(str(update["new_condition_l2"]).split(".")[1]) == 4


def test_a_failed_template_update_is_logged_and_the_door_still_opens(world, monkeypatch, caplog):
    store = world[0]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "add_embeddings", disk_full)
    caplog.set_level(logging.ERROR, logger="edge.kiosk")
    kiosk, _ = run_door(store, ann_in_new_light(world, 0.16), Config.model_validate(AUTO_UPDATE))
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        "event=template_update_failed person=ann error=OSError: [Errno 28] No space left on device"]


def test_an_unlock_reports_distance_and_margin_to_4_decimals(world):
    events: list[dict] = []
    _, matches = run_door(world[0], ann_in_new_light(world, 0.16), Config(), emit=events.append)
    [unlock] = [e for e in events if e["event"] == "unlock"]
    decided = matches[unlock["frame"]]  # the fused match the decision was taken on
    for key in ("distance_l2", "margin_l2"):
        assert getattr(decided, key) != round(getattr(decided, key), 4), "the test needs more than 4 decimals"
        assert unlock[key] == round(getattr(decided, key), 4), key


def test_an_unlock_far_from_the_template_does_not_update_it(world):
    config = Config.model_validate({"enroll": {**AUTO_UPDATE["enroll"], "auto_update_max_l2": 0.1},
                                    "decide": AUTO_UPDATE["decide"]})
    kiosk, _ = run_door(world[0], ann_in_new_light(world, 0.16), config)
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 0


def test_a_template_update_never_exceeds_max_rows_nor_pushes_out_an_enrolled_row(world):
    store, ann = world[0], world[1]
    far = ann_in_new_light(world, 0.6)[0]  # an automatic row in a condition of its own, far from this visit
    with store.edit():
        store.add_embeddings("ann", far, sources="auto-update, track 9")
    kiosk, _ = run_door(store, ann_in_new_light(world, 0.16), Config.model_validate(AUTO_UPDATE))
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 0, "auto_update_max_rows is 1"
    full = Config.model_validate({"enroll": {**AUTO_UPDATE["enroll"], "auto_update_max_rows": 2,
                                             "max_embeddings_per_person": 2}, "decide": AUTO_UPDATE["decide"]})
    kiosk, _ = run_door(store, ann_in_new_light(world, 0.16), full)
    assert kiosk.counts["unlock"] == 1 and kiosk.counts["template_updated"] == 0, "ann's 2 rows are all she keeps"
    assert [r.source for r in store.rows("ann")] == ["enrolment", "auto-update, track 9"]


def test_before_the_first_frame_nothing_is_shown(store):
    kiosk, _ = kiosk_on(store, HandClock())
    assert kiosk.last_faces == [] and kiosk.last_matches == []


class DistinctFaces(AnalyzeFake):
    """analyze(image) → one frontal, sharp face whose embedding differs from every other frame's (the image carries
    the frame index): a capture in which every frame is a distinct candidate."""

    def analyze(self, image: np.ndarray) -> list[EmbeddedFace]:
        return [EmbeddedFace(Face(FUSE_BOX, 0.99, FRONTAL_LANDMARKS), SHARP_CHIP, np.eye(128)[int(image[0, 0, 0])])]


def test_button_enrolment_keeps_button_rows_of_the_distinct_faces_it_saw(store):
    config = Config.model_validate({**FAKES_CONFIG.model_dump(), "enroll": {"capture_frames": 5, "button_rows": 2}})
    events: list[dict] = []
    kiosk = Kiosk(config=config, pipeline=DistinctFaces(), store=store, door=SimulatedDoor(), emit=events.append,
                  press_button_at={0})
    for i in range(5):
        kiosk.step(Frame(np.full((4, 4, 3), i + 1, np.uint8), i, i / FPS))
    [enrolled] = [e for e in events if e["event"] == "enrolled"]
    assert enrolled["rows"] == 2 and len(kiosk.store.rows(enrolled["person"])) == 2
