"""The gpiod pin factory against an in-memory fake of libgpiod v2: door pulses, button edges, pin names, errors."""
from __future__ import annotations

import dataclasses
import errno
import inspect
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from pathlib import Path

import pytest
from conftest import wait_until
from gpiozero import Button, DigitalOutputDevice, GPIOPinInUse

from edge.__main__ import make_door
from edge.config import Config
from edge.door import GpioDoor
from edge.gpio_gpiod import CONSUMER, GpiodFactory, GpioError, gpio_backend, pin_factory

ROOT = Path(__file__).resolve().parents[1]
SHORT_PULSE_S = 0.2
LONG_PULSE_S = 30.0  # longer than any test: the relay can only go off because the code switched it off
BOUNCE_S = 0.05
JETSON_LINES = {105: "PQ.05", 106: "PQ.06"}  # the fake Jetson: gpiochip0 (main controller), gpiochip1 (AON)
AON_LINES = {3: "PAA.03"}



# ---- a fake of the libgpiod v2 calls the factory makes (names and fields as in gpiod 2.x) -----------------------

class Direction(Enum):
    AS_IS, INPUT, OUTPUT = 1, 2, 3


class Value(Enum):
    INACTIVE, ACTIVE = 0, 1


class Bias(Enum):
    AS_IS, UNKNOWN, DISABLED, PULL_UP, PULL_DOWN = 1, 2, 3, 4, 5


class Edge(Enum):
    NONE, RISING, FALLING, BOTH = 1, 2, 3, 4


@dataclass
class LineSettings:
    direction: Direction = Direction.AS_IS
    edge_detection: Edge = Edge.NONE
    bias: Bias = Bias.AS_IS
    active_low: bool = False
    debounce_period: timedelta = timedelta()
    output_value: Value = Value.INACTIVE


@dataclass(frozen=True)
class EdgeEvent:
    class Type(Enum):
        RISING_EDGE, FALLING_EDGE = 1, 2

    event_type: Type
    timestamp_ns: int
    line_offset: int
    global_seqno: int = 0
    line_seqno: int = 0


@dataclass(frozen=True)
class ChipInfo:
    name: str
    label: str
    num_lines: int


@dataclass
class FakeLine:
    """What the wire does: the level an output drives (with timestamps), or the level outside drives an input."""

    history: list[tuple[float, Value]] = field(default_factory=list)
    external: Value | None = None  # None: nothing drives the input, the bias decides


class FakeRequest:
    def __init__(self, system: FakeSystem, path: str, config: dict, consumer: str | None) -> None:
        self.system, self.path, self.consumer = system, path, consumer
        self.settings: dict[int, LineSettings] = {}
        self.settings_log: list[dict[int, LineSettings]] = []
        self.events: list[EdgeEvent] = []
        self.ready = threading.Condition()
        self.released = False
        self._configure(config)

    def _configure(self, config: dict) -> None:
        for offset, settings in config.items():
            assert isinstance(offset, int) and isinstance(settings, LineSettings), (offset, settings)
            self.settings[offset] = dataclasses.replace(settings)
            if settings.direction is Direction.OUTPUT:
                self.system.drive_output(self.path, offset, settings.output_value)
        self.settings_log.append({k: dataclasses.replace(v) for k, v in self.settings.items()})

    def _check(self, offset: int) -> LineSettings:
        assert not self.released, "GPIO lines have been released"
        return self.settings[offset]

    def reconfigure_lines(self, config: dict) -> None:
        assert not self.released and set(config) <= set(self.settings)
        self._configure(config)

    def set_value(self, offset: int, value: Value) -> None:
        assert self._check(offset).direction is Direction.OUTPUT and isinstance(value, Value)
        self.system.drive_output(self.path, offset, value)

    def get_value(self, offset: int) -> Value:
        settings = self._check(offset)
        line = self.system.line(self.path, offset)
        if settings.direction is Direction.OUTPUT:
            return line.history[-1][1]
        if line.external is not None:
            return line.external
        return Value.ACTIVE if settings.bias is Bias.PULL_UP else Value.INACTIVE

    def wait_edge_events(self, timeout) -> bool:
        assert not self.released
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        with self.ready:
            return self.ready.wait_for(lambda: bool(self.events), seconds)

    def read_edge_events(self, max_events: int | None = None) -> list[EdgeEvent]:
        assert not self.released
        with self.ready:
            events, self.events = self.events, []
        return events

    def edge(self, offset: int, level: Value) -> None:
        wanted = {Value.ACTIVE: (Edge.RISING, Edge.BOTH), Value.INACTIVE: (Edge.FALLING, Edge.BOTH)}[level]
        if self.settings[offset].edge_detection in wanted:
            kind = EdgeEvent.Type.RISING_EDGE if level is Value.ACTIVE else EdgeEvent.Type.FALLING_EDGE
            with self.ready:
                self.events.append(EdgeEvent(kind, time.monotonic_ns(), offset))
                self.ready.notify_all()

    def release(self) -> None:
        self.released = True


class FakeChip:
    def __init__(self, system: FakeSystem, path: str) -> None:
        self.system, self.path = system, path
        system.check_access(path)
        self.names = system.chips[path]
        self.closed = False
        system.open_chips += 1

    def __enter__(self) -> FakeChip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.system.open_chips -= 1

    def get_info(self) -> ChipInfo:
        return ChipInfo(Path(self.path).name, "fake", self.system.num_lines)

    def line_offset_from_id(self, name: str) -> int:
        assert not self.closed and isinstance(name, str)
        for offset, line_name in self.names.items():
            if line_name == name:
                return offset
        raise OSError(errno.ENOENT, "No such file or directory")


class FakeSystem:
    """The board: chips (path → {offset: line name}), the wires, and who holds which line."""

    num_lines = 200

    def __init__(self, dev_dir: Path) -> None:
        self.dev_dir = dev_dir
        self.chips = {str(dev_dir / "gpiochip0"): JETSON_LINES, str(dev_dir / "gpiochip1"): AON_LINES}
        for path in self.chips:
            Path(path).touch()
        (dev_dir / "gpiochip-notachip").touch()
        self.denied: set[str] = set()
        self.lines: dict[tuple[str, int], FakeLine] = {}
        self.requests: list[FakeRequest] = []
        self.open_chips = 0

    def check_access(self, path: str) -> None:
        if path not in self.chips:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if path in self.denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)

    def line(self, path: str, offset: int) -> FakeLine:
        return self.lines.setdefault((path, offset), FakeLine())

    def drive_output(self, path: str, offset: int, value: Value) -> None:
        self.line(path, offset).history.append((time.monotonic(), value))

    def levels(self, path: str, offset: int) -> list[Value]:
        """Output levels driven, with repeats of the same level folded."""
        levels: list[Value] = []
        for _, value in self.line(path, offset).history:
            if not levels or levels[-1] is not value:
                levels.append(value)
        return levels

    def holder(self, path: str, offset: int) -> FakeRequest | None:
        return next((r for r in self.requests if not r.released and offset in r.settings and r.path == path), None)

    def request_lines(self, path: str, config: dict, consumer: str | None = None, event_buffer_size=None,
                      output_values=None) -> FakeRequest:
        self.check_access(path)
        assert output_values is None
        if any(self.holder(path, offset) for offset in config):
            raise OSError(errno.EBUSY, "Device or resource busy")
        request = FakeRequest(self, path, config, consumer)
        self.requests.append(request)
        return request

    def press(self, path: str, offset: int, level: Value) -> None:
        """Something outside drives an input line (a button to ground: INACTIVE)."""
        self.line(path, offset).external = level
        holder = self.holder(path, offset)
        if holder is not None:
            holder.edge(offset, level)

    def module(self) -> types.ModuleType:
        gpiod = types.ModuleType("gpiod")
        gpiod.line = types.SimpleNamespace(Direction=Direction, Value=Value, Bias=Bias, Edge=Edge)
        gpiod.LineSettings, gpiod.EdgeEvent, gpiod.ChipInfo = LineSettings, EdgeEvent, ChipInfo
        gpiod.Chip = lambda path: FakeChip(self, path)
        gpiod.request_lines = self.request_lines
        gpiod.is_gpiochip_device = lambda path: path in self.chips
        return gpiod


@pytest.fixture
def board(tmp_path, monkeypatch) -> FakeSystem:
    system = FakeSystem(tmp_path)
    monkeypatch.setitem(sys.modules, "gpiod", system.module())
    return system


@pytest.fixture
def factory(board):
    pins = GpiodFactory(dev_dir=board.dev_dir)
    yield pins
    pins.close()


def chip0(board) -> str:
    return str(board.dev_dir / "gpiochip0")


def output_settings(value: Value) -> LineSettings:
    return LineSettings(direction=Direction.OUTPUT, output_value=value)


# ---- the door on gpiod lines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("active_high", [True, False])
def test_door_claims_lazily_and_starts_at_the_inactive_level(board, factory, active_high):
    door = GpioDoor(relay_pin="PQ.05", active_high=active_high, pulse_s=LONG_PULSE_S, pin_factory=factory)
    assert board.requests == [], "constructing the door must not touch the GPIO"
    door.open()
    inactive = Value.INACTIVE if active_high else Value.ACTIVE
    [request] = board.requests
    assert (request.path, request.consumer) == (chip0(board), CONSUMER)
    assert request.settings_log == [{105: output_settings(inactive)}], "requested as an output already at rest"
    assert board.levels(chip0(board), 105) == [inactive]
    assert door.is_unlocked is False
    door.close()
    assert request.released
    assert board.open_chips == 0, "chips opened for name lookup are closed again"


@pytest.mark.parametrize("active_high", [True, False])
def test_unlock_drives_the_active_level_for_pulse_s_then_locks(board, factory, active_high):
    door = GpioDoor(relay_pin="gpiochip0:105", active_high=active_high, pulse_s=SHORT_PULSE_S, pin_factory=factory)
    door.open()
    active, inactive = (Value.ACTIVE, Value.INACTIVE) if active_high else (Value.INACTIVE, Value.ACTIVE)
    door.unlock()
    assert board.levels(chip0(board), 105) == [inactive, active], "energised before unlock() returns"
    assert door.is_unlocked
    assert wait_until(lambda: board.levels(chip0(board), 105) == [inactive, active, inactive])
    assert door.is_unlocked is False
    history = board.line(chip0(board), 105).history
    on_at = next(t for t, v in history if v is active)
    off_at = next(t for t, v in history if v is inactive and t > on_at)
    assert SHORT_PULSE_S * 0.9 <= off_at - on_at < SHORT_PULSE_S + 0.5
    door.close()


def test_lock_during_a_pulse_goes_inactive_at_once_and_stays(board, factory):
    door = GpioDoor(relay_pin="PQ.05", led_pin="PQ.06", pulse_s=LONG_PULSE_S, pin_factory=factory)
    door.unlock()
    assert wait_until(lambda: board.levels(chip0(board), 106)[-1] is Value.ACTIVE), "status LED lit"
    door.lock()
    assert board.levels(chip0(board), 105) == [Value.INACTIVE, Value.ACTIVE, Value.INACTIVE]
    assert board.levels(chip0(board), 106)[-1] is Value.INACTIVE
    time.sleep(SHORT_PULSE_S)  # the blink thread must not switch it back on
    assert board.levels(chip0(board), 105)[-1] is Value.INACTIVE and door.is_unlocked is False
    door.close()


@pytest.mark.parametrize("active_high", [True, False])
def test_close_during_a_pulse_drives_inactive_then_releases_every_line(board, factory, active_high):
    door = GpioDoor(relay_pin="PQ.05", active_high=active_high, led_pin="PQ.06", buzzer_pin="gpiochip1:3",
                    pulse_s=LONG_PULSE_S, pin_factory=factory)
    door.unlock()
    door.close()
    inactive = Value.INACTIVE if active_high else Value.ACTIVE
    assert board.levels(chip0(board), 105)[-1] is inactive, "the last level driven before release was inactive"
    assert len(board.requests) == 3 and all(r.released for r in board.requests)
    assert {r.path for r in board.requests} == {chip0(board), str(board.dev_dir / "gpiochip1")}
    door.close()  # idempotent
    DigitalOutputDevice("PQ.05", pin_factory=factory).close()  # the line is free again: no busy error


def test_two_spellings_of_one_line_are_one_pin_and_conflict(board, factory):
    relay = DigitalOutputDevice("PQ.05", pin_factory=factory)
    assert factory.pin("gpiochip0:105") is relay.pin
    assert factory.pin(f"{chip0(board)}:105") is relay.pin
    assert factory.pin("gpiochip0:PQ.05") is relay.pin
    assert repr(relay.pin) == "gpiochip0:105"
    with pytest.raises(GPIOPinInUse):
        DigitalOutputDevice("gpiochip0:105", pin_factory=factory)
    relay.close()
    assert factory.pin("PAA.03") is not relay.pin


def test_a_line_held_by_another_program_names_the_problem(board, factory):
    board.request_lines(chip0(board), {105: LineSettings()}, consumer="someone-else")
    with pytest.raises(GpioError, match=r"gpiochip0:105: in use by another program .*gpioinfo"):
        DigitalOutputDevice("PQ.05", pin_factory=factory)


# ---- the enrolment button -------------------------------------------------------------------------------------

def test_button_with_pull_up_fires_when_pressed_on_the_falling_edge(board, factory):
    presses, releases = [], []
    button = Button("PAA.03", pull_up=True, bounce_time=BOUNCE_S, pin_factory=factory)
    button.when_pressed = lambda: presses.append(time.monotonic())
    button.when_released = lambda: releases.append(time.monotonic())
    aon = str(board.dev_dir / "gpiochip1")
    [request] = board.requests
    assert request.settings[3] == LineSettings(direction=Direction.INPUT, bias=Bias.PULL_UP, edge_detection=Edge.BOTH,
                                               debounce_period=timedelta(seconds=BOUNCE_S))
    assert all(s[3].direction is Direction.INPUT for s in request.settings_log), "never driven as an output"
    assert button.is_pressed is False, "the pull-up holds an open button high"
    board.press(aon, 3, Value.INACTIVE)
    assert wait_until(lambda: presses), "falling edge → when_pressed"
    assert button.is_pressed and releases == []
    board.press(aon, 3, Value.ACTIVE)
    assert wait_until(lambda: releases) and len(presses) == 1, "the rising edge is a release, not a press"
    watcher = next(t for t in threading.enumerate() if t.name == "gpiod-gpiochip1:3")
    button.close()
    assert request.released and not watcher.is_alive(), "close() stops the edge watcher, then releases the line"


def test_a_failing_callback_is_logged_and_the_next_press_still_counts(board, factory, caplog):
    presses = []

    def pressed():
        presses.append(time.monotonic())
        if len(presses) == 1:
            raise RuntimeError("boom")

    button = Button("PAA.03", pull_up=True, pin_factory=factory)
    button.when_pressed = pressed
    aon = str(board.dev_dir / "gpiochip1")
    for level in (Value.INACTIVE, Value.ACTIVE, Value.INACTIVE):
        board.press(aon, 3, level)
    assert wait_until(lambda: len(presses) == 2)
    assert "event=gpio_callback_error pin=gpiochip1:3" in caplog.text
    button.close()


def test_a_callback_may_close_its_own_button(board, factory):
    button = Button("PAA.03", pull_up=True, pin_factory=factory)
    button.when_pressed = button.close
    board.press(str(board.dev_dir / "gpiochip1"), 3, Value.INACTIVE)
    assert wait_until(lambda: board.requests[0].released)
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name == "gpiod-gpiochip1:3"])
    assert button.closed


def test_edge_detection_is_on_exactly_while_a_callback_is_set(board, factory):
    button = Button("PAA.03", pull_up=True, pin_factory=factory)
    [request] = board.requests
    first = request.settings_log[0][3]
    assert (first.direction, first.bias, first.edge_detection) == (Direction.INPUT, Bias.DISABLED, Edge.NONE)
    assert request.settings[3].edge_detection is Edge.BOTH and request.settings[3].debounce_period == timedelta()
    assert [t for t in threading.enumerate() if t.name == "gpiod-gpiochip1:3"]
    button.pin.when_changed = None
    assert request.settings[3].edge_detection is Edge.NONE and request.settings[3].bias is Bias.PULL_UP
    assert not [t for t in threading.enumerate() if t.name == "gpiod-gpiochip1:3"], "the watcher thread has stopped"
    button.close()


# ---- pin names and errors -------------------------------------------------------------------------------------

def test_pins_by_chip_and_offset_and_by_line_name_across_chips(board, factory):
    assert factory.pin("gpiochip0:105").info.name == "gpiochip0:105"
    assert factory.pin(f"{chip0(board)}:106").info.name == "gpiochip0:106"
    assert factory.pin("PAA.03").info.name == "gpiochip1:3", "found on the second chip"
    assert factory.pin("gpiochip1:PAA.03").info.number == 3


def test_unknown_line_name_says_how_to_find_names(board, factory):
    with pytest.raises(GpioError) as err:
        DigitalOutputDevice("PZ.99", pin_factory=factory)
    assert "'PZ.99' on gpiochip0, gpiochip1;" in str(err.value) and "`gpioinfo`" in str(err.value)
    with pytest.raises(GpioError, match=r"no GPIO line named 'PZ.99' on .*gpiochip0.*gpioinfo"):
        factory.pin("gpiochip0:PZ.99")
    assert board.requests == [] and board.open_chips == 0


@pytest.mark.parametrize("spec", [17, "17"])
def test_a_bare_number_is_refused_with_the_naming_scheme(board, factory, spec):
    with pytest.raises(GpioError, match=r"pin 17: .*'gpiochip0:105'.*'PQ.05'"):
        factory.pin(spec)


def test_offset_past_the_chip_and_missing_chip(board, factory):
    with pytest.raises(GpioError, match=r"has lines 0\.\.199"):
        factory.pin("gpiochip0:200")
    with pytest.raises(GpioError, match=r"no GPIO chip .*gpiochip7 .*gpiodetect"):
        factory.pin("gpiochip7:1")


def test_permission_denied_names_the_gpio_group(board, factory):
    board.denied.add(chip0(board))
    for spec in ("PQ.05", "gpiochip0:105"):
        with pytest.raises(GpioError, match=r"no permission to open .*gpiochip0; add the user to the `gpio` group"):
            factory.pin(spec)


def test_no_chips_at_all(board, factory):
    board.chips = {}
    with pytest.raises(GpioError, match=r"no GPIO chips in .*gpiodetect"):
        factory.pin("PQ.05")


@pytest.mark.parametrize("module", [None, types.ModuleType("gpiod")], ids=["absent", "v1 bindings"])
def test_missing_gpiod_v2_is_one_line_saying_pip_install_and_the_group(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, "gpiod", module)
    with pytest.raises(GpioError) as err:
        DigitalOutputDevice("PQ.05", pin_factory=GpiodFactory(dev_dir=tmp_path))
    message = str(err.value)
    assert "\n" not in message and "`pip install gpiod`" in message and "`gpio` group" in message


def test_importing_the_module_and_building_a_factory_do_not_import_gpiod():
    code = ("import sys; import edge.gpio_gpiod as g; g.GpiodFactory(); "
            "assert 'gpiod' not in sys.modules, 'gpiod imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- choosing the backend -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("compatible", "environ", "expected"), [
    (b"raspberrypi,5-model-b\0brcm,bcm2712\0", {}, "gpiozero"),
    (b"nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0", {}, "gpiod"),
    (b"nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0", {"GPIOZERO_PIN_FACTORY": "mock"}, "gpiozero"),
    (None, {}, "gpiod"),
])
def test_auto_backend_by_board(tmp_path, compatible, environ, expected):
    path = tmp_path / "compatible"
    if compatible is not None:
        path.write_bytes(compatible)
    assert gpio_backend("auto", environ=environ, compatible=path) == expected
    assert gpio_backend("gpiozero", environ={}, compatible=path) == "gpiozero"
    assert gpio_backend("gpiod", environ={"GPIOZERO_PIN_FACTORY": "mock"}, compatible=path) == "gpiod"


def test_make_door_passes_the_configured_factory(monkeypatch):
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    door = make_door(Config.model_validate({"door": {"kind": "gpio", "gpio_backend": "gpiod", "relay_pin": "PQ.05"}}),
                     "gpio")
    assert isinstance(door.pin_factory, GpiodFactory) and door.relay_pin == "PQ.05"
    assert make_door(Config.model_validate({"door": {"gpio_backend": "gpiozero"}}), "gpio").pin_factory is None
    assert isinstance(pin_factory("gpiod"), GpiodFactory) and pin_factory("gpiozero") is None


# ---- the fake against the real bindings -----------------------------------------------------------------------

def test_the_fake_uses_only_names_the_real_gpiod_has():
    gpiod = pytest.importorskip("gpiod")
    if not hasattr(gpiod, "request_lines"):
        pytest.skip("gpiod v1 installed")
    for enum, fake in ((gpiod.line.Direction, Direction), (gpiod.line.Value, Value), (gpiod.line.Bias, Bias),
                       (gpiod.line.Edge, Edge), (gpiod.EdgeEvent.Type, EdgeEvent.Type)):
        assert set(fake.__members__) <= set(enum.__members__), enum
    real_fields = {f.name: f.default for f in dataclasses.fields(gpiod.LineSettings)}
    for f in dataclasses.fields(LineSettings):  # same fields, same defaults (enums compared by member name)
        assert getattr(real_fields[f.name], "name", real_fields[f.name]) == getattr(f.default, "name", f.default)
    assert {"timestamp_ns", "event_type", "line_offset"} <= {f.name for f in dataclasses.fields(gpiod.EdgeEvent)}
    assert {"path", "config", "consumer"} <= set(inspect.signature(gpiod.request_lines).parameters)
    for name in ("set_value", "get_value", "reconfigure_lines", "wait_edge_events", "read_edge_events", "release"):
        assert callable(getattr(gpiod.LineRequest, name)), name
    for name in ("get_info", "line_offset_from_id", "close", "__enter__", "__exit__"):
        assert callable(getattr(gpiod.Chip, name)), name
    assert {"num_lines"} <= {f.name for f in dataclasses.fields(gpiod.ChipInfo)}
    assert callable(gpiod.is_gpiochip_device)
