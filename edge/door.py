"""The door relay: locked unless pulsed, locked again on close, exit, signal or exception (fail-secure).

`GpioDoor` drives a relay through gpiozero (any pin factory: lgpio on a Pi, `edge.gpio_gpiod.GpiodFactory` on a
Jetson, `MockFactory` in tests); `SimulatedDoor` has the same interface for demos and tests. Wire the lock so that an
unpowered relay means locked: then a crash, a power cut or a released GPIO line also leaves the door locked.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("edge.door")

CONFIRM_BEEP_S = 0.15


class GpioDoor:
    """Relay on `relay_pin`; optional status LED and buzzer. Hardware is opened on first use."""

    def __init__(
        self,
        *,
        relay_pin: int | str,
        active_high: bool = True,
        pulse_s: float = 3.0,
        led_pin: int | str | None = None,
        buzzer_pin: int | str | None = None,
        pin_factory=None,
    ) -> None:
        self.relay_pin, self.active_high, self.pulse_s = relay_pin, active_high, pulse_s
        self.led_pin, self.buzzer_pin, self.pin_factory = led_pin, buzzer_pin, pin_factory
        self._relay = self._led = self._buzzer = None

    def open(self) -> None:
        """Claim the pins (relay locked); called by the first unlock/confirm when not done explicitly."""
        if self._relay is not None:
            return
        from gpiozero import DigitalOutputDevice

        def output(pin, active_high=True):
            return DigitalOutputDevice(pin, active_high=active_high, initial_value=False, pin_factory=self.pin_factory)

        self._relay = output(self.relay_pin, self.active_high)
        self._led = output(self.led_pin) if self.led_pin is not None else None
        self._buzzer = output(self.buzzer_pin) if self.buzzer_pin is not None else None

    @property
    def is_unlocked(self) -> bool:
        return bool(self._relay is not None and self._relay.value)

    def unlock(self, pulse_s: float | None = None) -> None:
        """Energise the relay for pulse_s seconds in the background, then lock again."""
        self.open()
        seconds = self.pulse_s if pulse_s is None else pulse_s
        self._relay.on()  # energised before this returns; blink's thread then ends the pulse
        self._relay.blink(on_time=seconds, off_time=0, n=1, background=True)
        if self._led is not None:
            self._led.blink(on_time=seconds, off_time=0, n=1, background=True)
        log.info("event=door_unlock pulse_s=%s", seconds)

    def lock(self) -> None:
        """De-energise the relay now (also stops a pulse in progress)."""
        if self._relay is not None:
            self._relay.off()
        if self._led is not None:
            self._led.off()

    def confirm(self, beeps: int = 1) -> None:
        """Short beeps/flashes to acknowledge an enrolment or an admin action."""
        self.open()
        for device in (self._buzzer, self._led):
            if device is not None:
                device.blink(on_time=CONFIRM_BEEP_S, off_time=CONFIRM_BEEP_S, n=beeps, background=True)

    def close(self) -> None:
        """Lock, then release the pins. Safe to call more than once."""
        self.lock()
        for device in (self._relay, self._led, self._buzzer):
            if device is not None:
                device.close()
        self._relay = self._led = self._buzzer = None

    def __enter__(self) -> "GpioDoor":
        self.open()
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SimulatedDoor:
    """No hardware: keeps the relay state and a history of actions, for `make demo` and tests."""

    def __init__(self, *, pulse_s: float = 3.0, clock=time.monotonic) -> None:
        self.pulse_s = pulse_s
        self.clock = clock
        self.history: list[tuple[float, str]] = []
        self._until = float("-inf")
        self._lock = threading.Lock()

    def open(self) -> None:
        self.lock()

    @property
    def is_unlocked(self) -> bool:
        return self.clock() < self._until

    def unlock(self, pulse_s: float | None = None) -> None:
        with self._lock:
            self._until = self.clock() + (self.pulse_s if pulse_s is None else pulse_s)
            self.history.append((self.clock(), "unlock"))
        log.info("event=door_unlock simulated=1 pulse_s=%s", self.pulse_s if pulse_s is None else pulse_s)

    def lock(self) -> None:
        with self._lock:
            self._until = float("-inf")
            self.history.append((self.clock(), "lock"))

    def confirm(self, beeps: int = 1) -> None:
        self.history.append((self.clock(), f"confirm x{beeps}"))

    def close(self) -> None:
        self.lock()

    def __enter__(self) -> "SimulatedDoor":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
