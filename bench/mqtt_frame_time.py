"""Door-loop frame time with MQTT off and on, in one run: the real kiosk step (real pipeline, store, audit log,
simulated door) on the sample video at 640 px, with the button enrolment at frame 40 so the unlock, audit and
event paths run; passes alternate off/on so drift hits both alike. "On" means a connected MqttBridge that gets
every event and polls the relay for the lock state.

Goal: median step with MQTT on within 1 ms of off; printed here, never asserted in a timed test.
Usage: python bench/mqtt_frame_time.py [--passes 4] [--broker 127.0.0.1:1883]   (default broker: $EDGE_TEST_MQTT)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.audit import AuditLog  # noqa: E402
from edge.bench import video_frames  # noqa: E402
from edge.config import Config, MqttConfig  # noqa: E402
from edge.door import SimulatedDoor  # noqa: E402
from edge.kiosk import Kiosk  # noqa: E402
from edge.mqtt import MqttBridge  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.store import Store  # noqa: E402
from edge.types import Frame  # noqa: E402

VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
BUTTON_FRAME = 40
GOAL_MS = 1.0
CONNECT_S = 5.0


def one_pass(pipeline: Pipeline, frames: list, config: Config, tmp: Path, door, bridge) -> tuple[list[float], dict]:
    """Step times (ms) of a fresh kiosk over the frames; its summary counts."""
    name = uuid.uuid4().hex[:8]
    store = Store.open(tmp / f"{name}.edgestore", fingerprint=pipeline.embedder.fingerprint)
    audit = AuditLog(tmp / f"{name}.sqlite")
    kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=door, audit=audit,
                  emit=bridge.tee(lambda event: None) if bridge else None, press_button_at={BUTTON_FRAME})
    step_ms = []
    for index, image in enumerate(frames):
        start = time.perf_counter()
        kiosk.step(Frame(image, index, index / 25.0))
        step_ms.append((time.perf_counter() - start) * 1e3)
    audit.close()
    return step_ms, kiosk.summary(len(frames), sum(step_ms) / 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4, help="passes per mode (each is the whole video)")
    parser.add_argument("--broker", default=os.environ.get("EDGE_TEST_MQTT", "127.0.0.1:1883"), help="host:port")
    args = parser.parse_args()
    host, _, port = args.broker.rpartition(":")
    config = Config()
    pipeline = Pipeline(config)
    frames = [image for image, _ in video_frames(VIDEO)]
    pipeline.analyze(frames[0])  # warm-up
    door = SimulatedDoor(pulse_s=config.door.pulse_s)
    with tempfile.TemporaryDirectory() as tmp:
        mqtt = MqttConfig(enabled=True, host=host or "127.0.0.1", port=int(port), client_id=f"bench-{uuid.uuid4().hex[:8]}",
                          base_topic="edge-access-bench", outbox_path=Path(tmp) / "outbox.sqlite")
        bridge = MqttBridge(mqtt, door=door, stats=lambda: {"people": 1}).start()
        if not bridge.wait_connected(CONNECT_S):
            print(f"mqtt_frame_time: no broker at {args.broker} (start mosquitto or pass --broker)", file=sys.stderr)
            bridge.close(drain_s=0.0)
            return 2
        times: dict[str, list[float]] = {"off": [], "on": []}
        events = {"off": 0, "on": 0}
        try:
            for i in range(args.passes):
                for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    step_ms, summary = one_pass(pipeline, frames, config, Path(tmp), door,
                                                bridge if mode == "on" else None)
                    times[mode] += step_ms
                    events[mode] += sum(v for k, v in summary.items() if k.endswith("_events"))
        finally:
            bridge.close()
        sent = bridge.sent
    pipeline.close()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    p95 = {m: statistics.quantiles(t, n=20)[-1] for m, t in times.items()}
    print(f"mqtt_frame_time: {args.passes} passes × {len(frames)} frames per mode (640 px, {pipeline.embedder.name}), "
          f"broker {args.broker}")
    print(f"  step ms median: off {off:.2f}  on {on:.2f}  difference {on - off:+.2f} "
          f"(goal ≤ {GOAL_MS:g}: {'ok' if abs(on - off) <= GOAL_MS else 'OVER'});  p95 off {p95['off']:.2f} on {p95['on']:.2f}")
    print(f"  kiosk events: off {events['off']}, on {events['on']}; events handed to the broker {sent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
