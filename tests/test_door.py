"""Relay, LED and buzzer on gpiozero's MockFactory (pin states asserted), SimulatedDoor, and SIGTERM during a pulse."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import sigterm_when_ready, wait_until
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from edge.door import CONFIRM_BEEP_S, GpioDoor, SimulatedDoor

ROOT = Path(__file__).resolve().parents[1]
RELAY, LED, BUZZER = 17, 27, 22
SHORT_PULSE_S = 0.2
LONG_PULSE_S = 30.0  # longer than any test: the relay can only go off because the code switched it off



@pytest.fixture
def factory():
    pins = MockFactory()
    yield pins
    pins.reset()


def make_door(factory, *, active_high: bool = True, pulse_s: float = LONG_PULSE_S, **pins) -> GpioDoor:
    return GpioDoor(relay_pin=RELAY, active_high=active_high, pulse_s=pulse_s, pin_factory=factory, **pins)


@pytest.mark.parametrize("active_high", [True, False])
def test_relay_is_claimed_lazily_and_starts_at_the_inactive_level(factory, active_high):
    door = make_door(factory, active_high=active_high)
    assert factory.pins == {}, "constructing the door must not touch the GPIO"
    door.open()
    relay = factory.pin(RELAY)
    assert relay.function == "output"
    assert relay.state == (not active_high)
    assert door.is_unlocked is False
    door.close()


@pytest.mark.parametrize("active_high", [True, False])
def test_unlock_drives_active_level_for_pulse_s_then_locks(factory, active_high):
    door = make_door(factory, active_high=active_high, pulse_s=SHORT_PULSE_S, led_pin=LED)
    door.open()
    relay, led = factory.pin(RELAY), factory.pin(LED)
    door.unlock()  # gpiozero's blink thread energises the relay: wait for it, never sleep blindly
    assert wait_until(lambda: relay.state == active_high) and door.is_unlocked
    assert wait_until(lambda: led.state is True), "the status LED is lit while the door is open"
    assert wait_until(lambda: relay.state == (not active_high))
    assert wait_until(lambda: led.state is False)
    assert door.is_unlocked is False
    on_for_s = relay.states[-1].timestamp  # MockPin records how long the previous state lasted
    assert SHORT_PULSE_S * 0.9 <= on_for_s < SHORT_PULSE_S + 0.5
    door.close()


def test_unlock_with_explicit_pulse_overrides_default(factory):
    door = make_door(factory, pulse_s=LONG_PULSE_S)
    door.unlock(pulse_s=SHORT_PULSE_S)  # also opens the door lazily
    relay = factory.pin(RELAY)
    assert wait_until(lambda: relay.state is True)
    assert wait_until(lambda: relay.state is False)
    door.close()


def test_lock_during_pulse_switches_off_at_once_and_stays_off(factory):
    door = make_door(factory, led_pin=LED)
    door.unlock()
    relay, led = factory.pin(RELAY), factory.pin(LED)
    assert wait_until(lambda: relay.state is True and led.state is True)
    door.lock()
    assert relay.state is False and led.state is False
    time.sleep(SHORT_PULSE_S)  # the blink thread must not switch it back on
    assert relay.state is False and door.is_unlocked is False
    assert [s.state for s in relay.states] == [False, True, False]
    door.close()


@pytest.mark.parametrize("active_high", [True, False])
def test_close_during_pulse_drives_inactive_then_releases_the_pin(factory, active_high):
    door = make_door(factory, active_high=active_high, led_pin=LED, buzzer_pin=BUZZER)
    door.unlock()
    relay = factory.pin(RELAY)
    assert wait_until(lambda: relay.state == active_high)
    door.close()
    assert relay.function == "input", "the relay line is released"
    assert relay.states[-1].state == (not active_high), "the last level driven before release was inactive"
    for pin in (LED, BUZZER):
        assert factory.pin(pin).function == "input"
    door.close()  # idempotent
    assert door.is_unlocked is False
    DigitalOutputDevice(RELAY, pin_factory=factory).close()  # the pin is free again: no GPIOPinInUse


def test_context_manager_locks_on_exit_even_after_an_exception(factory):
    with pytest.raises(RuntimeError):
        with make_door(factory) as door:
            door.unlock()
            assert wait_until(lambda: factory.pin(RELAY).state is True)
            raise RuntimeError("boom")
    relay = factory.pin(RELAY)
    assert relay.states[-1].state is False and relay.function == "input"


def test_confirm_beeps_buzzer_and_flashes_led_without_touching_relay(factory):
    door = make_door(factory, led_pin=LED, buzzer_pin=BUZZER)
    door.open()
    relay, led, buzzer = factory.pin(RELAY), factory.pin(LED), factory.pin(BUZZER)
    door.confirm(beeps=2)
    beeps = 2
    expected = [False] + [True, False] * beeps
    for pin in (buzzer, led):
        assert wait_until(lambda pin=pin: [s.state for s in pin.states] == expected), [s.state for s in pin.states]
        on_times = [s.timestamp for s in pin.states[2::2]]
        assert all(CONFIRM_BEEP_S * 0.9 <= t < CONFIRM_BEEP_S + 0.3 for t in on_times), on_times
    assert [s.state for s in relay.states] == [False], "confirm must never energise the relay"
    door.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_simulated_door_pulses_locks_and_keeps_history():
    clock = FakeClock()
    door = SimulatedDoor(pulse_s=3.0, clock=clock)
    door.open()
    assert door.is_unlocked is False
    door.unlock()
    clock.now += 2.9
    assert door.is_unlocked is True
    clock.now += 0.2
    assert door.is_unlocked is False, "the pulse ends by itself"
    door.unlock(pulse_s=10.0)
    clock.now += 1.0
    door.lock()
    assert door.is_unlocked is False, "lock() ends a pulse at once"
    door.confirm(beeps=2)
    door.close()
    assert [action for _, action in door.history] == ["lock", "unlock", "unlock", "lock", "confirm x2", "lock"]
    assert [t for t, _ in door.history[1:4]] == pytest.approx([100.0, 103.1, 104.1])


# A kiosk whose fake source keeps delivering frames of an enrolled person: the third frame unlocks (k=3 votes),
# the source prints RELAY_ON while the pulse is running, the parent sends SIGTERM; afterwards the child prints
# what the relay pin went through. The signal path is Kiosk.run's own handler, not a stand-in.
SIGTERM_CHILD = textwrap.dedent(
    """
    import json, logging, signal, sys, time
    import numpy as np
    from gpiozero.pins.mock import MockFactory
    from edge.config import Config
    from edge.door import GpioDoor
    from edge.kiosk import Kiosk
    from edge.types import EmbeddedFace, Face, Frame, Match

    logging.basicConfig(level=logging.INFO)
    ACTIVE_HIGH = sys.argv[1] == "1"
    MAX_FRAMES = 3000
    factory = MockFactory()
    door = GpioDoor(relay_pin=17, active_high=ACTIVE_HIGH, pulse_s=30.0, pin_factory=factory)
    chip = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)  # textured: a flat chip would
    face = EmbeddedFace(Face((0, 0, 100, 100), 0.99), chip, np.ones(128, np.float32))  # weigh 0 in track fusion

    class WholeFrames:  # every frame scanned whole, as conftest's
        last_whole, following = True, []

    class Pipeline:
        detector = WholeFrames()

        def detect(self, image, near=None):
            return [face.face]

        def embed_faces(self, image, faces):
            return [face for _ in faces]

    class Store:
        def reload_if_changed(self):
            return False

        def match(self, queries, **thresholds):
            return [Match("alice", 0.1, 0.5) for _ in queries]

    class Source:
        status = "ok"

        def __init__(self):
            self.index, self.announced = 0, False

        def read(self):
            if door.is_unlocked and not self.announced:
                print("RELAY_ON", flush=True)
                self.announced = True
            time.sleep(0.01)
            self.index += 1
            return Frame(np.zeros((8, 8, 3), np.uint8), self.index, self.index / 25)

    events = []
    config = Config.model_validate({"liveness": {"mode": "off"}})  # the frames are blank arrays: no face to check
    kiosk = Kiosk(config=config, pipeline=Pipeline(), store=Store(), door=door, emit=events.append)
    processed = kiosk.run(Source(), max_frames=MAX_FRAMES)
    relay = factory.pin(17)
    print(json.dumps({
        "processed": processed, "max_frames": MAX_FRAMES,
        "unlocks": [e["frame"] for e in events if e["event"] == "unlock"],
        "state": relay.state, "function": relay.function, "states": [[s.timestamp, s.state] for s in relay.states],
        "sigterm_handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }))
    """
)


@pytest.mark.parametrize("active_high", [True, False])
def test_sigterm_during_pulse_leaves_relay_off_and_released(active_high):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, "1" if active_high else "0"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def relay_on() -> None:
        first = child.stdout.readline()  # blocks until the relay is on (or the child dies: "")
        assert first.strip() == "RELAY_ON", child.stderr.read()

    out, err = sigterm_when_ready(child, relay_on, timeout_s=20)
    assert child.returncode == 0, err
    assert "event=stopping reason=signal" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["unlocks"] == [3]
    assert report["processed"] < report["max_frames"], "the loop ended because of the signal"
    assert report["state"] == (not active_high), "relay at the inactive level after SIGTERM"
    assert report["function"] == "input", "relay pin released on exit"
    levels = [state for _, state in report["states"]]
    assert levels[-2:] == [active_high, not active_high]
    on_for_s = report["states"][-1][0]
    assert on_for_s < 10.0, f"relay was on {on_for_s:.1f} s: switched off by the signal, not by the 30 s pulse ending"
    assert report["sigterm_handler_restored"]
