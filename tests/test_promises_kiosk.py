"""What the loop reports, pinned in process with a hand-set clock: face-first-visible → relay-on latency, the run
summary and recent fps, where a camera loss is placed in time, and a button enrolment whose store write fails."""
from __future__ import annotations

import logging
import signal

import pytest
from test_kiosk import (  # noqa: F401  (store: a fixture, alice enrolled)
    ALICE, CAROL, FAKES_CONFIG, LOST, NO_LIVENESS, NOBODY, FakeNotifier, FakePipeline, ScriptedSource, embedding_of,
    frames, image_of, store,
)

import edge.store
from edge.audit import AuditLog
from edge.config import Config
from edge.door import SimulatedDoor
from edge.kiosk import RECENT_FRAMES, STORE_CHECK_S, Kiosk, StopRequest
from edge.store import Store
from edge.types import Frame


class HandClock:
    """time.monotonic as the test sets it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kiosk_on(store, clock: HandClock, *, config: Config | None = None, press_button_at=()) -> tuple[Kiosk, list]:
    events: list[dict] = []
    kiosk = Kiosk(config=config or FAKES_CONFIG, pipeline=FakePipeline(), store=store, door=SimulatedDoor(),
                  emit=events.append, clock=clock, press_button_at=set(press_button_at))
    return kiosk, events


def test_unlock_latency_runs_from_the_face_first_seen_to_the_relay_and_is_summarised(store):
    clock = HandClock()
    with store.edit():
        store.add_person("carol", embedding_of(CAROL)[None, :])
    kiosk, events = kiosk_on(store, clock)
    walls = [0.0, 0.03, 0.08334, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.72004]  # frames 2 and 9 unlock, 3 after a face
    for frame, wall in zip(frames([ALICE] * 3 + [NOBODY] * 4 + [CAROL] * 3), walls):
        clock.now = 1000.0 + wall
        kiosk.step(frame)
    unlocks = [(e["person"], e["latency_ms"], e["frames_to_decide"]) for e in events]
    assert unlocks == [("alice", 83.3, 3), ("carol", 120.0, 3)]
    assert kiosk.latencies_ms == pytest.approx([83.34, 120.04])
    assert kiosk.summary(10, 0.6) == {"frames": 10, "fps": 16.7, "unlock_events": 2,
                                      "latency_ms_median": pytest.approx(101.7), "latency_ms_max": pytest.approx(120.0)}


def test_summary_without_unlocks_or_time():
    kiosk, _ = kiosk_on(None, HandClock())
    assert kiosk.summary(0, 0.0) == {"frames": 0, "fps": 0.0}


def test_recent_fps_looks_at_the_last_frames_only(store):
    clock = HandClock()
    kiosk, _ = kiosk_on(store, clock)
    assert kiosk.recent_fps() == 0.0
    kiosk.step(frames([NOBODY])[0])
    assert kiosk.recent_fps() == 0.0, "one frame is no rate yet"
    kiosk.step(frames([NOBODY], start_index=1)[0])
    assert kiosk.recent_fps() > 1e6, "two frames at the same instant: very fast, not a division by zero"
    slow = frames([NOBODY] * 50, start_index=2)
    fast = frames([NOBODY] * RECENT_FRAMES, start_index=52)
    for i, frame in enumerate(slow + fast):
        clock.now += 1.0 if i < len(slow) else 0.04
        kiosk.step(frame)
    assert kiosk.recent_fps() == pytest.approx(25.0), "the slow start has left the window"


def test_a_camera_lost_before_any_frame_is_placed_before_the_first_frame(store):
    kiosk, events = kiosk_on(store, HandClock())
    kiosk.run(ScriptedSource([LOST, LOST, NOBODY]), notifier=FakeNotifier())
    assert [(e["event"], e["frame"], e["t_s"]) for e in events] == [("camera_lost", -1, 0.0), ("camera_ok", 0, 0.0)]


def test_a_camera_lost_is_placed_at_the_last_frame_seen(store):
    kiosk, events = kiosk_on(store, HandClock())
    kiosk.run(ScriptedSource([NOBODY] * 3 + [LOST]), notifier=FakeNotifier())
    assert [(e["event"], e["frame"], e["t_s"]) for e in events] == [("camera_lost", 2, 0.08)]


class PlainSource:
    """A source without a `status`: None means it has ended."""

    def __init__(self, count: int) -> None:
        self.frames = frames([NOBODY] * count)

    def read(self):
        return self.frames.pop(0) if self.frames else None


def test_a_source_without_status_ends_at_its_first_none(store):
    kiosk, _ = kiosk_on(store, HandClock())
    assert kiosk.run(PlainSource(4), notifier=FakeNotifier()) == 4


def test_a_signal_is_logged_as_the_reason_to_stop(store, caplog):
    caplog.set_level(logging.INFO, logger="edge.kiosk")
    kiosk, _ = kiosk_on(store, HandClock())
    source = ScriptedSource([NOBODY] * 5, before_read=lambda: signal.raise_signal(signal.SIGTERM)
                            if source.index == 2 else None)
    assert kiosk.run(source, notifier=FakeNotifier()) == 2
    assert "event=stopping reason=signal signal=SIGTERM" in [r.getMessage() for r in caplog.records]


def test_button_enrolment_that_cannot_be_saved_is_refused_with_the_reason(store, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edge.store, "_write_atomically", disk_full)
    config = Config.model_validate({"enroll": {"capture_frames": 2}, **NO_LIVENESS})
    kiosk, events = kiosk_on(store, HandClock(), config=config, press_button_at={0})
    for frame in frames([CAROL] * 2):
        kiosk.step(frame)
    refused = [(e["event"], e["frame"], e["reason"]) for e in events if e["event"] != "enroll_started"]
    assert [(name, frame) for name, frame, _ in refused] == [("enroll_refused", 1)]
    assert refused[0][2].startswith(f"cannot write store {store.path}: No space left on device")
    assert [action for _, action in kiosk.door.history if action.startswith("confirm")] == []
    assert [p.name for p in Store.open(store.path, fingerprint=store.fingerprint).persons] == ["alice"]


def test_button_enrolment_notes_the_frame(store):
    config = Config.model_validate({"enroll": {"capture_frames": 1}, **NO_LIVENESS})
    kiosk, events = kiosk_on(store, HandClock(), config=config, press_button_at={2})
    for frame in frames([NOBODY, NOBODY, CAROL]):
        kiosk.step(frame)
    [enrolled] = [e for e in events if e["event"] == "enrolled"]
    assert Store.open(store.path, fingerprint=store.fingerprint).find(enrolled["person"]).note == (
        "button enrolment, frame 2")


def test_the_store_is_reloaded_at_most_once_per_check_interval(store):
    clock = HandClock()
    kiosk, events = kiosk_on(store, clock)
    kiosk.step(frames([NOBODY])[0])
    other = Store.open(store.path, fingerprint=store.fingerprint)  # the CLI, in another process
    with other.edit():
        other.add_person("carol", embedding_of(CAROL)[None, :])
    clock.now += STORE_CHECK_S / 2
    kiosk.step(frames([NOBODY], start_index=1)[0])
    assert len(kiosk.store) == 1, "not checked again before the interval is over"
    clock.now += STORE_CHECK_S / 2
    for frame in frames([CAROL] * 3, start_index=2):
        kiosk.step(frame)
    assert len(kiosk.store) == 2
    assert [(e["event"], e["person"]) for e in events] == [("unlock", "carol")]


def test_max_frames_stops_after_exactly_that_many_frames(store):
    kiosk, _ = kiosk_on(store, HandClock())
    assert kiosk.run(ScriptedSource([NOBODY] * 10), notifier=FakeNotifier(), max_frames=4) == 4
    assert kiosk.pipeline.calls == 4


def test_a_stop_request_given_by_the_caller_is_the_one_watched(store):
    handlers = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    stop = StopRequest()
    stop.reason = "SIGTERM"  # as if the signal came while the models were loading
    kiosk, _ = kiosk_on(store, HandClock())
    assert kiosk.run(ScriptedSource([NOBODY] * 5), notifier=FakeNotifier(), stop=stop) == 0
    assert kiosk.door.is_unlocked is False
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "the caller's request, no handler of its own"


def test_stop_request_install_restore_and_ignore():
    handlers = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    StopRequest().restore()  # nothing installed: nothing to put back
    stop = StopRequest().install()
    try:
        assert all(signal.getsignal(sig) == stop._handle for sig in StopRequest.SIGNALS)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.reason == "SIGINT", "the first signal is the reason"
        stop.restore()
        stop.restore()
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
        stop.ignore()
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in StopRequest.SIGNALS)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class DiskFullAudit:
    def record(self, decision, **fields) -> int:
        raise OSError(28, "No space left on device")


def run_alice_then_carol(store, audit) -> tuple[list[dict], Kiosk]:
    events: list[dict] = []
    kiosk = Kiosk(config=FAKES_CONFIG, pipeline=FakePipeline(), store=store, door=SimulatedDoor(), audit=audit,
                  emit=events.append, clock=HandClock())
    for i, code in enumerate([ALICE] * 3 + [NOBODY] * 7 + [CAROL] * 3):
        kiosk.step(Frame(image_of(code), i, i / 30))
    return events, kiosk


def test_decision_events_and_their_log_lines_carry_the_decision(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edge.kiosk")
    audit = AuditLog(tmp_path / "audit.sqlite")
    try:
        events, kiosk = run_alice_then_carol(store, audit)
    finally:
        audit.close()
    (alice,) = store.match(embedding_of(ALICE)[None, :], threshold_l2=Config().match.threshold_l2,
                           margin_l2=Config().match.margin_l2)
    unlock, unknown = events
    assert (unlock["event"], unlock["person"], unlock["person_id"], unlock["frame"], unlock["t_s"]) == (
        "unlock", "alice", store.find("alice").id, 2, 0.067)
    assert (unlock["distance_l2"], unlock["margin_l2"]) == (round(alice.distance_l2, 4), round(alice.margin_l2, 4))
    assert (unlock["track"], unlock["votes"], unlock["door"]) == (1, 3, "pulse")
    assert (unknown["event"], unknown["person"], unknown["person_id"], unknown["frame"], unknown["t_s"]) == (
        "unknown", None, None, 12, 0.4)
    assert (unknown["track"], unknown["votes"], unknown["door"]) == (2, 3, "none")
    assert isinstance(unlock["audit_id"], int) and unknown["audit_id"] == unlock["audit_id"] + 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=un")]
    assert lines == ["event=" + " ".join([e["event"]] + [f"{k}={v}" for k, v in e.items() if k != "event"])
                     for e in events]


def test_a_failed_audit_write_is_logged_and_the_door_still_opens(store, caplog):
    caplog.set_level(logging.ERROR, logger="edge.kiosk")
    events, kiosk = run_alice_then_carol(store, DiskFullAudit())
    assert [(e["event"], e["door"]) for e in events] == [("unlock", "pulse"), ("unknown", "none")]
    assert "audit_id" not in events[0]
    assert [r.getMessage() for r in caplog.records] == [
        "event=audit_write_failed decision=unlock frame=2 error=OSError: [Errno 28] No space left on device",
        "event=audit_write_failed decision=unknown frame=12 error=OSError: [Errno 28] No space left on device"]


# ---- doing less per frame: a decided track is not embedded again ----------------------------------------------


def test_an_unlocked_track_is_not_embedded_again_and_shows_its_match(store):
    kiosk, events = kiosk_on(store, HandClock())
    for frame in frames([ALICE] * 30):
        kiosk.step(frame)
    assert [(e["event"], e["frame"]) for e in events] == [("unlock", 2)]
    assert kiosk.pipeline.embedded == 3, "the votes_needed frames before the unlock, none after"
    [face], [shown] = kiosk.last_faces, kiosk.last_matches
    assert face.embedding is None and shown.person == "alice"


@pytest.mark.parametrize(("refresh", "embedded"), [(5, 5 + 5), (1, 30)])
def test_a_track_voted_unknown_for_a_whole_window_is_embedded_every_refresh_frames(store, refresh, embedded):
    config = Config.model_validate({"decide": {"unknown_refresh_frames": refresh}, **NO_LIVENESS})
    kiosk, events = kiosk_on(store, HandClock(), config=config)
    for frame in frames([CAROL] * 30):  # carol is not enrolled
        kiosk.step(frame)
    assert [(e["event"], e["frame"]) for e in events] == [("unknown", 2)]
    assert kiosk.pipeline.embedded == embedded  # frames 0-4 fill the window, then 9, 14, 19, 24, 29


class Approaching(FakePipeline):
    """Carol's face (not enrolled), 3 % wider every frame; records the frames whose face was embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded_frames: list[int] = []

    def analyze(self, image):
        from edge.types import EmbeddedFace, Face

        index = int(image[0, 0, 0])
        width = 100.0 * 1.03**index
        face = FakePipeline().analyze(image_of(CAROL))[0]
        return [EmbeddedFace(Face((0.0, 0.0, width, width), 0.99, face.face.landmarks), face.chip, face.embedding)]

    def embed_faces(self, image, faces):
        self.embedded_frames += [int(image[0, 0, 0])] * len(faces)
        return super().embed_faces(image, faces)


def test_an_unknown_face_coming_closer_is_embedded_again_once_it_is_a_tenth_wider(store):
    kiosk = Kiosk(config=FAKES_CONFIG, pipeline=Approaching(), store=store, door=SimulatedDoor(), clock=HandClock())
    for frame in frames(list(range(30))):  # the image carries the frame index
        kiosk.step(frame)
    # settled after frame 4 (width 112.6); 1.03^4 > 1.1 (before the 5-frame refresh) brings the next at frame 8, …
    assert kiosk.pipeline.embedded_frames == [0, 1, 2, 3, 4, 8, 12, 16, 20, 24, 28]


def test_a_store_change_makes_faces_voted_unknown_be_looked_at_every_frame_again(store):
    clock = HandClock()
    kiosk, events = kiosk_on(store, clock)
    for frame in frames([CAROL] * 10):
        kiosk.step(frame)
    other = Store.open(store.path, fingerprint=store.fingerprint)  # the CLI or the web page, in another process
    with other.edit():
        other.add_person("carol", embedding_of(CAROL)[None, :])
    clock.now += STORE_CHECK_S
    for frame in frames([CAROL] * 3, start_index=10):
        kiosk.step(frame)
    assert [(e["event"], e["person"], e["frame"]) for e in events] == [("unknown", None, 2), ("unlock", "carol", 12)]


def test_an_admin_standing_at_the_door_after_the_unlock_still_counts_as_present(store):
    window_s = 2.0
    config = Config.model_validate(
        {"enroll": {"admins": ["alice"], "admin_window_s": window_s, "capture_frames": 2}, **NO_LIVENESS})
    stay = int(3 * window_s * 25)  # alice stays three admin windows after her unlock, then presses the button
    kiosk, events = kiosk_on(store, HandClock(), config=config, press_button_at={stay})
    for frame in frames([ALICE] * (stay + 2)):
        kiosk.step(frame)
    assert [e["event"] for e in events] == ["unlock", "enroll_started", "enroll_refused"]
    assert events[-1]["reason"] == "already enrolled as alice"
