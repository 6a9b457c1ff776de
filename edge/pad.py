"""Presentation-attack detection, measured: `make-attacks` (attack clips from photos and videos) and `eval-pad`
(APCER per attack type, BPCER per genuine track, time to a liveness pass), in ISO/IEC 30107-3 terms.

eval-pad runs every clip through the door controller's own loop (`Kiosk.run` on the `file://` or `images://`
source, the real models, a simulated door) and watches the liveness verdict of every track:

* an attack clip is accepted when any of its tracks reaches `pass` at any frame (APCER = accepted / clips);
* a genuine track is rejected when it never reaches `pass` (BPCER = rejected / tracks); the issue's target
  counts tracks whose face is at least ELIGIBLE_FACE_PX wide for at least ELIGIBLE_S (a person at the door).
Recognition plays no part (the store is empty): this is the liveness stage on its own, the stricter test.
"""
from __future__ import annotations

import tempfile
import time
from itertools import chain, count
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge import attacks
from edge.config import Config
from edge.console import emit_json, say
from edge.errors import InputError
from edge.images import IMAGE_SUFFIXES, load_image
from edge.liveness import PASS, PENDING

ELIGIBLE_FACE_PX = 80
ELIGIBLE_S = 2.0
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


# ---- make-attacks ----------------------------------------------------------------------------------------------


def photos_under(paths: list[Path]) -> list[Path]:
    """Photo files named, or found (recursively, sorted) under folders named; InputError for a missing path."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return found


def clip_name(path: Path, taken: set[str]) -> str:
    """A file name for a source's clips: its stem, with its folder's name and then a number added while taken
    (the same video given twice makes two replays, each with its own hand movement)."""
    names = chain([path.stem, f"{path.parent.name}-{path.stem}"], (f"{path.stem}-{n}" for n in count(2)))
    name = next(n for n in names if n not in taken)
    taken.add(name)
    return name


def video_face_box(pipeline, path: Path, frames: int) -> tuple[list, tuple]:
    """The first `frames` frames of a video and the median box of the largest face in them."""
    from edge.camera import open_source

    images, boxes = [], []
    with open_source(str(path)) as source:
        while len(images) < frames and (frame := source.read()) is not None:
            images.append(frame.image)
            faces = pipeline.locate(frame.image)
            if faces:
                boxes.append(faces[0].box)
    if not boxes:
        raise InputError(f"{path}: no face found in its first {frames} frames")
    return images, tuple(float(v) for v in np.median(np.array(boxes), axis=0))


def cmd_make_attacks(args, config: Config) -> int:
    from edge.pipeline import Pipeline

    pipeline = Pipeline(config)
    photos = photos_under(args.photos)
    if not photos and not args.replay:
        raise InputError("make-attacks needs photos (files or folders) or --replay VIDEO")
    clips, skipped, taken = [], [], set()
    for seed, photo in enumerate(photos):
        image = load_image(photo)
        faces = pipeline.locate(image, thorough=True)
        if not faces:
            say(f"{photo}: no face found, skipped")
            skipped.append(str(photo))
            continue
        name = clip_name(photo, taken)
        for kind in ("print", "screen-still"):
            path = args.out / kind / f"{name}{attacks.CLIP_SUFFIX}"
            frames = attacks.write_clip(path, attacks.still_frames(image, faces[0].box, kind, seed))
            clips.append({"type": kind, "clip": str(path), "source": str(photo), "frames": frames})
        say(f"{photo}: print + screen-still")
    for seed, video in enumerate(args.replay or [], start=len(photos)):
        images, box = video_face_box(pipeline, video, int(attacks.CLIP_S * attacks.CLIP_FPS))
        path = args.out / "replay" / f"{clip_name(video, taken)}{attacks.CLIP_SUFFIX}"
        frames = attacks.write_clip(path, attacks.replay_frames(iter(images), box, seed))
        clips.append({"type": "replay", "clip": str(path), "source": str(video), "frames": frames})
        say(f"{video}: replay")
    say(f"make-attacks: {len(clips)} clips in {args.out} ({len(skipped)} photos without a face skipped)")
    if args.json:
        emit_json({"clips": clips, "skipped": skipped})
    return 0


def add_make_attacks_arguments(p) -> None:
    p.add_argument("photos", nargs="*", type=Path, metavar="PHOTO", help="photos, or folders searched for photos")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/print/, OUT/screen-still/, OUT/replay/")
    p.add_argument("--replay", type=Path, action="append", metavar="VIDEO", help="a real video to replay on a screen")


# ---- eval-pad --------------------------------------------------------------------------------------------------


@dataclass
class TrackRecord:
    """One track's liveness over a clip: when it started, its face widths and verdicts per frame."""

    first_t_s: float
    times_s: list = field(default_factory=list)
    widths_px: list = field(default_factory=list)
    states: list = field(default_factory=list)
    parallax: list = field(default_factory=list)  # of the judged (pass/fail) frames
    openness_ratios: list = field(default_factory=list)  # the blink cue's, of every frame, when it is on
    blinks: int = 0  # the most blinks the blink cue held at once

    def max_parallax(self) -> float:
        return max(self.parallax, default=0.0)

    def min_parallax(self) -> float | None:
        """The lowest judged value: how close a live face came to the threshold (None: never judged)."""
        return min(self.parallax, default=None)

    def min_openness_ratio(self) -> float | None:
        """The deepest eye closing seen, as a fraction of the open-eye baseline (None: blink cue off)."""
        return round(min(self.openness_ratios), 3) if self.openness_ratios else None

    def passed_after_s(self) -> float | None:
        return next((t - self.first_t_s for t, s in zip(self.times_s, self.states) if s == PASS), None)

    def eligible(self) -> bool:
        """A person at the door: a face at least ELIGIBLE_FACE_PX wide over at least ELIGIBLE_S of the track."""
        wide = [t for t, w in zip(self.times_s, self.widths_px) if w >= ELIGIBLE_FACE_PX]
        return len(wide) > 1 and wide[-1] - wide[0] >= ELIGIBLE_S

    def summary(self, track: int) -> dict:
        passed = self.passed_after_s()
        return {"track": track, "frames": len(self.states), "duration_s": round(self.times_s[-1] - self.first_t_s, 2),
                "median_face_px": round(float(np.median(self.widths_px)), 1), "eligible": self.eligible(),
                "passed": passed is not None, "time_to_pass_s": None if passed is None else round(passed, 2),
                "final": self.states[-1], "max_parallax": round(self.max_parallax(), 4),
                "min_parallax": None if self.min_parallax() is None else round(self.min_parallax(), 4),
                "blinks": self.blinks, "min_openness_ratio": self.min_openness_ratio()}


def run_clip(config: Config, pipeline, store, uri: str) -> tuple[dict[int, TrackRecord], int]:
    """The door loop over one clip with a simulated door; every track's liveness record and the frames seen."""
    from edge.__main__ import open_camera
    from edge.door import SimulatedDoor
    from edge.kiosk import Kiosk

    kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=SimulatedDoor(pulse_s=config.door.pulse_s))
    records: dict[int, TrackRecord] = {}

    def record(track: int, frame, face, verdict) -> None:
        entry = records.setdefault(track, TrackRecord(frame.t_s))
        entry.times_s.append(frame.t_s)
        entry.widths_px.append(face.width_px)
        entry.states.append(verdict.state)
        if verdict.state != PENDING:
            entry.parallax.append(verdict.parallax)
        if verdict.blinks is not None:
            entry.openness_ratios.append(verdict.openness_ratio)
            entry.blinks = max(entry.blinks, verdict.blinks)

    kiosk.liveness.on_verdict = record
    with open_camera(config, uri) as source:
        frames = kiosk.run(source)
        if source.status != "ended":  # the loop stopped on SIGINT/SIGTERM: so does the evaluation
            raise KeyboardInterrupt
    return records, frames


def clips_in(folder: Path) -> list[Path]:
    """Video files and folders of images (one clip each) directly in a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES or p.is_dir())


def uri_of(clip: Path) -> str:
    return f"images://{clip}" if clip.is_dir() else f"file://{clip}"


def genuine_clips(paths: list[Path]) -> list[Path]:
    """A video file is a clip, a folder of images is a clip, any other folder holds clips."""
    found = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        frames_folder = path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        found += clips_in(path) if path.is_dir() and not frames_folder else [path]
    return found


def evaluate_pad(config: Config, genuine: list[Path], attack_dir: Path | None) -> dict:
    """Every clip through the loop; APCER per attack type, BPCER over genuine tracks, times to pass."""
    from edge.pipeline import Pipeline
    from edge.store import Store

    if config.liveness.mode == "off":
        raise InputError("liveness.mode is off in this config: nothing to evaluate")
    pipeline = Pipeline(config)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "empty.edgestore", fingerprint=pipeline.embedder.fingerprint)
        per_type: dict[str, list] = {}
        if attack_dir is not None:
            if not attack_dir.is_dir():
                raise InputError(f"{attack_dir}: not a folder (expected {attack_dir}/TYPE/clip.mp4, e.g. from make-attacks)")
            for kind_dir in sorted(p for p in attack_dir.iterdir() if p.is_dir()):
                for clip in clips_in(kind_dir):
                    records, frames = run_clip(config, pipeline, store, uri_of(clip))
                    passed = [t for t, r in records.items() if r.passed_after_s() is not None]
                    per_type.setdefault(kind_dir.name, []).append(
                        {"clip": str(clip), "frames": frames, "tracks": len(records), "accepted": bool(passed),
                         "max_parallax": round(max((r.max_parallax() for r in records.values()), default=0.0), 4),
                         "blinks": max((r.blinks for r in records.values()), default=0),
                         "min_openness_ratio": min((r.min_openness_ratio() for r in records.values()
                                                    if r.min_openness_ratio() is not None), default=None)})
                    say(f"{kind_dir.name} {clip.name}: {len(records)} track(s), "
                        f"{'ACCEPTED' if passed else 'rejected'}")
        tracks = []
        for clip in genuine_clips(genuine):
            records, _ = run_clip(config, pipeline, store, uri_of(clip))
            for track, record in records.items():
                tracks.append({"clip": str(clip), **record.summary(track)})
                say(f"genuine {clip.name} track {track}: {tracks[-1]}")
    return pad_report(per_type, tracks, config)


def rate(numerator: int, denominator: int) -> float | None:
    return round(100.0 * numerator / denominator, 2) if denominator else None


def pad_report(per_type: dict[str, list], tracks: list[dict], config: Config) -> dict:
    attacks_summary = {
        kind: {"clips": len(clips), "with_face": sum(c["tracks"] > 0 for c in clips),
               "accepted": sum(c["accepted"] for c in clips),
               "apcer_percent": rate(sum(c["accepted"] for c in clips), sum(c["tracks"] > 0 for c in clips)),
               "max_parallax": max((c["max_parallax"] for c in clips), default=0.0),
               "min_openness_ratio": min((c["min_openness_ratio"] for c in clips
                                          if c["min_openness_ratio"] is not None), default=None)}
        for kind, clips in per_type.items()
    }
    eligible = [t for t in tracks if t["eligible"]]
    times = [t["time_to_pass_s"] for t in eligible if t["passed"]]
    judged = [t["min_parallax"] for t in eligible if t["min_parallax"] is not None]
    return {
        "liveness": config.liveness.model_dump(),
        "attacks": attacks_summary,
        "genuine": {
            "tracks": len(tracks), "passed": sum(t["passed"] for t in tracks),
            "bpcer_percent_all_tracks": rate(sum(not t["passed"] for t in tracks), len(tracks)),
            "eligible_tracks": len(eligible), "eligible_rule": f"face >= {ELIGIBLE_FACE_PX} px for >= {ELIGIBLE_S:g} s",
            "bpcer_percent": rate(sum(not t["passed"] for t in eligible), len(eligible)),
            "median_time_to_pass_s": round(float(np.median(times)), 2) if times else None,
            "lowest_parallax": min(judged, default=None),
        },
        "attack_clips": [c for clips in per_type.values() for c in clips],
        "genuine_tracks": tracks,
    }


def cmd_eval_pad(args, config: Config) -> int:
    if not args.genuine and args.attacks is None:
        raise InputError("eval-pad needs --genuine and/or --attacks")
    started = time.perf_counter()
    report = evaluate_pad(config, args.genuine or [], args.attacks)
    s = config.liveness
    for kind, summary in report["attacks"].items():
        cues = [f"highest parallax {summary['max_parallax']} (pass needs {s.min_parallax})"] * (s.mode != "blink")
        if summary["min_openness_ratio"] is not None:
            cues.append(f"deepest eye closing {summary['min_openness_ratio']} of the open level "
                        f"(a blink needs < {s.blink_closed_ratio})")
        say(f"eval-pad: {kind}: APCER {summary['apcer_percent']} % ({summary['accepted']} of {summary['with_face']} "
            f"clips with a face accepted; {summary['clips']} clips); {'; '.join(cues)}")
    g = report["genuine"]
    say(f"eval-pad: genuine: BPCER {g['bpcer_percent']} % over {g['eligible_tracks']} tracks with {g['eligible_rule']} "
        f"(all {g['tracks']} tracks: {g['bpcer_percent_all_tracks']} %), median time to pass {g['median_time_to_pass_s']} s, "
        f"lowest parallax {g['lowest_parallax']}; {time.perf_counter() - started:.0f} s")
    if args.json:
        emit_json(report)
    return 0


def add_eval_pad_arguments(p) -> None:
    p.add_argument("--genuine", type=Path, nargs="+", default=None, metavar="DIR_OR_VIDEO",
                   help="real videos (files, folders of videos, or folders of frames) of live people")
    p.add_argument("--attacks", type=Path, default=None, metavar="DIR", help="DIR/TYPE/clip (make-attacks writes one)")
