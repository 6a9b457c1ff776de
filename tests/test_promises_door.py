"""The door's promises, pinned where they are made: the exact sequence of relay actions the loop causes (one pulse per
unlock decision, none for `unknown`, enrolment or anything else), a locked door on every way out of `Kiosk.run`,
even with a door whose close() does nothing, and the relay driver's own pulse and beeps on mock pins.

A recording door stands in for the relay so every call is seen in order with the loop's events; the fakes of
test_kiosk.py stand in for the camera and the models.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import pytest
from conftest import wait_until
from test_door import BUZZER, LED, LONG_PULSE_S, RELAY, SHORT_PULSE_S, FakeClock, factory, make_door  # noqa: F401
from test_kiosk import (  # noqa: F401  (store: a fixture, alice enrolled)
    ALICE, CAROL, CRASH, FAKES_CONFIG, LOST, NO_LIVENESS, NOBODY, READ_ERROR, FakeNotifier, FakePipeline, ScriptedSource,
    frames, store,
)

from edge.config import Config, DoorConfig
from edge.door import CONFIRM_BEEP_S, GpioDoor, SimulatedDoor
from edge.errors import CameraError
from edge.kiosk import Kiosk


class RecordingDoor:
    """The door interface; every call goes into `log` (shared with the kiosk's events), `unlocked` is the relay."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.unlocked = False

    @property
    def pulses(self) -> int:
        return self.log.count("door.unlock")

    def open(self) -> None:
        self.log.append("door.open")

    def unlock(self, pulse_s: float | None = None) -> None:
        self.unlocked = True
        self.log.append("door.unlock")

    def lock(self) -> None:
        self.unlocked = False
        self.log.append("door.lock")

    def confirm(self, beeps: int = 1) -> None:
        self.log.append("door.confirm")

    def close(self) -> None:
        self.lock()
        self.log.append("door.close")


class CloseDoesNothingDoor(RecordingDoor):
    """A door driver whose close() forgets to lock: the loop itself must still lock it on the way out."""

    def close(self) -> None:
        self.log.append("door.close")


def kiosk_with(store, door: RecordingDoor, *, config: Config | None = None, press_button_at=(),
               emit_fails: bool = False) -> Kiosk:
    """A kiosk whose events go into the door's log; with `emit_fails` the events' reader is gone (broken pipe)
    right after the first unlock was emitted."""

    def emit(event: dict) -> None:
        door.log.append(event["event"])
        if emit_fails and event["event"] == "unlock":
            raise BrokenPipeError(32, "Broken pipe")

    return Kiosk(config=config or FAKES_CONFIG, pipeline=FakePipeline(), store=store, door=door, emit=emit,
                 press_button_at=set(press_button_at))


def test_one_pulse_per_unlock_and_none_for_unknown_or_enrolment(store):
    """alice unlocks; carol is unknown, is enrolled by the button (set-up mode), then unlocks: two pulses, in place."""
    log: list[str] = []
    door = RecordingDoor(log)
    config = Config.model_validate({"enroll": {"capture_frames": 3}, **NO_LIVENESS})
    stream = frames([ALICE] * 4 + [NOBODY] * 7 + [CAROL] * 12)
    kiosk = kiosk_with(store, door, config=config, press_button_at={15})
    events = [event for frame in stream for event in kiosk.step(frame)]
    assert log == ["door.unlock", "unlock", "unknown", "enroll_started", "door.confirm", "enrolled",
                   "door.unlock", "unlock"]
    assert [(e["event"], e["person"], e["door"]) for e in events if "door" in e] == [
        ("unlock", "alice", "pulse"), ("unknown", None, "none"), ("unlock", events[2]["person"], "pulse")]
    assert door.pulses == 2


def test_an_unknown_face_alone_never_touches_the_relay(store):
    log: list[str] = []
    kiosk = kiosk_with(store, RecordingDoor(log))
    events = [event for frame in frames([CAROL] * 30) for event in kiosk.step(frame)]
    assert [(e["event"], e["door"]) for e in events] == [("unknown", "none")]
    assert log == ["unknown"]


EXITS = {
    # name: (script after alice's unlock, run() keyword arguments, what run() raises)
    "source_ended": ([ALICE], {}, None),
    "max_frames": ([ALICE] * 5, {"max_frames": 4}, None),
    "pipeline_raises": ([CRASH, ALICE], {}, RuntimeError),
    "camera_raises": ([READ_ERROR, ALICE], {}, CameraError),
    "camera_lost": ([LOST], {}, None),
    "events_reader_gone": ([ALICE], {"emit_fails": True}, BrokenPipeError),
    "sigterm": ([ALICE], {"signal": signal.SIGTERM}, None),
    "sigint": ([ALICE], {"signal": signal.SIGINT}, None),
}


@pytest.mark.parametrize("door_class", [RecordingDoor, CloseDoesNothingDoor])
@pytest.mark.parametrize("exit_name", list(EXITS))
def test_every_way_out_of_the_loop_leaves_the_door_locked(store, door_class, exit_name):
    tail, options, raises = EXITS[exit_name]
    options = dict(options)
    log: list[str] = []
    door = door_class(log)
    kiosk = kiosk_with(store, door, emit_fails=options.pop("emit_fails", False))
    signum = options.pop("signal", None)
    source = ScriptedSource([ALICE] * 3 + tail)
    if signum is not None:  # the signal arrives while the pulse runs, as the loop waits for the next frame
        source.before_read = lambda: signal.raise_signal(signum) if source.index == 3 else None
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    notifier = FakeNotifier()
    if raises is None:
        kiosk.run(source, notifier=notifier, **options)
    else:
        with pytest.raises(raises):
            kiosk.run(source, notifier=notifier, **options)
    assert log[0] == "door.open", "the relay is claimed (locked) before the first frame"
    assert log.count("door.unlock") == 1, "the pulse was running when the loop had to leave"
    assert door.unlocked is False
    assert log[-2:] == ["door.lock", "door.close"], "locked by the loop itself, then released"
    assert notifier.calls[0] == "ready" and notifier.calls[-1] == "stopping"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "signal handlers restored"


def test_camera_loss_locks_before_it_is_reported(store):
    log: list[str] = []
    door = CloseDoesNothingDoor(log)
    kiosk = kiosk_with(store, door)
    kiosk.run(ScriptedSource([ALICE] * 3 + [LOST, LOST, NOBODY]), notifier=FakeNotifier())
    assert log == ["door.open", "door.unlock", "unlock", "door.lock", "camera_lost", "camera_ok", "door.lock",
                   "door.close"]


# ---- the relay driver itself: one pulse of pulse_s, nothing left running, beeps counted --------------------------


def pin_levels(pin) -> list[bool]:
    return [s.state for s in pin.states]


def test_a_pulse_is_one_on_period_of_pulse_s_for_relay_and_led_and_leaves_no_thread(factory):
    door = make_door(factory, pulse_s=SHORT_PULSE_S, led_pin=LED)
    door.open()
    threads_before = threading.active_count()
    relay, led = factory.pin(RELAY), factory.pin(LED)
    started = time.monotonic()
    door.unlock()
    assert relay.state is True and time.monotonic() - started < SHORT_PULSE_S, "energised at once, without waiting"
    assert wait_until(lambda: threading.active_count() <= threads_before, SHORT_PULSE_S + 0.6), "pulse threads end"
    time.sleep(SHORT_PULSE_S)  # nothing switches on again
    for pin in (relay, led):
        assert pin_levels(pin) == [False, True, False]
        assert SHORT_PULSE_S * 0.9 <= pin.states[-1].timestamp < SHORT_PULSE_S + 0.5
    door.close()


@pytest.mark.parametrize("beeps", [None, 3])
def test_confirm_beeps_exactly_as_often_as_asked_and_returns_at_once(factory, beeps):
    door = make_door(factory, led_pin=LED, buzzer_pin=BUZZER)
    door.open()
    buzzer = factory.pin(BUZZER)
    started = time.monotonic()
    door.confirm() if beeps is None else door.confirm(beeps=beeps)
    assert time.monotonic() - started < CONFIRM_BEEP_S, "the door loop never waits for a beep"
    count = beeps or 1
    expected = [False] + [True, False] * count
    assert wait_until(lambda: pin_levels(buzzer) == expected, 2 * count * CONFIRM_BEEP_S + 1.0), pin_levels(buzzer)
    time.sleep(3 * CONFIRM_BEEP_S)
    assert pin_levels(buzzer) == expected, "and no more"
    gaps = [s.timestamp for s in buzzer.states[3::2]]  # how long each pause between two beeps lasted
    assert all(CONFIRM_BEEP_S * 0.9 <= gap < CONFIRM_BEEP_S + 0.3 for gap in gaps), gaps
    door.close()


def test_door_defaults_agree_with_the_documented_config():
    assert GpioDoor(relay_pin=RELAY).pulse_s == SimulatedDoor().pulse_s == DoorConfig().pulse_s


def test_a_new_simulated_door_is_locked_and_honours_an_explicit_pulse():
    clock = FakeClock()
    door = SimulatedDoor(pulse_s=3.0, clock=clock)
    assert door.is_unlocked is False, "locked before anything was called"
    door.unlock(pulse_s=10.0)
    clock.now += 5.0
    assert door.is_unlocked is True, "the explicit 10 s pulse, not the default 3 s"


def test_every_unlock_is_logged_with_its_pulse(factory, caplog):
    caplog.set_level(logging.INFO, logger="edge.door")
    door = make_door(factory, pulse_s=LONG_PULSE_S)
    door.unlock(pulse_s=SHORT_PULSE_S)
    simulated = SimulatedDoor(pulse_s=3.0, clock=FakeClock())
    simulated.unlock()
    simulated.unlock(pulse_s=10.0)
    door.close()
    assert [r.getMessage() for r in caplog.records if r.name == "edge.door"] == [
        f"event=door_unlock pulse_s={SHORT_PULSE_S}", "event=door_unlock simulated=1 pulse_s=3.0",
        "event=door_unlock simulated=1 pulse_s=10.0"]
