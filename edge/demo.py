"""`make demo`: the real pipeline on bundled media with a simulated door — no camera, GPIO or network needed.

1. verify: two photos of one person match, another person does not;
2. enrol the bundled people (one folder per person) into a fresh store;
3. the kiosk loop on the sample video: an enrolment button press at frame BUTTON_FRAME enrols the person at
   the door, whose later frames open the door exactly once;
4. the loop again with that enrolment: face-first-visible → relay-on latency;
5. a contact sheet PNG of annotated frames.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from edge.camera import open_source
from edge.config import Config
from edge.console import say
from edge.door import SimulatedDoor
from edge.kiosk import Kiosk
from edge.private import private_dir

BUTTON_FRAME = 40
SHEET_EVERY_FRAMES = 8
SHEET_COLUMNS = 4
SHEET_TILE_PX = (480, 270)
KNOWN_BGR, UNKNOWN_BGR = (60, 200, 60), (40, 40, 230)


def print_event(event: dict) -> None:
    print(json.dumps(event), flush=True)


def annotate(image: np.ndarray, faces, matches) -> np.ndarray:
    """Boxes and names (green known, red unknown) drawn on a copy of the frame."""
    out = image.copy()
    thickness = max(2, image.shape[1] // 400)
    for face, match in zip(faces, matches):
        left, top, right, bottom = (int(v) for v in face.face.box)
        colour = KNOWN_BGR if match is not None and match.person else UNKNOWN_BGR
        label = "unknown" if match is None else f"{match.person or 'unknown'} {match.distance_l2:.2f}"
        cv2.rectangle(out, (left, top), (right, bottom), colour, thickness)
        cv2.putText(out, label, (left, max(0, top - 10)), cv2.FONT_HERSHEY_SIMPLEX, thickness / 3, colour, thickness)
    return out


def contact_sheet(tiles: list[np.ndarray]) -> np.ndarray:
    tiles = [cv2.resize(t, SHEET_TILE_PX, interpolation=cv2.INTER_AREA) for t in tiles]
    while len(tiles) % SHEET_COLUMNS:
        tiles.append(np.zeros_like(tiles[0]))
    return np.vstack([np.hstack(tiles[i : i + SHEET_COLUMNS]) for i in range(0, len(tiles), SHEET_COLUMNS)])


def run_video(config: Config, pipeline, store, video: Path, *, press_at: set[int], sheet: list | None) -> tuple[Kiosk, dict]:
    """One pass of the real kiosk loop over the video with a simulated door; the kiosk and its summary."""
    kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=SimulatedDoor(pulse_s=config.door.pulse_s),
                  emit=print_event, press_button_at=press_at)
    started = time.perf_counter()
    frames = 0
    with open_source(str(video)) as source:
        kiosk.door.open()
        try:
            while (frame := source.read()) is not None:
                kiosk.step(frame)
                frames += 1
                if sheet is not None and frame.index % SHEET_EVERY_FRAMES == 0:
                    tile = annotate(frame.image, kiosk.last_faces, kiosk.last_matches)
                    cv2.putText(tile, f"frame {frame.index}", (30, 80), cv2.FONT_HERSHEY_SIMPLEX, 2.5, (255, 255, 255), 5)
                    sheet.append(tile)
        finally:
            kiosk.door.close()
    return kiosk, kiosk.summary(frames, time.perf_counter() - started)


def run_demo(config: Config, *, samples: Path, out_dir: Path, verify_pair, enrol_person, open_store_at) -> int:
    """Returns 0 when every step gave the expected answer."""
    from edge.pipeline import Pipeline

    private_dir(out_dir)  # it will hold a store, faces and events
    pipeline = Pipeline(config)
    ok = True
    say("demo 1/5 verify bundled photos")
    photos = samples / "photos"
    for a, b, expected in [("obama.jpg", "obama2.jpg", True), ("obama.jpg", "biden.jpg", False)]:
        result = verify_pair(pipeline, photos / a, photos / b, config.match.threshold_l2)
        say(f"  {a} vs {b}: {'match' if result['match'] else 'no match'} (distance {result['distance_l2']:.3f}, "
            f"threshold {config.match.threshold_l2})")
        ok &= result["match"] == expected

    say("demo 2/5 enrol bundled people")
    store_path = out_dir / "store.edgestore"
    for stale in out_dir.glob("store.edgestore*"):
        stale.unlink()
    store = open_store_at(store_path, pipeline.embedder.fingerprint)
    for folder in sorted(p for p in (samples / "people").iterdir() if p.is_dir()):
        enrol_person(pipeline, store, folder.name, sorted(folder.glob("*.jp*g")))

    video = samples / "video" / "walk_toward_camera.mp4"
    say(f"demo 3/5 door loop on {video.name}, enrolment button pressed at frame {BUTTON_FRAME}")
    first, stats = run_video(config, pipeline, store, video, press_at={BUTTON_FRAME}, sheet=None)
    say("  " + "  ".join(f"{k}={v}" for k, v in stats.items()))
    ok &= first.counts["enrolled"] == 1 and first.counts["unlock"] == 1

    say("demo 4/5 door loop again: the enrolled person walks up")
    tiles: list[np.ndarray] = []
    second, stats = run_video(config, pipeline, store, video, press_at=set(), sheet=tiles)
    say("  " + "  ".join(f"{k}={v}" for k, v in stats.items()))
    ok &= second.counts["unlock"] == 1

    sheet_path = out_dir / "contact_sheet.png"
    cv2.imwrite(str(sheet_path), contact_sheet(tiles))
    say(f"demo 5/5 annotated frames: {sheet_path}")
    say("demo: " + ("every step gave the expected answer" if ok else "SOME STEP GAVE AN UNEXPECTED ANSWER"))
    shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
    return 0 if ok else 1
