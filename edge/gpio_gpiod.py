"""A gpiozero pin factory over the kernel's GPIO character device (libgpiod v2, PyPI `gpiod`).

gpiozero has no Jetson board support; /dev/gpiochipN works on a Jetson, a Pi and most Linux boards. A pin is
"<chip>:<line>" ("gpiochip0:105", "/dev/gpiochip0:105", "gpiochip0:PQ.05") or a line name as the kernel reports
it ("PQ.05" on a Jetson header, "GPIO17" on a Pi), searched across the chips. A line is requested while a device
uses it and released by close(); it then reverts to the driver's default, which is why the lock is wired
fail-secure. gpiod is imported on first use, so this module imports (and CI runs) without it.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import MethodType
from weakref import WeakMethod, ref

from gpiozero import Factory, Pin
from gpiozero.exc import (
    PinFixedPull,
    PinInvalidBounce,
    PinInvalidEdges,
    PinInvalidFunction,
    PinInvalidPull,
    PinSetInput,
)
from gpiozero.pins import PinInfo

from edge.errors import EdgeError

log = logging.getLogger("edge.gpio")

CONSUMER = "edge-access"
DEV_DIR = Path("/dev")
DT_COMPATIBLE = Path("/proc/device-tree/compatible")
EDGE_WAIT_S = 0.1  # the edge watcher wakes this often to see whether it should stop
GROUP_HINT = "add the user to the `gpio` group (`sudo usermod -aG gpio $USER`, then log in again)"
NAMES_HINT = "list the chips and line names with `gpioinfo` (apt install gpiod)"
BIAS = {"up": "PULL_UP", "down": "PULL_DOWN", "floating": "DISABLED"}  # gpiozero pull → gpiod.line.Bias
EDGES = {"both": "BOTH", "rising": "RISING", "falling": "FALLING", "none": "NONE"}  # → gpiod.line.Edge


class GpioError(EdgeError):
    """A GPIO chip or line cannot be used: bindings missing, no permission, unknown name, line busy."""


def load_gpiod():
    """libgpiod v2's Python module, or a GpioError saying how to install it (v1 has a different API)."""
    try:
        gpiod = importlib.import_module("gpiod")
    except ImportError:
        gpiod = None
    if not hasattr(gpiod, "request_lines"):
        raise GpioError("door.gpio_backend gpiod needs libgpiod v2's Python bindings: `pip install gpiod` (2.1 or "
                        "newer; the v1 `python3-libgpiod` will not do), and the user in the `gpio` group")
    return gpiod


@contextmanager
def os_errors(what: str, path: str) -> Iterator[None]:
    """Turn an OSError from opening or requesting on chip `path` into a GpioError that names the fix."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            raise GpioError(f"{what}: no permission to open {path}; {GROUP_HINT}") from None
        if err.errno == errno.ENOENT:
            raise GpioError(f"{what}: no GPIO chip {path} (list them with `gpiodetect`)") from None
        if err.errno == errno.EBUSY:
            raise GpioError(f"{what}: in use by another program or driver (`gpioinfo` shows the consumer)") from None
        if err.errno in (errno.ENODEV, errno.ENOTTY):
            raise GpioError(f"{what}: {path} is not a GPIO chip") from None
        raise GpioError(f"{what}: {err.strerror or err}") from None


def offset_by_name(chip, name: str) -> int | None:
    """The offset of line `name` on an open chip, None when the chip has no such line."""
    try:
        return chip.line_offset_from_id(name)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


class LineBoard:
    """gpiozero's `board_info` for character devices: find_pin resolves any spelling of a line to one PinInfo."""

    def __init__(self, dev_dir: Path) -> None:
        self.dev_dir = dev_dir
        self._infos: dict[object, PinInfo] = {}
        self._paths: dict[PinInfo, str] = {}

    def find_pin(self, spec) -> Iterator[tuple[None, PinInfo]]:
        if spec not in self._infos:
            self._infos[spec] = self._resolve(spec)
        yield None, self._infos[spec]

    def chip_path(self, info: PinInfo) -> str:
        return self._paths[info]

    def chips(self, gpiod) -> list[Path]:
        found = (p for p in self.dev_dir.glob("gpiochip*") if gpiod.is_gpiochip_device(str(p)))
        return sorted(found, key=lambda p: (len(p.name), p.name))

    def _resolve(self, spec) -> PinInfo:
        text = str(spec)
        if isinstance(spec, int) or text.isdigit():
            raise GpioError(f"pin {spec}: the gpiod backend names pins 'gpiochip0:105' (chip:offset) or by line "
                            f"name such as 'PQ.05'; {NAMES_HINT}")
        gpiod = load_gpiod()
        chip, sep, line = text.rpartition(":")
        if sep:
            path = chip if "/" in chip else str(self.dev_dir / chip)
            offset = self._offset_on(gpiod, path, line, text)
        else:
            path, offset = self._search(gpiod, text)
        name = f"{Path(path).name}:{offset}"  # every spelling of a line gives this same (equal) PinInfo
        info = PinInfo(number=offset, name=name, names=frozenset({name}), pull="", row=0, col=0,
                       interfaces=frozenset({"gpio"}))
        self._infos[info.name] = info
        self._paths[info] = path
        return info

    def _offset_on(self, gpiod, path: str, line: str, spec: str) -> int:
        with os_errors(f"GPIO pin {spec}", path), gpiod.Chip(path) as chip:
            if not line.isdigit():
                offset = offset_by_name(chip, line)
                if offset is None:
                    raise GpioError(f"no GPIO line named {line!r} on {path}; {NAMES_HINT}")
                return offset
            lines = chip.get_info().num_lines
        if int(line) >= lines:
            raise GpioError(f"GPIO pin {spec}: {path} has lines 0..{lines - 1}; {NAMES_HINT}")
        return int(line)

    def _search(self, gpiod, name: str) -> tuple[str, int]:
        chips = self.chips(gpiod)
        if not chips:
            raise GpioError(f"GPIO pin {name}: no GPIO chips in {self.dev_dir} (list them with `gpiodetect`)")
        for path in map(str, chips):
            with os_errors(f"GPIO pin {name}", path), gpiod.Chip(path) as chip:
                offset = offset_by_name(chip, name)
            if offset is not None:
                return path, offset
        raise GpioError(f"no GPIO line named {name!r} on {', '.join(p.name for p in chips)}; {NAMES_HINT}, or "
                        f"name the pin 'gpiochipN:offset'")


class GpiodPin(Pin):
    """One line: requested when a device sets its function, reconfigured in place, released by close()."""

    def __init__(self, factory: GpiodFactory, info: PinInfo, path: str) -> None:
        super().__init__()
        self._factory, self._info, self._path = factory, info, path
        self._lock = threading.RLock()
        self._request = None
        self._when_changed = None
        self._watcher: tuple[threading.Thread, threading.Event] | None = None
        self._reset()

    def _reset(self) -> None:
        """A fresh pin: an input with no pull, no bounce; outputs start inactive unless output_with_state says."""
        self._function, self._output_state = "input", False
        self._pull, self._edges, self._bounce_s = "floating", "both", None

    def __repr__(self) -> str:
        return self._info.name

    @property
    def info(self) -> PinInfo:
        return self._info

    @property
    def factory(self) -> GpiodFactory:
        return self._factory

    def close(self) -> None:
        """Stop edge watching and release the line request (the line reverts to the driver's default)."""
        self._stop_watching()
        self._when_changed = None
        with self._lock:
            if self._request is not None:
                self._request.release()
                self._request = None
            self._reset()

    def output_with_state(self, state) -> None:
        self._output_state = bool(state)
        self._set_function("output")

    def _settings(self, gpiod):
        """LineSettings for the current function, initial level, pull, edges and debounce."""
        line = gpiod.line
        if self._function == "output":
            value = line.Value.ACTIVE if self._output_state else line.Value.INACTIVE
            return gpiod.LineSettings(direction=line.Direction.OUTPUT, output_value=value)
        edges = EDGES[self._edges] if self._when_changed is not None else "NONE"
        return gpiod.LineSettings(direction=line.Direction.INPUT, bias=getattr(line.Bias, BIAS[self._pull]),
                                  edge_detection=getattr(line.Edge, edges),
                                  debounce_period=timedelta(seconds=self._bounce_s or 0))

    def _apply(self):
        """Request the line with the current settings, or reconfigure the request already held; returns it."""
        gpiod = load_gpiod()
        with self._lock:
            settings = self._settings(gpiod)
            with os_errors(f"GPIO line {self._info.name}", self._path):
                if self._request is None:
                    self._request = gpiod.request_lines(self._path, config={self._info.number: settings},
                                                        consumer=self._factory.consumer)
                else:
                    self._request.reconfigure_lines({self._info.number: settings})
            return self._request

    def _update(self) -> None:
        """Re-apply settings to a line already requested; otherwise they wait for the request."""
        if self._request is not None:
            self._apply()

    def _line(self):
        return self._request if self._request is not None else self._apply()

    def _get_function(self) -> str:
        return self._function

    def _set_function(self, value: str) -> None:
        if value not in ("input", "output"):
            raise PinInvalidFunction(f'invalid function "{value}" for pin {self!r}')
        self._function = value
        self._apply()

    def _get_state(self) -> bool:
        gpiod = load_gpiod()
        with self._lock:
            return self._line().get_value(self._info.number) == gpiod.line.Value.ACTIVE

    def _set_state(self, value) -> None:
        if self._function != "output":
            raise PinSetInput(f"cannot set the state of input pin {self!r}")
        gpiod = load_gpiod()
        with self._lock:
            self._output_state = bool(value)
            level = gpiod.line.Value.ACTIVE if value else gpiod.line.Value.INACTIVE
            self._line().set_value(self._info.number, level)

    def _get_pull(self) -> str:
        return self._pull

    def _set_pull(self, value: str) -> None:
        if self._function != "input":
            raise PinFixedPull(f"cannot set pull on output pin {self!r}")
        if value not in BIAS:
            raise PinInvalidPull(f'invalid pull "{value}" for pin {self!r}')
        self._pull = value
        self._update()

    def _get_bounce(self) -> float | None:
        return self._bounce_s

    def _set_bounce(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise PinInvalidBounce("bounce must be 0 or greater")
        self._bounce_s = value
        self._update()

    def _get_edges(self) -> str:
        return self._edges

    def _set_edges(self, value: str) -> None:
        if value not in EDGES:
            raise PinInvalidEdges(f'invalid edges "{value}" for pin {self!r}')
        self._edges = value
        self._update()

    def _get_when_changed(self):
        return None if self._when_changed is None else self._when_changed()

    def _set_when_changed(self, value) -> None:
        """Edge detection is on (in the line settings, and a watcher thread) exactly while a callback is set."""
        self._stop_watching()
        if value is None:
            self._when_changed = None
            self._update()
            return
        self._when_changed = WeakMethod(value) if isinstance(value, MethodType) else ref(value)
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(self._apply(), stop), name=f"gpiod-{self._info.name}",
                                  daemon=True)
        self._watcher = (thread, stop)
        thread.start()

    def _stop_watching(self) -> None:
        if self._watcher is None:
            return
        thread, stop = self._watcher
        self._watcher = None
        stop.set()
        if thread is not threading.current_thread():  # a callback may close its own device
            thread.join()

    def _watch(self, request, stop: threading.Event) -> None:
        """Edge events → when_changed(ticks_s, state); the kernel debounces them (LineSettings.debounce_period)."""
        rising = load_gpiod().EdgeEvent.Type.RISING_EDGE
        while not stop.is_set():
            if not request.wait_edge_events(EDGE_WAIT_S):
                continue
            with self._lock:
                events = request.read_edge_events()
            for event in events:
                callback = self._get_when_changed()
                if stop.is_set() or callback is None:
                    return
                try:
                    callback(event.timestamp_ns / 1e9, int(event.event_type == rising))
                except Exception:  # a failing callback must not stop the button for good
                    log.exception("event=gpio_callback_error pin=%s", self._info.name)


class GpiodFactory(Factory):
    """Pass as gpiozero's `pin_factory=`; `dev_dir` is where the gpiochipN nodes are (tests point it elsewhere)."""

    def __init__(self, *, dev_dir: Path | str = DEV_DIR, consumer: str = CONSUMER) -> None:
        super().__init__()
        self.consumer = consumer
        self.pins: dict[PinInfo, GpiodPin] = {}
        self._board = LineBoard(Path(dev_dir))

    def _get_board_info(self) -> LineBoard:
        return self._board

    def pin(self, name) -> GpiodPin:
        for _, info in self._board.find_pin(name):
            if info not in self.pins:
                self.pins[info] = GpiodPin(self, info, self._board.chip_path(info))
            return self.pins[info]

    def close(self) -> None:
        for pin in self.pins.values():
            pin.close()
        self.pins.clear()

    def ticks(self) -> float:
        return time.monotonic()  # the clock of the kernel's edge event timestamps (CLOCK_MONOTONIC)

    def ticks_diff(self, later: float, earlier: float) -> float:
        return later - earlier


def is_raspberry_pi(compatible: Path = DT_COMPATIBLE) -> bool:
    try:
        return b"raspberrypi" in compatible.read_bytes()
    except OSError:
        return False


def gpio_backend(setting: str, *, environ: Mapping[str, str] = os.environ, compatible: Path = DT_COMPATIBLE) -> str:
    """'gpiozero' or 'gpiod' for door.gpio_backend. auto keeps gpiozero where it has board support (a Pi) or where
    GPIOZERO_PIN_FACTORY names a factory, and uses the character device elsewhere (a Jetson, other boards)."""
    if setting != "auto":
        return setting
    if environ.get("GPIOZERO_PIN_FACTORY") or is_raspberry_pi(compatible):
        return "gpiozero"
    return "gpiod"


def pin_factory(setting: str) -> GpiodFactory | None:
    """gpiozero's `pin_factory=` for door.gpio_backend: a GpiodFactory, or None for gpiozero's own default."""
    backend = gpio_backend(setting)
    log.info("event=gpio_backend setting=%s backend=%s", setting, backend)
    return GpiodFactory() if backend == "gpiod" else None
