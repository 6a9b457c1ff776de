"""MQTT and Home Assistant: discovery payloads against HA's documented schema keys, the outbox, and a real Mosquitto
for the rest: the lock following the relay on the sample video, a broker killed and restarted mid-run (every event
exactly once, in order), a wrong password, and the guarded remote unlock (code, rate limit, retained ignored).

Brokers: a throwaway `mosquitto` per test (tests/mqtt_broker.py); tests that only need an anonymous broker use
EDGE_TEST_MQTT=host:port instead when it is set.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from conftest import cli, wait_until
from mqtt_broker import Mosquitto, make_tls_files

from edge.audit import AuditLog
from edge.config import MqttConfig
from edge.decide import Decision
from edge.door import SimulatedDoor
from edge.errors import ConfigError, EdgeError
from edge.mqtt import (
    JAMMED, LOCKED, UNLOCKED, MqttBridge, Outbox, device_id, discovery_messages, event_payload, lock_state,
    check_broker, parse_command, topics_for,
)

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
DELIVERY_S = 20.0
OUTAGE_S = 10.0
EVENT_PERIOD_S = 0.05
STALL_S = 0.25  # a door loop step that waited on the broker would take seconds; this is far above a queue put

# ---- Home Assistant's schema keys, from its MQTT integration docs (lock.mqtt, sensor.mqtt, binary_sensor.mqtt,
# event.mqtt: "Configuration Variables") and the discovery page (origin). `platform` is only for device-based
# discovery, which we do not use. unique_id, device and origin are optional for HA; we require them because the
# entities must join one device in the registry and show where they come from.
HA_COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device", "enabled_by_default",
    "encoding", "entity_category", "entity_picture", "icon", "json_attributes_template", "json_attributes_topic",
    "name", "object_id", "payload_available", "payload_not_available", "qos", "unique_id", "origin",
}
HA_SCHEMA = {
    "lock": ({"command_topic"}, {
        "code_format", "command_template", "command_topic", "optimistic", "payload_lock", "payload_unlock",
        "payload_open", "payload_reset", "retain", "state_jammed", "state_locked", "state_locking", "state_topic",
        "state_unlocked", "state_unlocking", "value_template"}),
    "sensor": ({"state_topic"}, {
        "device_class", "expire_after", "force_update", "last_reset_value_template", "options",
        "suggested_display_precision", "state_class", "state_topic", "unit_of_measurement", "value_template"}),
    "binary_sensor": ({"state_topic"}, {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off", "payload_on", "state_topic",
        "value_template"}),
    "event": ({"state_topic", "event_types"}, {"device_class", "event_types", "state_topic", "value_template"}),
}
OUR_REQUIRED = {"unique_id", "device", "origin", "availability_topic"}
HA_DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
                  "name", "serial_number", "suggested_area", "sw_version", "via_device"}
HA_ORIGIN_KEYS = {"name", "sw_version", "support_url"}
SENSOR_ENTITY_CATEGORIES = {"diagnostic"}
ENTITY_CATEGORIES = {"config", "diagnostic"}


def schema_problems(topic: str, payload: dict) -> list[str]:
    """Everything wrong with one discovery message by HA's keys; empty when it is valid."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[-1] != "config" or parts[1] not in HA_SCHEMA:
        return [f"{topic}: not <prefix>/<component>/<node_id>/<object_id>/config"]
    required, specific = HA_SCHEMA[parts[1]]
    problems = [f"{topic}: missing required key {key!r}" for key in sorted((required | OUR_REQUIRED) - payload.keys())]
    problems += [f"{topic}: key {key!r} is not in HA's schema" for key in sorted(payload.keys() - HA_COMMON - specific)]
    device, origin = payload.get("device", {}), payload.get("origin", {})
    if not device.get("identifiers") and not device.get("connections"):
        problems.append(f"{topic}: device needs identifiers or connections")
    problems += [f"{topic}: device key {k!r} unknown" for k in sorted(device.keys() - HA_DEVICE_KEYS)]
    if "origin" in payload and "name" not in origin:
        problems.append(f"{topic}: origin needs a name")
    problems += [f"{topic}: origin key {k!r} unknown" for k in sorted(origin.keys() - HA_ORIGIN_KEYS)]
    categories = SENSOR_ENTITY_CATEGORIES if parts[1] in ("sensor", "binary_sensor") else ENTITY_CATEGORIES
    if "entity_category" in payload and payload["entity_category"] not in categories:
        problems.append(f"{topic}: entity_category {payload['entity_category']!r}")
    return problems


def mqtt_config(tmp_path: Path, broker=None, **overrides) -> MqttConfig:
    host, port = (broker.host, broker.port) if broker else ("127.0.0.1", 1883)
    values = {"enabled": True, "host": host, "port": port, "client_id": f"door-{uuid.uuid4().hex[:8]}",
              "base_topic": f"test-{uuid.uuid4().hex[:8]}", "outbox_path": tmp_path / "outbox.sqlite",
              "reconnect_max_s": 1.0, "keepalive_s": 5, **overrides}
    return MqttConfig(**values)


class Watcher:
    """A subscriber that records (topic, payload, retain) of everything under the given filters."""

    def __init__(self, broker, *topic_filters: str, client_id: str | None = None, clean: bool = True,
                 user: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, str, bool]] = []
        self.ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"w-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean)
        if user:
            self.client.username_pw_set(*user)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.filters = topic_filters
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload.decode(), bool(m.retain)))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.ready.wait(5.0), "the test subscriber could not connect"

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(f, 1) for f in self.filters])

    def on(self, topic: str) -> list[str]:
        return [payload for t, payload, _ in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    """An anonymous broker: EDGE_TEST_MQTT (host:port) when set, else a throwaway mosquitto."""
    given = os.environ.get("EDGE_TEST_MQTT")
    if given:
        host, _, port = given.rpartition(":")
        yield type("Broker", (), {"host": host or "127.0.0.1", "port": int(port)})()
        return
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()


def decision(event: str, person: str | None, i: int) -> Decision:
    return Decision(event, person, i, i, i / 25, 0.2, 0.1, 3, i - 2, (0.0, 0.0, 10.0, 10.0))


# ---- pure functions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remote_unlock", [False, True])
def test_discovery_payloads_follow_home_assistant_schema(tmp_path, remote_unlock):
    code = tmp_path / "code"
    code.write_text("4321\n")
    cfg = mqtt_config(tmp_path, remote_unlock=remote_unlock, unlock_code_file=code)
    messages = discovery_messages(cfg)
    assert [problem for topic, payload in messages for problem in schema_problems(topic, payload)] == []
    components = sorted(topic.split("/")[1] for topic, _ in messages)
    assert components.count("lock") == 1 and components.count("event") == 1
    assert components.count("binary_sensor") == 2 and components.count("sensor") == 5
    unique_ids = [payload["unique_id"] for _, payload in messages]
    assert len(set(unique_ids)) == len(unique_ids)
    lock = next(payload for topic, payload in messages if "/lock/" in topic)
    assert (lock["state_locked"], lock["state_unlocked"], lock["state_jammed"]) == (LOCKED, UNLOCKED, JAMMED)
    assert lock["device"]["identifiers"] == [device_id(cfg)] and lock["device"]["sw_version"]
    assert ("code_format" in lock) == remote_unlock and lock["retain"] is False
    topics = topics_for(cfg)
    assert {p["availability_topic"] for _, p in messages} == {topics.availability}


@pytest.mark.parametrize("component,key", [("lock", "command_topic"), ("sensor", "state_topic"),
                                           ("binary_sensor", "state_topic"), ("event", "event_types"),
                                           ("lock", "unique_id"), ("sensor", "origin")])
def test_schema_check_fails_on_a_missing_required_key(tmp_path, component, key):
    topic, payload = next((t, p) for t, p in discovery_messages(mqtt_config(tmp_path)) if t.split("/")[1] == component)
    assert schema_problems(topic, {k: v for k, v in payload.items() if k != key}) == \
        [f"{topic}: missing required key {key!r}"]
    assert schema_problems(topic, {**payload, "state_topik": "x"}) == [f"{topic}: key 'state_topik' is not in HA's schema"]


def test_event_payload_carries_id_type_and_original_time_and_hides_names_when_asked():
    event = {"event": "unlock", "person": "ann", "distance_l2": 0.21, "track": 4, "door": "pulse", "audit_id": 17}
    shown = event_payload(event, event_id="17", t_unix=1_700_000_000.1234, publish_names=True)
    assert shown == {"id": "17", "event_type": "unlock", "person": "ann", "t_unix": 1_700_000_000.123,
                     "time": "2023-11-14T22:13:20.123+00:00", "distance_l2": 0.21, "track": 4, "door": "pulse"}
    assert event_payload(event, event_id="17", t_unix=0.0, publish_names=False)["person"] == "known"
    unknown = event_payload({"event": "unknown", "person": None}, event_id="3", t_unix=0.0, publish_names=False)
    assert unknown["person"] is None and unknown["event_type"] == "unknown"


def test_commands_parse_plain_and_templated_payloads():
    assert parse_command(b"UNLOCK") == ("UNLOCK", None)
    assert parse_command(b' {"action": "UNLOCK", "code": "4321"} ') == ("UNLOCK", "4321")
    assert parse_command(b'{"action": "LOCK", "code": "None"}') == ("LOCK", None)
    assert parse_command(b"[1]") == ("[1]", None)


def test_lock_state_follows_the_relay_and_reports_a_failed_output_as_jammed():
    door = SimulatedDoor(pulse_s=5.0)
    assert lock_state(door) == LOCKED
    door.unlock()
    assert lock_state(door) == UNLOCKED

    class BrokenOutput:
        @property
        def is_unlocked(self):
            raise OSError("gpiochip0 line 17: input/output error")

    assert lock_state(BrokenOutput()) == JAMMED


def test_an_outbox_that_cannot_be_opened_is_one_config_error_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    bridge = MqttBridge(mqtt_config(tmp_path, outbox_path=tmp_path / "file" / "outbox.sqlite"), door=SimulatedDoor())
    with pytest.raises(ConfigError, match=r"mqtt outbox .*/file/outbox.sqlite cannot be opened"):
        bridge.start()


def test_outbox_is_ordered_bounded_on_disk_and_idempotent(tmp_path, caplog):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_events=10)
    for i in range(12):
        assert outbox.add(str(i), "t", f"p{i}")
    assert not outbox.add("11", "t", "again")
    assert outbox.dropped == 2 and len(outbox) == 10
    assert "event=mqtt_outbox_full dropped=1 dropped_total=2 max_events=10" in caplog.text
    rows = outbox.after(0, 100)
    assert [payload for _, _, payload in rows] == [f"p{i}" for i in range(2, 12)]
    outbox.remove(rows[0][0])
    outbox.close()
    reopened = Outbox(path, max_events=10)
    assert [payload for _, _, payload in reopened.after(0, 3)] == ["p3", "p4", "p5"]
    reopened.close()


# ---- a real broker -------------------------------------------------------------------------------------------


def test_discovery_availability_and_reannounce_when_home_assistant_comes_online(tmp_path, broker):
    cfg = mqtt_config(tmp_path, broker)
    topics = topics_for(cfg)
    watcher = Watcher(broker, f"{cfg.discovery_prefix}/+/{device_id(cfg)}/#", f"{topics.root}/#")
    bridge = MqttBridge(cfg, door=SimulatedDoor(), stats=lambda: {"fps": 12.5, "people": 3}).start()
    try:
        configs = dict(discovery_messages(cfg))
        assert wait_until(lambda: all(watcher.on(t) for t in configs), 5.0)
        assert {t: json.loads(watcher.on(t)[0]) for t in configs} == configs
        assert wait_until(lambda: watcher.on(topics.availability) == ["online"])
        assert wait_until(lambda: watcher.on(topics.lock_state) == [LOCKED] and watcher.on(topics.camera) == ["ON"])
        assert wait_until(lambda: watcher.on(topics.diagnostics))
        assert json.loads(watcher.on(topics.diagnostics)[0]) == {"fps": 12.5, "people": 3, "outbox": 0, "dropped": 0}
        watcher.client.publish(topics.ha_status, "online")
        assert wait_until(lambda: all(len(watcher.on(t)) == 2 for t in configs), 5.0)
    finally:
        bridge.close()
    assert wait_until(lambda: watcher.on(topics.availability)[-1:] == ["offline"])
    watcher.close()


class FlakyOutput:
    """A relay output that fails while `broken` is set, as a GPIO line lost to a driver error would."""

    broken = False

    @property
    def is_unlocked(self) -> bool:
        if self.broken:
            raise OSError("gpiochip0 line 17: input/output error")
        return False


def test_camera_liveness_and_a_jammed_output_reach_home_assistant(tmp_path, broker, caplog):
    cfg = mqtt_config(tmp_path, broker)
    topics = topics_for(cfg)
    watcher = Watcher(broker, f"{topics.root}/#")
    door = FlakyOutput()
    with caplog.at_level(logging.INFO, logger="edge.mqtt"):
        bridge = MqttBridge(cfg, door=door).start()
        try:
            assert wait_until(lambda: watcher.on(topics.camera) == ["ON"] and watcher.on(topics.lock_state) == [LOCKED])
            bridge.publish_event({"event": "camera_lost", "frame": 7})
            assert wait_until(lambda: watcher.on(topics.camera) == ["ON", "OFF"])
            bridge.publish_event({"event": "camera_ok", "frame": 9})
            bridge.publish_event({"event": "liveness_fail", "frame": 12, "person": "ann"})
            assert wait_until(lambda: watcher.on(topics.camera) == ["ON", "OFF", "ON"] and watcher.on(topics.liveness) == ["ON"])
            door.broken = True
            assert wait_until(lambda: watcher.on(topics.lock_state) == [LOCKED, JAMMED])
            time.sleep(0.3)  # several polls of the failing output
            door.broken = False
            assert wait_until(lambda: watcher.on(topics.lock_state) == [LOCKED, JAMMED, LOCKED])
        finally:
            bridge.close()
    assert caplog.text.count("event=door_jammed") == 1
    assert watcher.on(topics.events) == []  # only audited decisions are events
    watcher.close()


def test_lock_goes_locked_unlocked_locked_on_the_sample_video_unlock(tmp_path, broker, models_dir):
    cfg = mqtt_config(tmp_path, broker, diagnostics_interval_s=1.0, outbox_path=None)  # default: beside the audit log
    topics = topics_for(cfg)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"door": {"pulse_s": 0.5}, "mqtt": json.loads(cfg.model_dump_json())}))
    watcher = Watcher(broker, f"{topics.root}/#")
    result = cli("run", "--config", config, "--source", VIDEO, "--store", tmp_path / "store.edgestore",
                 "--audit", tmp_path / "audit.sqlite", "--events", tmp_path / "events.jsonl", "--door", "simulated",
                 "--press-button-at", "40")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    unlocks = [e for e in events if e["event"] == "unlock"]
    assert len(unlocks) == 1 and unlocks[0]["audit_id"] >= 1
    assert watcher.on(topics.lock_state) == [LOCKED, UNLOCKED, LOCKED]
    published = [json.loads(p) for p in watcher.on(topics.events)]
    rows = AuditLog(tmp_path / "audit.sqlite").rows()
    assert [(p["id"], p["event_type"]) for p in published] == [(str(r["id"]), r["event"]) for r in rows]
    assert json.loads(watcher.on(topics.last_person)[-1])["person"] == unlocks[0]["person"]
    assert watcher.on(topics.availability)[-1] == "offline"
    assert (tmp_path / "mqtt_outbox.sqlite").is_file()
    diagnostics = json.loads(watcher.on(topics.diagnostics)[-1])
    assert diagnostics["fps"] > 0 and diagnostics["people"] == 1 and diagnostics["outbox"] == 0
    watcher.close()


def test_broker_killed_mid_run_and_back_10s_later_every_event_once_in_order(tmp_path):
    """The door loop records a decision every 50 ms; the broker is killed (SIGKILL), restarted 10 s later on the
    same port from its last clean save (which holds the watcher's persistent subscription), and the run goes on."""
    server = Mosquitto(tmp_path / "broker", persistence=True).start()
    cfg = mqtt_config(tmp_path, server)
    topics = topics_for(cfg)
    watcher = Watcher(server, topics.events, client_id="watcher", clean=False)
    watcher.close()
    server.stop()  # saves the watcher's session: after the kill the broker comes back with it
    server.start()
    watcher = Watcher(server, topics.events, client_id="watcher", clean=False)
    audit = AuditLog(tmp_path / "audit.sqlite")
    door = SimulatedDoor(pulse_s=0.1)
    bridge = MqttBridge(cfg, door=door).start()
    assert bridge.wait_connected(5.0)
    sent: list[tuple[int, str]] = []  # (audit id, phase)
    stalls = []
    phase, started = "before", time.monotonic()
    try:
        while time.monotonic() - started < 3.0 + OUTAGE_S + 3.0:
            elapsed = time.monotonic() - started
            if phase == "before" and elapsed >= 3.0:
                server.kill()
                phase = "during"
            elif phase == "during" and elapsed >= 3.0 + OUTAGE_S:
                server.start()
                phase = "after"
            name, person = ("unlock", "ann") if len(sent) % 5 == 0 else ("unknown", None)
            audit_id = audit.record(decision(name, person, len(sent)), door_action="pulse" if person else "none")
            step = time.monotonic()
            if person:
                door.unlock()
            bridge.publish_event({"event": name, "person": person, "audit_id": audit_id, "door": "pulse"})
            sent.append((audit_id, phase))
            stalls.append(time.monotonic() - step)
            time.sleep(EVENT_PERIOD_S)
        expected = [str(audit_id) for audit_id, _ in sent]
        received = lambda: [json.loads(p)["id"] for p in watcher.on(topics.events)]  # noqa: E731
        wait_until(lambda: len(received()) >= len(expected), DELIVERY_S)
    finally:
        bridge.close()
        watcher.close()
        server.stop()
        audit.close()
    got = received()
    during = [str(i) for i, p in sent if p == "during"]
    delivered_after = len(set(during) & set(got))
    duplicates, lost = len(got) - len(set(got)), len(set(expected) - set(got))
    print(f"\noutage: events sent {len(expected)}, published during the outage {len(during)}, delivered after "
          f"{delivered_after}, duplicates {duplicates}, lost {lost}, longest door-loop call {max(stalls) * 1e3:.1f} ms")
    # enough events fell into the outage to mean something (each step also writes the audit log: on a loaded
    # 2-core machine a step takes longer than EVENT_PERIOD_S, so this floor is a quarter of the ideal count)
    assert len(during) >= OUTAGE_S / EVENT_PERIOD_S / 4
    assert (delivered_after, duplicates, lost) == (len(during), 0, 0)
    assert got == expected  # in order
    assert max(stalls) < STALL_S
    times = [json.loads(p)["t_unix"] for p in watcher.on(topics.events)]
    assert times == sorted(times) and times[-1] - times[0] >= OUTAGE_S  # original timestamps, not delivery time


ACL = """user door
topic readwrite {root}/#
topic write homeassistant/#
topic read homeassistant/status

user ha
topic read #
topic write homeassistant/status
"""


def test_wrong_password_is_one_clear_line_and_the_loop_goes_on_then_the_right_one_delivers(tmp_path, caplog):
    server = Mosquitto(tmp_path / "broker", users={"door": "s3cret", "ha": "hass"},
                       acl=ACL.format(root="acl-test")).start()
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    wrong.write_text("nope\n")
    right.write_text("s3cret\n")
    cfg = mqtt_config(tmp_path, server, username="door", password_file=wrong, base_topic="acl-test")
    topics = topics_for(cfg)
    watcher = Watcher(server, f"{topics.root}/#", "homeassistant/#", user=("ha", "hass"))
    audit = AuditLog(tmp_path / "audit.sqlite")
    try:
        with caplog.at_level(logging.INFO, logger="edge.mqtt"):
            bridge = MqttBridge(cfg, door=SimulatedDoor()).start()
            ids = []
            for i in range(3):
                ids.append(audit.record(decision("unknown", None, i), door_action="none"))
                step = time.monotonic()
                bridge.publish_event({"event": "unknown", "person": None, "audit_id": ids[-1]})
                assert time.monotonic() - step < STALL_S
                time.sleep(1.0)  # the bridge retries every second meanwhile
            assert wait_until(lambda: bridge.pending == 3)
            bridge.close(drain_s=0.0)
        refused = [r for r in caplog.records if "mqtt_refused" in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR
        assert "Not authorized" in refused[0].getMessage() and "password_file" in refused[0].getMessage()
        assert watcher.on(topics.events) == []
        with pytest.raises(EdgeError, match="refused the connection: Not authorized .*password_file"):
            check_broker(cfg)  # what `python -m edge doctor` shows
        assert check_broker(cfg.model_copy(update={"password_file": right})).startswith(
            f"connected to 127.0.0.1:{server.port} as door")
        bridge = MqttBridge(cfg.model_copy(update={"password_file": right}), door=SimulatedDoor()).start()
        assert wait_until(lambda: len(watcher.on(topics.events)) == 3, 5.0)
        assert [json.loads(p)["id"] for p in watcher.on(topics.events)] == [str(i) for i in ids]
        assert wait_until(lambda: any(t.startswith("homeassistant/lock/") for t, _, _ in watcher.messages))
        bridge.close()
    finally:
        watcher.close()
        server.stop()
        audit.close()


def test_remote_unlock_needs_the_code_is_rate_limited_audited_and_never_taken_from_a_retained_message(
        tmp_path, broker, caplog):
    code = tmp_path / "code"
    code.write_text("4321\n")
    cfg = mqtt_config(tmp_path, broker, remote_unlock=True, unlock_code_file=code, remote_unlock_interval_s=1.0)
    topics = topics_for(cfg)
    watcher = Watcher(broker, f"{topics.root}/#")
    watcher.client.publish(topics.lock_command, json.dumps({"action": "UNLOCK", "code": "4321"}), qos=1,
                           retain=True).wait_for_publish(2.0)
    door = SimulatedDoor(pulse_s=30.0)
    audit = AuditLog(tmp_path / "audit.sqlite")
    with caplog.at_level(logging.INFO, logger="edge.mqtt"):
        bridge = MqttBridge(cfg, door=door, audit=AuditLog(tmp_path / "audit.sqlite")).start()
        try:
            assert wait_until(lambda: "reason=retained" in caplog.text, 5.0)
            assert not door.is_unlocked
            watcher.client.publish(topics.lock_command, "", retain=True)  # clear it, as a user would

            def command(code_text: str) -> None:
                watcher.client.publish(topics.lock_command, json.dumps({"action": "UNLOCK", "code": code_text}), qos=1)

            command("0000")
            assert wait_until(lambda: "reason=wrong_code" in caplog.text)
            command("4321")
            assert wait_until(lambda: "reason=rate_limited" in caplog.text)
            assert not door.is_unlocked
            time.sleep(cfg.remote_unlock_interval_s)
            command("4321")
            assert wait_until(lambda: door.is_unlocked)
            assert wait_until(lambda: watcher.on(topics.lock_state)[-1:] == [UNLOCKED])
            watcher.client.publish(topics.lock_command, "LOCK", qos=1)
            assert wait_until(lambda: not door.is_unlocked and watcher.on(topics.lock_state)[-1:] == [LOCKED])
            assert wait_until(lambda: watcher.on(topics.events))
        finally:
            bridge.close()
    rows = audit.rows()
    assert [(r["event"], r["person"], r["door_action"]) for r in rows] == [("remote_unlock", "mqtt:anonymous", "pulse")]
    published = json.loads(watcher.on(topics.events)[0])
    assert (published["id"], published["event_type"], published["person"]) == \
        (str(rows[0]["id"]), "remote_unlock", "mqtt:anonymous")
    assert watcher.on(topics.lock_state) == [LOCKED, UNLOCKED, LOCKED]
    audit.close()
    watcher.close()
    shown = cli("log", "--audit", tmp_path / "audit.sqlite")
    assert shown.returncode == 0 and "remote_unlock mqtt:anonymous" in shown.stderr and "distance -" in shown.stderr


def test_remote_unlock_is_refused_while_disabled(tmp_path, broker, caplog):
    cfg = mqtt_config(tmp_path, broker)
    door = SimulatedDoor(pulse_s=30.0)
    watcher = Watcher(broker, f"{topics_for(cfg).root}/#")
    with caplog.at_level(logging.INFO, logger="edge.mqtt"):
        bridge = MqttBridge(cfg, door=door).start()
        try:
            assert bridge.wait_connected(5.0)
            time.sleep(0.2)
            watcher.client.publish(topics_for(cfg).lock_command, "UNLOCK", qos=1)
            assert wait_until(lambda: "reason=disabled" in caplog.text)
        finally:
            bridge.close()
    assert not door.is_unlocked and not any(action == "unlock" for _, action in door.history)
    watcher.close()


def test_tls_with_the_configured_ca_and_a_clear_line_for_a_wrong_one(tmp_path):
    ca, cert, key = make_tls_files(tmp_path / "tls", "broker")
    other_ca = make_tls_files(tmp_path / "tls", "other")[0]
    server = Mosquitto(tmp_path / "broker", tls=(ca, cert, key)).start()
    try:
        cfg = mqtt_config(tmp_path, server, tls_ca=ca)
        assert check_broker(cfg).startswith(f"connected to 127.0.0.1:{server.port} as anonymous")
        with pytest.raises(EdgeError, match="unreachable: .*certificate verify failed"):
            check_broker(cfg.model_copy(update={"tls_ca": other_ca}))
        bridge = MqttBridge(cfg, door=SimulatedDoor()).start()
        assert bridge.wait_connected(5.0)
        bridge.close()
    finally:
        server.stop()
