"""Kiosk memory over a long run: the real loop (real pipeline, store, audit log, simulated door) on the sample video,
played in a loop for 1000 frames (full 1920×1080 frames, the heavier case), with a button press at frame 40 so the
enrolment, unlock and audit paths run too. Prints peak RSS (getrusage) and current RSS, fps and the median step.

With --camera-width 640 the frames come as a USB camera at its default size delivers them: the video's frames
resized to 640 px and JPEG-encoded (an MJPEG webcam) by a child process beforehand, then played in a loop through
the product's images:// source, so the 1080p H.264 decoder's ~60 MB (a file-source artefact) is not in the figure;
--camera-width 1920 is a 1080p MJPEG camera the same way (full-size frames, no H.264 decoder).

Goal: peak RSS ≤ 250 MB over 1000 frames (issue 16); printed here, never asserted in a timed test.
Usage: python bench/kiosk_rss.py [--frames 1000] [--camera-width 640] [--people ../shared/data/people/train]
       [--no-liveness]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from edge.audit import AuditLog  # noqa: E402
from edge.bench import peak_rss_mib  # noqa: E402
from edge.camera import ImageFolderSource, open_source  # noqa: E402
from edge.config import Config  # noqa: E402
from edge.door import SimulatedDoor  # noqa: E402
from edge.kiosk import Kiosk  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.sdnotify import Notifier  # noqa: E402
from edge.store import Store  # noqa: E402
from edge.types import Frame  # noqa: E402

VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
PEOPLE = ROOT.parent / "shared" / "data" / "people" / "train"
RSS_GOAL_MIB = 250
RSS_EVERY_FRAMES = 100
BUTTON_FRAME = 40
VIDEO_FPS = 25.0
KIB_PER_MIB = 1024


def current_rss_mib() -> float:
    """Resident memory now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / KIB_PER_MIB
    raise RuntimeError("VmRSS not found in /proc/self/status")


class LoopedVideo:
    """The video file re-opened at its end, forever; indices and timestamps keep counting up like a live camera."""

    status = "ok"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._source = open_source(str(path))
        self._index = 0
        self._period_s = 0.0  # the file source stamps frame i at i / fps: frame 1 tells the period

    def read(self) -> Frame:
        frame = self._source.read()
        if frame is None:
            self._source.close()
            self._source = open_source(str(self.path))
            frame = self._source.read()
        if frame.index == 1:
            self._period_s = frame.t_s
        looped = Frame(frame.image, self._index, self._index * self._period_s)
        self._index += 1
        return looped

    def close(self) -> None:
        self._source.close()


def camera_frames(folder: Path, width_px: int) -> None:
    """The video's frames at width_px, JPEG-encoded into folder, written by a child process (its decoder's memory
    stays there)."""
    script = (
        "import sys, cv2\n"
        "capture, width, out = cv2.VideoCapture(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
        "index = 0\n"
        "while True:\n"
        "    ok, frame = capture.read()\n"
        "    if not ok:\n"
        "        break\n"
        "    frame = cv2.resize(frame, (width, round(frame.shape[0] * width / frame.shape[1])), interpolation=cv2.INTER_AREA)\n"
        "    cv2.imwrite(f'{out}/{index:05d}.jpg', frame, [cv2.IMWRITE_JPEG_QUALITY, 90])\n"
        "    index += 1\n"
    )
    subprocess.run([sys.executable, "-c", script, str(VIDEO), str(width_px), str(folder)], check=True)


def enrol_folder(store_path: Path, folder: Path, config_path: Path) -> None:
    """Enrol every person folder with `python -m edge enroll --from-dir` in a child process, as an installer does
    beside the running service (the photo detector and the photos' memory are not the door loop's)."""
    result = subprocess.run([sys.executable, "-m", "edge", "enroll", "--config", str(config_path), "--from-dir",
                             str(folder), "--largest", "--store", str(store_path)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 2):  # 2: some people were refused (said on stderr); the rest are enrolled
        raise SystemExit(f"enrolment failed: {result.stderr.strip().splitlines()[-1:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--people", type=Path, default=PEOPLE, help="folder per person to enrol first (if present)")
    parser.add_argument("--camera-width", type=int, default=None,
                        help="frames as a camera of this width delivers them (JPEG, images:// source); default: the 1080p file")
    parser.add_argument("--no-liveness", action="store_true", help="liveness.mode off, to measure what liveness costs")
    args = parser.parse_args()
    config = Config.model_validate({"liveness": {"mode": "off"}} if args.no_liveness else {})
    pipeline = Pipeline(config)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump({"liveness": {"mode": config.liveness.mode}}))
        store_path = Path(tmp) / "store.edgestore"
        if args.people.is_dir():
            enrol_folder(store_path, args.people, config_path)
        store = Store.open(store_path, fingerprint=pipeline.embedder.fingerprint)
        people = [person.name for person in store.persons]
        audit = AuditLog(Path(tmp) / "audit.sqlite")
        kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=SimulatedDoor(), audit=audit,
                      press_button_at={BUTTON_FRAME})
        rss_before_mib = current_rss_mib()
        step_ms: list[float] = []
        rss_trace: list[tuple[int, float]] = []
        step = kiosk.step

        def timed_step(frame: Frame) -> list[dict]:
            start = time.perf_counter()
            events = step(frame)
            step_ms.append((time.perf_counter() - start) * 1e3)
            if len(step_ms) % RSS_EVERY_FRAMES == 0:
                rss_trace.append((len(step_ms), round(current_rss_mib(), 1)))
            return events

        kiosk.step = timed_step  # run() calls self.step: the real loop, timed per frame
        if args.camera_width:
            (Path(tmp) / "frames").mkdir()
            camera_frames(Path(tmp) / "frames", args.camera_width)
            source = ImageFolderSource(Path(tmp) / "frames", loop=True, fps=VIDEO_FPS)
        else:
            source = LoopedVideo(VIDEO)
        started = time.perf_counter()
        try:
            frames = kiosk.run(source, notifier=Notifier(environ={}), max_frames=args.frames)
        finally:
            source.close()
            audit.close()
        elapsed_s = time.perf_counter() - started
        rss_after_mib, peak_mib = current_rss_mib(), peak_rss_mib()
        summary = kiosk.summary(frames, elapsed_s)
    pipeline.close()
    size = f"{args.camera_width}-px JPEG camera frames" if args.camera_width else "1080p frames"
    print(f"kiosk_rss: {frames} frames of {VIDEO.name} ({size}, looped, {len(people)} people enrolled first: "
          f"{', '.join(people) or 'none'}; backend {pipeline.embedder.name})")
    print(f"  fps {summary['fps']}  step ms median {statistics.median(step_ms):.1f}  "
          f"p95 {statistics.quantiles(step_ms, n=20)[-1]:.1f}  events "
          + " ".join(f"{k.removesuffix('_events')}={v}" for k, v in summary.items() if k.endswith("_events")))
    print(f"  RSS MiB: before loop {rss_before_mib:.1f}  at frame {rss_trace[-1][0]} {rss_trace[-1][1]}  "
          f"after the run (camera closed) {rss_after_mib:.1f}  peak {peak_mib:.1f}  "
          f"(goal ≤ {RSS_GOAL_MIB}: {'ok' if peak_mib <= RSS_GOAL_MIB else 'OVER'})")
    print("  RSS every 100 frames: " + " ".join(f"{n}:{mib}" for n, mib in rss_trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
