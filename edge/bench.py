"""`python -m edge bench`: per-stage medians of our pipeline and of face_recognition on the same frames, same run.

Frames: the sample video resized to 640 px wide (the kiosk's working size) and, with --photos, still photos.
Speed targets are read from this output, never asserted in timed unit tests: these machines are noisy.
"""
from __future__ import annotations

import resource
import statistics
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


def liveness_step(config: Config):
    """A function (image, faces, index) → ms that tracks the faces (the kiosk's decider) and runs the liveness stage on
    them as the kiosk does; None when liveness is off."""
    if config.liveness.mode == "off":
        return None
    from edge.decide import Decider
    from edge.liveness import Liveness
    from edge.types import Frame, Match

    decider, liveness = Decider(config.decide), Liveness(config.liveness)
    nobody = Match(None, 1.0, 0.0)

    def step(image, faces, index: int) -> float:
        start = time.perf_counter()
        frame = Frame(image, index, index / VIDEO_FPS)
        decider.update([(f.face.box, nobody) for f in faces], index, frame.t_s,
                       liveness=lambda track, i: liveness.observe(track, frame, faces[i].face))
        liveness.keep(decider.tracks)
        return (time.perf_counter() - start) * 1e3

    return step


def time_ours(pipeline, frames, liveness=None) -> dict:
    """Per-frame stage timings of our pipeline (with `liveness`, a liveness_step, that stage too); frames with
    exactly one face are reported separately."""
    per_stage = {stage: [] for stage in STAGES + (("liveness",) if liveness else ())}
    totals, totals_one_face, faces_found = [], [], 0
    for index, (image, decode_ms) in enumerate(frames):
        start = time.perf_counter()
        faces = pipeline.analyze(image)
        total = decode_ms + (time.perf_counter() - start) * 1e3
        per_stage["decode"].append(decode_ms)
        for stage in STAGES[1:]:
            per_stage[stage].append(pipeline.last_ms.get(stage, 0.0))
        if liveness:
            per_stage["liveness"].append(liveness(image, faces, index))
            total += per_stage["liveness"][-1]
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


def run_bench(config: Config, *, video: Path, photos: list[Path], frame_limit: int | None, reference: bool) -> dict:
    """Our pipeline first (so its peak RSS is ours alone), then face_recognition on the same frames."""
    from edge.pipeline import Pipeline

    pipeline = Pipeline(config)
    pipeline.analyze(next(video_frames(video, limit=1))[0])  # warm-up: load models, first-call allocations
    report = {"backend": pipeline.embedder.name, "threads": config.embedder.threads, "video": str(video)}
    report["video_640"] = time_ours(pipeline, video_frames(video, limit=frame_limit), liveness_step(config))
    if config.liveness.mode != "off":
        say(f"bench: liveness ({config.liveness.mode}) timed on the video frames as a stage of the kiosk step")
    # Kiosk-relevant memory: the loop on 640-px frames with every model loaded (before any large photo).
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if photos:
        report["photos"] = time_ours(pipeline, photo_frames(photos))
        report["peak_rss_mib_with_photos"] = round(peak_rss_mib(), 1)
    report["total_ms_median"] = report["video_640"]["total_ms_median"]
    if reference:
        say("bench: timing face_recognition on the same frames…")
        report["face_recognition"] = time_face_recognition(video_frames(video, limit=frame_limit))
        report["face_recognition_ms_median"] = report["face_recognition"]["total_ms_median"]
        report["speedup"] = round(report["face_recognition_ms_median"] / report["total_ms_median"], 2)
    return report


def format_report(report: dict) -> str:
    lines = [f"backend {report['backend']} ({report['threads']} thread(s)); peak RSS {report['peak_rss_mib']} MiB "
             f"on 640-px frames" + (f", {report['peak_rss_mib_with_photos']} MiB after the photos" if "photos" in report else "")]
    for key in ("video_640", "photos"):
        if key in report:
            part = report[key]
            stages = "  ".join(f"{s} {v:.1f}" for s, v in part["stage_ms_median"].items())
            lines.append(
                f"{key}: {part['frames']} frames, face in {part['frames_with_face']}; medians ms: {stages}; "
                f"total {part['total_ms_median']:.1f} (one-face frames {part['total_ms_median_one_face']})"
            )
    if "speedup" in report:
        fr = report["face_recognition"]
        lines.append(
            f"face_recognition: total {fr['total_ms_median']:.1f} ms median, face in {fr['frames_with_face']} frames; "
            f"speed-up ×{report['speedup']}"
        )
    return "\n".join(lines)
