"""MQTT surface: the door as a Home Assistant lock, its decisions as events, an optional guarded remote unlock.

The payload builders are pure functions. `MqttBridge` runs beside the door loop and never blocks it: the loop
only calls `publish_event` (a queue put); one worker thread owns an on-disk outbox (SQLite, bounded, oldest
dropped with a counted warning) and hands its rows to paho-mqtt in order, deleting each once the broker has
acknowledged it. paho keeps an unacknowledged message and resends it after a reconnect, and a row is handed to
paho once per process, so a broker outage costs neither events nor duplicates; each event carries its audit row
id so a consumer can tell them apart across restarts.

Topics (<root> = <base_topic>/<client_id>): availability (online/offline, last will), lock/state
(LOCKED/UNLOCKED/JAMMED), lock/set (LOCK/UNLOCK commands), events (one JSON per audited decision), last_person,
camera and liveness (ON/OFF), diagnostics (JSON). Discovery configs go to
<discovery_prefix>/<component>/<client_id>/<object>/config, again when Home Assistant says `online`.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import queue
import re
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge import __version__
from edge.config import MqttConfig
from edge.decide import Decision
from edge.errors import ConfigError, EdgeError, first_line

log = logging.getLogger("edge.mqtt")

LOCKED, UNLOCKED, JAMMED = "LOCKED", "UNLOCKED", "JAMMED"
ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"
HA_STATUS_TOPIC_SUFFIX = "status"
DECISION_EVENTS = ("unlock", "unknown", "remote_unlock")
CAMERA_EVENTS = {"camera_lost": OFF, "camera_ok": ON}
LIVENESS_PREFIX = "liveness"  # a kiosk event named liveness_* reports a failed liveness check
LIVENESS_OFF_DELAY_S = 30
POLL_S = 0.05
INFLIGHT_MAX = 20
KNOWN = "known"
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Topics:
    root: str
    discovery_prefix: str

    @property
    def availability(self) -> str:
        return f"{self.root}/availability"

    @property
    def lock_state(self) -> str:
        return f"{self.root}/lock/state"

    @property
    def lock_command(self) -> str:
        return f"{self.root}/lock/set"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def last_person(self) -> str:
        return f"{self.root}/last_person"

    @property
    def camera(self) -> str:
        return f"{self.root}/camera"

    @property
    def liveness(self) -> str:
        return f"{self.root}/liveness"

    @property
    def diagnostics(self) -> str:
        return f"{self.root}/diagnostics"

    @property
    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/{HA_STATUS_TOPIC_SUFFIX}"


def device_id(cfg: MqttConfig) -> str:
    """The client id, also the Home Assistant device id: configured, else edge-access-<hostname>."""
    return cfg.client_id or re.sub(r"[^A-Za-z0-9_-]", "_", f"edge-access-{socket.gethostname()}")


def topics_for(cfg: MqttConfig) -> Topics:
    return Topics(root=f"{cfg.base_topic}/{device_id(cfg)}", discovery_prefix=cfg.discovery_prefix)


def device_block(dev_id: str) -> dict:
    return {"identifiers": [dev_id], "name": f"Door {dev_id}", "manufacturer": "edge-access",
            "model": "face-recognition door controller", "sw_version": __version__}


ORIGIN = {"name": "edge-access", "sw_version": __version__}


def discovery_messages(cfg: MqttConfig) -> list[tuple[str, dict]]:
    """(config topic, payload) for every entity: the lock, last person, decision events, camera, liveness,
    and the diagnostics (fps, people enrolled, events waiting, events dropped)."""
    dev_id, t = device_id(cfg), topics_for(cfg)
    common = {"availability_topic": t.availability, "payload_available": ONLINE, "payload_not_available": OFFLINE,
              "device": device_block(dev_id), "origin": ORIGIN, "qos": cfg.qos}
    lock = {"name": "Door", "command_topic": t.lock_command, "state_topic": t.lock_state, "payload_lock": "LOCK",
            "payload_unlock": "UNLOCK", "state_locked": LOCKED, "state_unlocked": UNLOCKED, "state_jammed": JAMMED,
            "optimistic": False, "retain": False, "icon": "mdi:door"}
    if cfg.remote_unlock:
        lock |= {"code_format": cfg.code_format,
                 "command_template": '{"action": "{{ value }}", "code": "{{ code }}"}'}
    entities = {
        ("lock", "door"): lock,
        ("sensor", "last_person"): {"name": "Last person", "state_topic": t.last_person,
                                    "value_template": "{{ value_json.person }}", "json_attributes_topic": t.last_person,
                                    "icon": "mdi:account-check"},
        ("event", "decision"): {"name": "Decision", "state_topic": t.events, "event_types": list(DECISION_EVENTS),
                                "icon": "mdi:face-recognition"},
        ("binary_sensor", "camera"): {"name": "Camera", "state_topic": t.camera, "device_class": "connectivity",
                                      "entity_category": "diagnostic"},
        ("binary_sensor", "liveness_failure"): {"name": "Liveness failure", "state_topic": t.liveness,
                                                "device_class": "problem", "off_delay": LIVENESS_OFF_DELAY_S},
        ("sensor", "fps"): _diagnostic(t, "Frame rate", "fps", "fps"),
        ("sensor", "people"): _diagnostic(t, "People enrolled", "people", None),
        ("sensor", "outbox"): _diagnostic(t, "Events waiting", "outbox", None),
        ("sensor", "dropped"): _diagnostic(t, "Events dropped", "dropped", None),
    }
    return [(f"{cfg.discovery_prefix}/{component}/{dev_id}/{object_id}/config",
             {**common, **payload, "unique_id": f"{dev_id}_{object_id}"})
            for (component, object_id), payload in entities.items()]


def _diagnostic(t: Topics, name: str, key: str, unit: str | None) -> dict:
    payload = {"name": name, "state_topic": t.diagnostics, "value_template": f"{{{{ value_json.{key} }}}}",
               "entity_category": "diagnostic", "state_class": "measurement"}
    return payload | ({"unit_of_measurement": unit} if unit else {})


def iso_time(t_unix: float) -> str:
    return datetime.fromtimestamp(t_unix, timezone.utc).isoformat(timespec="milliseconds")


def event_payload(event: dict, *, event_id: str, t_unix: float, publish_names: bool) -> dict:
    """The JSON published for one audited decision; `event_type` is what Home Assistant's event entity reads."""
    person = event.get("person")
    if person is not None and not publish_names and event["event"] != "remote_unlock":
        person = KNOWN
    payload = {"id": event_id, "event_type": event["event"], "person": person, "t_unix": round(t_unix, 3),
               "time": iso_time(t_unix)}
    payload.update({k: event[k] for k in ("distance_l2", "track", "door") if event.get(k) is not None})
    return payload


def last_person_payload(event: dict, *, t_unix: float, publish_names: bool) -> dict:
    person = event["person"] if publish_names else KNOWN
    return {"person": person, "distance_l2": event.get("distance_l2"), "time": iso_time(t_unix)}


def lock_state(door) -> str:
    """LOCKED/UNLOCKED from the relay; JAMMED when the door output cannot even be read."""
    try:
        return UNLOCKED if door.is_unlocked else LOCKED
    except Exception as err:  # any failure of the output driver: Home Assistant must see it
        log.debug("event=door_output_failed error=%s", first_line(err))
        return JAMMED


def parse_command(payload: bytes) -> tuple[str, str | None]:
    """(action, code) from `LOCK`/`UNLOCK` or the JSON that the discovery's command_template produces."""
    text = payload.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text.upper(), None
    if not isinstance(data, dict):
        return text.upper(), None
    code = data.get("code")
    return str(data.get("action", "")).upper(), None if code in (None, "None", "") else str(code)


class Outbox:
    """Events waiting for the broker's ack, in order, on disk; at most `max_events` (the oldest go first)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL,"
              " topic TEXT NOT NULL, payload TEXT NOT NULL)")

    def __init__(self, path: Path, max_events: int) -> None:
        self.path, self.max_events = Path(path), max_events
        self.dropped = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)  # then the worker's
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(self.SCHEMA)
        except (sqlite3.Error, OSError) as err:
            raise ConfigError(f"mqtt outbox {self.path} cannot be opened: {err}") from None

    def add(self, event_id: str, topic: str, payload: str) -> bool:
        """Queue one event; False when that id is already queued. Drops the oldest beyond max_events."""
        cursor = self._db.execute("INSERT OR IGNORE INTO outbox (event_id, topic, payload) VALUES (?, ?, ?)",
                                  (event_id, topic, payload))
        excess = len(self) - self.max_events
        if excess > 0:
            self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,))
            self.dropped += excess
            log.warning("event=mqtt_outbox_full dropped=%d dropped_total=%d max_events=%d",
                        excess, self.dropped, self.max_events)
        return cursor.rowcount == 1

    def after(self, seq: int, limit: int) -> list[tuple[int, str, str]]:
        """(seq, topic, payload) of the oldest rows after seq."""
        return self._db.execute("SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()

    def remove(self, seq: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"mqtt.{what} {path} cannot be read: {err.strerror}") from None


def make_client(cfg: MqttConfig, client_id: str):
    """A paho client with the configured credentials and TLS (not connected)."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if cfg.username:
        password = read_secret(cfg.password_file, "password_file") if cfg.password_file else None
        client.username_pw_set(cfg.username, password)
    if cfg.tls_ca:
        client.tls_set(ca_certs=str(cfg.tls_ca), certfile=cfg.tls_cert and str(cfg.tls_cert),
                       keyfile=cfg.tls_key and str(cfg.tls_key))
    return client


def check_broker(cfg: MqttConfig, timeout_s: float = 5.0) -> str:
    """For `doctor`: connect once with the configured credentials and TLS (under its own client id, so a running
    controller stays connected); a line saying so, or EdgeError why not."""
    client = make_client(cfg, f"{device_id(cfg)}-doctor")
    outcome: list[str] = []
    client.on_connect = lambda _c, _u, _f, reason_code, _p: outcome.append(str(reason_code))
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    except OSError as err:
        raise EdgeError(f"broker {cfg.host}:{cfg.port} unreachable: {first_line(err.strerror or err)}") from None
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    while not outcome and time.monotonic() < deadline:
        time.sleep(POLL_S)
    client.disconnect()
    client.loop_stop()
    if not outcome:
        raise EdgeError(f"broker {cfg.host}:{cfg.port} did not answer within {timeout_s:g} s")
    if outcome[0] != "Success":
        raise EdgeError(f"broker {cfg.host}:{cfg.port} refused the connection: {outcome[0]} "
                        "(check mqtt.username, password_file and TLS settings)")
    return f"connected to {cfg.host}:{cfg.port} as {cfg.username or 'anonymous'}, topics under {topics_for(cfg).root}/"


class MqttBridge:
    """The MQTT client and its worker thread. `start()` returns at once (the broker may be down); `close()`
    publishes `offline`, waits briefly for the outbox to drain and disconnects."""

    def __init__(self, cfg: MqttConfig, *, door, audit=None, stats=None) -> None:
        self.cfg, self.door, self.audit = cfg, door, audit
        self.stats = stats or (lambda: {})
        self.topics = topics_for(cfg)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._acked: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._announce = threading.Event()
        self._connected = threading.Event()
        self._refused_reason: str | None = None
        self._last_attempt_s = float("-inf")
        self._code = read_secret(cfg.unlock_code_file, "unlock_code_file") if cfg.remote_unlock else None
        if self._code is not None and not re.fullmatch(cfg.code_format, self._code):
            raise ConfigError(f"mqtt.unlock_code_file {cfg.unlock_code_file}: the code does not match code_format")
        self.sent = 0  # rows handed to paho in this process
        self.pending = 0  # rows in the outbox, as the worker last counted
        self._retained: dict[str, str] = {self.topics.camera: ON}
        self.client = make_client(cfg, device_id(cfg))
        self.client.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        self.client.max_inflight_messages_set(INFLIGHT_MAX)
        self.client.reconnect_delay_set(min_delay=1, max_delay=math.ceil(cfg.reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="mqtt-outbox", daemon=True)
        self._mids: dict[int, int] = {}  # paho message id → outbox seq, for rows handed over and not yet acked

    # ---- called from the door loop (never blocks) ----------------------------------------------------------

    def publish_event(self, event: dict) -> None:
        """Hand one kiosk event to the worker; the wall-clock time is taken now, as the event happens."""
        self._queue.put((event, time.time()))

    def tee(self, emit):
        """An emit function for the kiosk: the given sink first, then this bridge."""
        def both(event: dict) -> None:
            emit(event)
            self.publish_event(event)

        return both

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "MqttBridge":
        """Open the outbox (a problem with it is a ConfigError here, not a dead thread later) and connect."""
        if self.cfg.outbox_path is None:
            raise ConfigError("mqtt.outbox_path is not set")
        self._outbox = Outbox(self.cfg.outbox_path, self.cfg.outbox_max_events)
        log.info("event=mqtt_start broker=%s:%d root=%s remote_unlock=%s", self.cfg.host, self.cfg.port,
                 self.topics.root, self.cfg.remote_unlock)
        self._worker.start()
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        """True once the broker has accepted the connection (False after timeout_s)."""
        return self._connected.wait(timeout_s)

    def close(self, drain_s: float = 2.0) -> None:
        deadline = time.monotonic() + drain_s
        while self._connected.is_set() and (not self._queue.empty() or self.pending) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self._stop.set()
        self._worker.join()
        if self._connected.is_set():
            self.client.publish(self.topics.availability, OFFLINE, qos=1, retain=True).wait_for_publish(1.0)
        self._connected.clear()  # a disconnect of our own is not worth a warning
        self.client.disconnect()
        self.client.loop_stop()
        if self.audit is not None:
            self.audit.close()

    # ---- paho's network thread -------------------------------------------------------------------------------

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            reason = str(reason_code)
            if reason != self._refused_reason:
                self._refused_reason = reason
                log.error("event=mqtt_refused broker=%s:%d reason=%r (check mqtt.username, password_file and the "
                          "broker's ACL; the door keeps working, events wait in %s)", self.cfg.host, self.cfg.port,
                          reason, self.cfg.outbox_path)
            return
        self._refused_reason = None
        client.subscribe([(self.topics.lock_command, 1), (self.topics.ha_status, 1)])
        self._announce.set()  # before _connected: the worker announces first, then publishes changes
        self._connected.set()
        log.info("event=mqtt_connected broker=%s:%d", self.cfg.host, self.cfg.port)

    def _on_connect_fail(self, _client, _userdata) -> None:
        if self._refused_reason != UNREACHABLE:
            self._refused_reason = UNREACHABLE
            log.warning("event=mqtt_unreachable broker=%s:%d (retrying every %g s at most; the door keeps working, "
                        "events wait in %s)", self.cfg.host, self.cfg.port, self.cfg.reconnect_max_s,
                        self.cfg.outbox_path)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if self._connected.is_set():
            log.warning("event=mqtt_disconnected reason=%r (events wait on disk until the broker is back)",
                        str(reason_code))
        self._connected.clear()

    def _on_publish(self, _client, _userdata, mid, _reason_code, _properties) -> None:
        self._acked.put(mid)  # matched to its outbox row by the worker (no lock shared with paho's own)

    def _on_message(self, _client, _userdata, message) -> None:
        if message.topic == self.topics.ha_status:
            if message.payload.decode(errors="replace").strip() == ONLINE:
                self._announce.set()
            return
        self._command(message)

    def _command(self, message) -> None:
        """LOCK always; UNLOCK only when enabled, with the code, rate-limited, never from a retained message."""
        action, code = parse_command(message.payload)
        user = self.cfg.username or "anonymous"
        if message.retain:
            log.warning("event=remote_command_ignored reason=retained action=%s topic=%s", action, message.topic)
            return
        if action == "LOCK":
            self.door.lock()
            log.info("event=remote_lock mqtt_user=%s", user)
            return
        if action != "UNLOCK":
            log.warning("event=remote_command_ignored reason=unknown_action action=%r", action[:20])
            return
        if not self.cfg.remote_unlock:
            log.warning("event=remote_unlock_refused reason=disabled mqtt_user=%s", user)
            return
        now = time.monotonic()
        if now - self._last_attempt_s < self.cfg.remote_unlock_interval_s:
            log.warning("event=remote_unlock_refused reason=rate_limited mqtt_user=%s", user)
            return
        self._last_attempt_s = now
        if code is None or not hmac.compare_digest(code.encode(), self._code.encode()):
            log.warning("event=remote_unlock_refused reason=wrong_code mqtt_user=%s", user)
            return
        self.door.unlock()
        person = f"mqtt:{user}"
        event = {"event": "remote_unlock", "person": person, "door": "pulse"}
        if self.audit is not None:
            decision = Decision("remote_unlock", person, -1, -1, 0.0, math.nan, math.nan, 0, -1, (0.0, 0.0, 0.0, 0.0))
            event["audit_id"] = self.audit.record(decision, door_action="pulse")
        log.info("event=remote_unlock mqtt_user=%s audit_id=%s", user, event.get("audit_id"))
        self.publish_event(event)

    # ---- the worker thread -----------------------------------------------------------------------------------

    def _work(self) -> None:
        outbox = self._outbox
        handed = 0  # the highest outbox seq handed to paho in this process
        state = None
        next_diagnostics_s = 0.0
        try:
            while not self._stop.is_set():
                self._take_events(outbox)
                while not self._acked.empty():
                    seq = self._mids.pop(self._acked.get(), None)
                    if seq is not None:
                        outbox.remove(seq)
                new_state = lock_state(self.door)
                changed, state = new_state != state, new_state
                if changed and state == JAMMED:
                    log.error("event=door_jammed (the relay output cannot be read; Home Assistant shows the lock jammed)")
                self._retained[self.topics.lock_state] = state
                if self._connected.is_set():
                    if self._announce.is_set():
                        self._announce.clear()
                        self._announce_all()
                    elif changed:
                        self._publish_retained(self.topics.lock_state, state)
                    handed = self._hand_over(outbox, handed)
                    if time.monotonic() >= next_diagnostics_s:
                        next_diagnostics_s = time.monotonic() + self.cfg.diagnostics_interval_s
                        self._publish_diagnostics(outbox)
                self.pending = len(outbox)
                time.sleep(POLL_S)
            self._take_events(outbox)
            if self._connected.is_set():  # the run's final numbers
                self._publish_diagnostics(outbox)
        finally:
            outbox.close()

    def _take_events(self, outbox: Outbox) -> None:
        while not self._queue.empty():
            event, t_unix = self._queue.get()
            name = event.get("event", "")
            if name in CAMERA_EVENTS:
                self._set_retained(self.topics.camera, CAMERA_EVENTS[name])
            elif name.startswith(LIVENESS_PREFIX):
                self._publish_retained(self.topics.liveness, ON)
            if name not in DECISION_EVENTS:
                continue
            if name == "unlock" and event.get("person"):
                person = last_person_payload(event, t_unix=t_unix, publish_names=self.cfg.publish_names)
                self._set_retained(self.topics.last_person, json.dumps(person))
            event_id = str(event.get("audit_id") or f"{name}-{t_unix:.6f}")
            payload = event_payload(event, event_id=event_id, t_unix=t_unix, publish_names=self.cfg.publish_names)
            if not outbox.add(event_id, self.topics.events, json.dumps(payload)):
                log.warning("event=mqtt_duplicate_ignored id=%s", event_id)

    def _hand_over(self, outbox: Outbox, handed: int) -> int:
        """Give paho the next rows, keeping at most INFLIGHT_MAX unacknowledged; returns the last seq handed."""
        room = INFLIGHT_MAX - len(self._mids)
        for seq, topic, payload in outbox.after(handed, room) if room > 0 else []:
            self._mids[self.client.publish(topic, payload, qos=self.cfg.qos).mid] = seq
            handed = seq
            self.sent += 1
        return handed

    def _set_retained(self, topic: str, payload: str) -> None:
        self._retained[topic] = payload
        self._publish_retained(topic, payload)

    def _publish_retained(self, topic: str, payload: str) -> None:
        """States are retained: the latest one is republished on every (re)connect, never queued."""
        if self._connected.is_set():
            self.client.publish(topic, payload, qos=self.cfg.qos, retain=True)

    def _announce_all(self) -> None:
        for topic, payload in discovery_messages(self.cfg):
            self.client.publish(topic, json.dumps(payload), qos=1, retain=True)
        self.client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        for topic, payload in self._retained.items():
            self.client.publish(topic, payload, qos=self.cfg.qos, retain=True)

    def _publish_diagnostics(self, outbox: Outbox) -> None:
        payload = {**self.stats(), "outbox": len(outbox), "dropped": outbox.dropped}
        self.client.publish(self.topics.diagnostics, json.dumps(payload), qos=self.cfg.qos, retain=True)
