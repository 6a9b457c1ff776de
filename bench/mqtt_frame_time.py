"""Door-loop frame time with MQTT off and on, in one run: two real kiosks (real pipeline, own store, audit log and
simulated door each) step through the same sample-video frames (640 px) side by side, in alternating order, so
that noise from a shared machine hits both alike; the button enrolment at frame 40 makes the unlock, audit and
event paths run. "On" is a kiosk whose events go to a connected MqttBridge that also polls its relay.

Reported: each kiosk's median step and the median of the per-frame differences (on − off).
Goal: the difference within 1 ms; printed here, never asserted in a timed test.
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
FPS = 25.0


def new_kiosk(pipeline: Pipeline, config: Config, tmp: Path, door, emit) -> tuple[Kiosk, AuditLog]:
    name = uuid.uuid4().hex[:8]
    store = Store.open(tmp / f"{name}.edgestore", fingerprint=pipeline.embedder.fingerprint)
    audit = AuditLog(tmp / f"{name}.sqlite")
    return Kiosk(config=config, pipeline=pipeline, store=store, door=door, audit=audit, emit=emit,
                 press_button_at={BUTTON_FRAME}), audit


def timed_step(kiosk: Kiosk, frame: Frame) -> float:
    start = time.perf_counter()
    kiosk.step(frame)
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4, help="times through the video")
    parser.add_argument("--broker", default=os.environ.get("EDGE_TEST_MQTT", "127.0.0.1:1883"), help="host:port")
    args = parser.parse_args()
    host, _, port = args.broker.rpartition(":")
    config = Config()
    pipeline = Pipeline(config)
    frames = [image for image, _ in video_frames(VIDEO)]
    pipeline.analyze(frames[0])  # warm-up
    door_on = SimulatedDoor(pulse_s=config.door.pulse_s)
    off_ms: list[float] = []
    on_ms: list[float] = []
    events = {"off": 0, "on": 0}
    with tempfile.TemporaryDirectory() as tmp:
        mqtt = MqttConfig(enabled=True, host=host or "127.0.0.1", port=int(port), client_id=f"bench-{uuid.uuid4().hex[:8]}",
                          base_topic="edge-access-bench", outbox_path=Path(tmp) / "outbox.sqlite")
        bridge = MqttBridge(mqtt, door=door_on, stats=lambda: {"people": 1}).start()
        if not bridge.wait_connected(CONNECT_S):
            print(f"mqtt_frame_time: no broker at {args.broker} (start mosquitto or pass --broker)", file=sys.stderr)
            bridge.close(drain_s=0.0)
            return 2
        try:
            for _ in range(args.passes):
                off, off_audit = new_kiosk(pipeline, config, Path(tmp), SimulatedDoor(), None)
                on, on_audit = new_kiosk(pipeline, config, Path(tmp), door_on, bridge.tee(lambda event: None))
                for index, image in enumerate(frames):
                    frame = Frame(image, index, index / FPS)
                    if index % 2:
                        on_ms.append(timed_step(on, frame))
                        off_ms.append(timed_step(off, frame))
                    else:
                        off_ms.append(timed_step(off, frame))
                        on_ms.append(timed_step(on, frame))
                for mode, kiosk, audit in (("off", off, off_audit), ("on", on, on_audit)):
                    events[mode] += sum(kiosk.counts.values())
                    audit.close()
        finally:
            bridge.close()
    pipeline.close()
    difference = statistics.median(b - a for a, b in zip(off_ms, on_ms))
    print(f"mqtt_frame_time: {args.passes} passes × {len(frames)} frames, MQTT off and on side by side "
          f"(640 px, {pipeline.embedder.name}), broker {args.broker}")
    print(f"  step ms median: off {statistics.median(off_ms):.2f}  on {statistics.median(on_ms):.2f};  "
          f"per-frame difference on − off: median {difference:+.2f} "
          f"(goal within ±{GOAL_MS:g}: {'ok' if abs(difference) <= GOAL_MS else 'OVER'})")
    print(f"  kiosk events: off {events['off']}, on {events['on']}; decisions handed to the broker {bridge.sent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
