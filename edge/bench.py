"""`python -m edge bench`: per-stage medians of our pipeline and of face_recognition on the same frames, same run.

Frames: the sample video resized to 640 px wide (the kiosk's working size) and, with --photos, still photos.
Speed targets are read from this output, never asserted in timed unit tests: these machines are noisy.
"""
from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edge.config import Config
from edge.console import say
from edge.errors import InputError
from edge.images import load_image

FRAME_WIDTH_PX = 640
STAGES = ("decode", "detect", "landmarks", "align", "embed")
VIDEO_FPS = 25.0  # liveness needs frame times: the sample video's rate


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def video_frames(path: Path, width_px: int = FRAME_WIDTH_PX, limit: int | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """(frame, decode+resize ms) for each frame of a video, resized to width_px; streamed, as a camera would."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError(f"{path}: cannot open video")
    count = 0
    try:
        while limit is None or count < limit:
            start = time.perf_counter()
            ok, frame = capture.read()
            if not ok:
                break
            scale = width_px / frame.shape[1]
            frame = cv2.resize(frame, (width_px, round(frame.shape[0] * scale)), interpolation=cv2.INTER_AREA)
            count += 1
            yield frame, (time.perf_counter() - start) * 1e3
    finally:
        capture.release()
    if count == 0:
        raise InputError(f"{path}: no frames could be decoded")


def photo_frames(paths: list[Path]) -> Iterator[tuple[np.ndarray, float]]:
    for path in paths:
        start = time.perf_counter()
        image = load_image(path)
        yield image, (time.perf_counter() - start) * 1e3


def time_ours(pipeline, frames) -> dict:
    """Per-frame stage timings of our pipeline (photos); frames with exactly one face are reported separately."""
    per_stage = {stage: [] for stage in STAGES}
    totals, totals_one_face, faces_found = [], [], 0
    for image, decode_ms in frames:
        start = time.perf_counter()
        faces = pipeline.analyze(image)
        total = decode_ms + (time.perf_counter() - start) * 1e3
        per_stage["decode"].append(decode_ms)
        for stage in STAGES[1:]:
            per_stage[stage].append(pipeline.last_ms.get(stage, 0.0))
        totals.append(total)
        faces_found += bool(faces)
        if len(faces) == 1:
            totals_one_face.append(total)
    return {
        "frames": len(totals),
        "frames_with_face": faces_found,
        "stage_ms_median": {s: round(statistics.median(v), 2) for s, v in per_stage.items()},
        "total_ms_median": round(statistics.median(totals), 2),
        "total_ms_median_one_face": round(statistics.median(totals_one_face), 2) if totals_one_face else None,
    }


def time_face_recognition(frames) -> dict:
    """face_recognition (HOG detect + dlib encode), the stack we must beat, on the same frames."""
    import face_recognition

    totals, faces_found = [], 0
    for image, decode_ms in frames:
        rgb = np.ascontiguousarray(image[..., ::-1])
        start = time.perf_counter()
        boxes = face_recognition.face_locations(rgb)
        face_recognition.face_encodings(rgb, boxes)
        totals.append(decode_ms + (time.perf_counter() - start) * 1e3)
        faces_found += bool(boxes)
    return {"frames_with_face": faces_found, "total_ms_median": round(statistics.median(totals), 2)}


def time_door_loop(config: Config, pipeline, video: Path, frame_limit: int | None) -> dict:
    """The door loop's own per-frame work (`Kiosk.step`: detect (a whole scan, or following the faces of the previous
    frame: `whole_scans` counts the former), track, landmarks/align/embed for the faces that still
    need it, fuse, match, liveness, decide, door) on the 640-px frames, with a simulated door and an empty store:
    everyone at the door is a stranger, so each track is embedded every frame until a full vote window says
    unknown, then every `decide.unknown_refresh_frames` frames or when the face came closer. `faces_embedded`
    counts the faces that were embedded, `faces_seen` those detected."""
    from edge.door import SimulatedDoor
    from edge.kiosk import Kiosk
    from edge.store import Store
    from edge.types import Frame

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.edgestore", fingerprint=pipeline.embedder.fingerprint)
        loop = Kiosk(config=config, pipeline=pipeline, store=store, door=SimulatedDoor(pulse_s=config.door.pulse_s))
        liveness_ms = [0.0]
        if loop.liveness is not None:  # the liveness stage's share of each step, timed where it runs
            observe = loop.liveness.observe

            def timed_observe(*args):
                start = time.perf_counter()
                verdict = observe(*args)
                liveness_ms[0] += (time.perf_counter() - start) * 1e3
                return verdict

            loop.liveness.observe = timed_observe
        per_stage = {stage: [] for stage in STAGES + ("liveness", "rest")}
        totals, seen, embedded, with_face, whole = [], 0, 0, 0, 0
        for index, (image, decode_ms) in enumerate(video_frames(video, limit=frame_limit)):
            liveness_ms[0] = 0.0
            start = time.perf_counter()
            loop.step(Frame(image, index, index / VIDEO_FPS))
            step_ms = (time.perf_counter() - start) * 1e3
            stages = {stage: pipeline.last_ms.get(stage, 0.0) for stage in STAGES[1:]}
            per_stage["decode"].append(decode_ms)
            for stage, ms in stages.items():
                per_stage[stage].append(ms)
            per_stage["liveness"].append(liveness_ms[0])
            per_stage["rest"].append(max(step_ms - sum(stages.values()) - liveness_ms[0], 0.0))
            totals.append(decode_ms + step_ms)
            seen += len(loop.last_faces)
            embedded += sum(face.embedding is not None for face in loop.last_faces)
            with_face += bool(loop.last_faces)
            whole += pipeline.detector.last_whole
    return {
        "frames": len(totals),
        "frames_with_face": with_face,
        "faces_seen": seen,
        "faces_embedded": embedded,
        "whole_scans": whole,
        "events": {name: n for name, n in sorted(loop.counts.items())},
        "stage_ms_median": {s: round(statistics.median(v), 2) for s, v in per_stage.items()},
        "stage_ms_mean": {s: round(statistics.fmean(v), 2) for s, v in per_stage.items()},
        "total_ms_median": round(statistics.median(totals), 2),
        "total_ms_mean": round(statistics.fmean(totals), 2),
    }


def run_bench(config: Config, *, video: Path, photos: list[Path], frame_limit: int | None, reference: bool) -> dict:
    """Our door loop, as configured and embedding every face, first (so the peak RSS is ours alone), then
    face_recognition on the same frames. `total_ms_median` and `speedup` are the door loop's; `speedup_every_face`
    compares the loop embedding every face of every frame (what face_recognition does) with face_recognition."""
    from edge.pipeline import Pipeline

    pipeline = Pipeline(config)
    pipeline.analyze(next(video_frames(video, limit=1))[0])  # warm-up: load models, first-call allocations
    report = {"backend": pipeline.embedder.name, "threads": config.embedder.threads, "video": str(video)}
    report["door_loop"] = time_door_loop(config, pipeline, video, frame_limit)
    # The same loop embedding every face of every frame (nobody is enrolled, so no track unlocks).
    every_face = config.model_copy(update={"decide": config.decide.model_copy(update={"unknown_refresh_frames": 1})})
    report["video_640"] = time_door_loop(every_face, pipeline, video, frame_limit)
    # Kiosk-relevant memory: the loop on 640-px frames with every model loaded (before any large photo).
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if photos:
        report["photos"] = time_ours(pipeline, photo_frames(photos))
        report["peak_rss_mib_with_photos"] = round(peak_rss_mib(), 1)
    report["total_ms_median"] = report["door_loop"]["total_ms_median"]
    if reference:
        say("bench: timing face_recognition on the same frames…")
        report["face_recognition"] = time_face_recognition(video_frames(video, limit=frame_limit))
        report["face_recognition_ms_median"] = report["face_recognition"]["total_ms_median"]
        report["speedup"] = round(report["face_recognition_ms_median"] / report["total_ms_median"], 2)
        report["speedup_every_face"] = round(report["face_recognition_ms_median"] / report["video_640"]["total_ms_median"], 2)
    return report


def format_report(report: dict) -> str:
    lines = [f"backend {report['backend']} ({report['threads']} thread(s)); peak RSS {report['peak_rss_mib']} MiB "
             f"on 640-px frames" + (f", {report['peak_rss_mib_with_photos']} MiB after the photos" if "photos" in report else "")]
    for key, label in (("door_loop", "faces of decided tracks not embedded"), ("video_640", "every face embedded")):
        loop = report[key]
        stages = "  ".join(f"{s} {v:.1f}" for s, v in loop["stage_ms_median"].items())
        means = "  ".join(f"{s} {v:.1f}" for s, v in loop["stage_ms_mean"].items())
        lines.append(
            f"{key} ({label}): {loop['frames']} frames ({loop['whole_scans']} scanned whole, the rest following faces), "
            f"face in {loop['frames_with_face']}, {loop['faces_embedded']} of {loop['faces_seen']} faces embedded; "
            f"events {loop['events']}\n"
            f"  medians ms: {stages}; total {loop['total_ms_median']:.1f}\n"
            f"  means ms:   {means}; total {loop['total_ms_mean']:.1f}"
        )
    if "photos" in report:
        part = report["photos"]
        stages = "  ".join(f"{s} {v:.1f}" for s, v in part["stage_ms_median"].items())
        lines.append(
            f"photos: {part['frames']} frames, face in {part['frames_with_face']}; medians ms: {stages}; "
            f"total {part['total_ms_median']:.1f} (one-face frames {part['total_ms_median_one_face']})"
        )
    if "speedup" in report:
        fr = report["face_recognition"]
        lines.append(
            f"face_recognition: total {fr['total_ms_median']:.1f} ms median, face in {fr['frames_with_face']} frames; "
            f"speed-up ×{report['speedup']} (door loop), ×{report['speedup_every_face']} (every face embedded)"
        )
    return "\n".join(lines)
