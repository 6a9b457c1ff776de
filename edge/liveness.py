"""Liveness (presentation-attack detection) per track: is the face a live 3-D head or a flat picture?

The cue is parallax. Corner points inside the face are tracked from frame to frame (pyramidal Lucas-Kanade
with a forward-backward check). A flat picture (a print, a phone or monitor showing a still or a video),
however it is moved, tilted or brought closer, maps between two frames by one homography, so the points of a
picture fit one homography to within tracking noise. A real head that approaches, sways or turns does not:
nose, eyes and cheeks lie at different depths and move apart from each other. The evidence is how far the
face's patches still are from where a plane would put them, between a keyframe and now (the earlier crop warped
by the points' homography, whatever homography is left in the measured flow fitted away; see planar_residual),
median over the points divided by the face width (`parallax`), taken over keyframes within the last `window_s`, together with how much the face moved meanwhile
(`motion`, median point displacement / face width). A face that did not move yet is `pending`, one that moved
with planar residuals only is `fail`, one with depth residuals is `pass`.

The second cue, blink (edge/blink.py), looks for an eye blink in MediaPipe's eye landmarks; it passes or stays
pending, never fails. `mode` picks parallax, blink, `any` (either passing is enough; a parallax fail stands until
a blink passes) or `all` (both must pass; a parallax fail fails). One `Liveness` per camera keeps a small state
per track id (the decider's), fed by `observe` every frame.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from edge.config import LivenessConfig
from edge.types import Face, Frame

PASS, FAIL, PENDING, OFF = "pass", "fail", "pending", "off"
PARALLAX_MODES, BLINK_MODES = ("parallax", "any", "all"), ("blink", "any", "all")
MARGIN = 0.25  # the tracking crop reaches this fraction of the face width beyond the box (the face moves)
INNER = 0.12  # new points are taken inside the box shrunk by this fraction per side (face, not background)
LK_WINDOW_PX = 15
LK_LEVELS = 2
FB_MAX_PX = 0.5  # forward-backward disagreement (in the face-normalised crop) above which a point is dropped
CORNER_QUALITY = 0.03
CORNER_MIN_DISTANCE_PX = 4
MIN_PAIRED_POINTS = 12  # fewer points in common with a keyframe: no homography is fitted
RANSAC_FACE_FRACTION = 0.008  # RANSAC inlier distance, as a fraction of the face width
LEAST_SQUARES = 0  # cv2.findHomography's method fitting all points (no outlier rejection)
KEYFRAME_SLACK_S = 1e-3  # frame times are rounded: a keyframe due at 0.2 s may arrive at 0.19999


@dataclass(frozen=True)
class LivenessVerdict:
    """`state` pass | fail | pending (| off when liveness is disabled) with the evidence behind it."""

    state: str
    parallax: float = 0.0
    motion: float = 0.0
    points: int = 0
    evidence_s: float = 0.0
    blinks: int | None = None  # the blink cue's (None while it is off): blinks in its window,
    openness: float | None = None  # this frame's eye openness,
    openness_ratio: float | None = None  # and that openness as a fraction of the track's open-eye level

    def evidence(self) -> dict:
        evidence = {"parallax": round(self.parallax, 4), "motion": round(self.motion, 4), "points": self.points,
                    "evidence_s": round(self.evidence_s, 2)}
        if self.blinks is not None:
            evidence |= {"blinks": self.blinks, "openness": round(self.openness, 4),
                         "openness_ratio": round(self.openness_ratio, 3)}
        return evidence


LIVENESS_OFF = LivenessVerdict(OFF)


@dataclass
class Keyframe:
    t_s: float
    ids: np.ndarray
    points: np.ndarray  # full-frame pixel coordinates, (N, 2) float32
    grey: np.ndarray  # the face crop the points were seen in
    geometry: tuple  # how that crop was cut and scaled (crop_geometry)
    residual: float | None = None  # median off-homography residual since the previous keyframe / face width
    motion: float = 0.0  # median point displacement since the previous keyframe / face width


@dataclass
class TrackState:
    """Points being followed on one track, the last frame they were seen in (grey), and recent keyframes."""

    image: np.ndarray
    box: tuple
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    keyframes: deque = field(default_factory=deque)
    next_id: int = 0
    verdict: LivenessVerdict = field(default_factory=lambda: LivenessVerdict(PENDING))


def crop_geometry(box: tuple, previous: tuple, shape: tuple, work_px: int) -> tuple[int, int, int, int, float]:
    """(x0, y0, x1, y1, scale): a crop around both boxes with a margin, scaled so the face is `work_px` wide."""
    width = max(box[2] - box[0], 1.0)
    margin = MARGIN * width
    x0 = int(max(0, min(box[0], previous[0]) - margin))
    y0 = int(max(0, min(box[1], previous[1]) - margin))
    x1 = int(min(shape[1], max(box[2], previous[2]) + margin))
    y1 = int(min(shape[0], max(box[3], previous[3]) + margin))
    return x0, y0, x1, y1, min(1.0, work_px / width)


def grey_crop(image: np.ndarray, geometry: tuple) -> np.ndarray:
    x0, y0, x1, y1, scale = geometry
    crop = image[y0:y1, x0:x1]
    if scale < 1.0:
        return cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return crop.copy()  # not a view: a keyframe must not keep its whole frame alive


def crop_matrix(geometry: tuple) -> np.ndarray:
    """Full-frame pixels → pixels of the crop made with `geometry`."""
    x0, y0, _, _, scale = geometry
    return np.array([[scale, 0, -scale * x0], [0, scale, -scale * y0], [0, 0, 1]])


def planar_residual(before: Keyframe, now: Keyframe, source: np.ndarray, target: np.ndarray,
                    ransac_px: float) -> float | None:
    """Median off-plane displacement in full-frame pixels between two keyframes (plane + parallax): fit the
    homography of the points both share, warp the earlier crop by it onto the later one, and measure by optical
    flow how far each point's patch still is from where a plane would have put it. After the warp the patches
    are aligned, so a tilting picture leaves no residual however fast it moves; depth does. The point tracks the
    homography is fitted to drift by up to ~0.5 px over a fast step, so the warp itself can be slightly off
    everywhere; a plane's leftover flow is then one more homography, which a least-squares fit to the measured
    flow takes out, while depth's leftover is not a homography and stays. None when no homography can be fitted."""
    if len(source) < MIN_PAIRED_POINTS:
        return None
    homography, _ = cv2.findHomography(source, target, cv2.RANSAC, ransac_px)
    if homography is None:
        return None
    to_now = crop_matrix(now.geometry)
    in_crop = to_now @ homography @ np.linalg.inv(crop_matrix(before.geometry))
    height, width = now.grey.shape
    warped = cv2.warpPerspective(before.grey, in_crop, (width, height), flags=cv2.INTER_LINEAR)
    planar = cv2.perspectiveTransform(target.reshape(-1, 1, 2).astype(np.float64), to_now).astype(np.float32)
    inside = np.all((planar[:, 0] >= LK_WINDOW_PX) & (planar[:, 0] < [width - LK_WINDOW_PX, height - LK_WINDOW_PX]),
                    axis=1)
    if inside.sum() < MIN_PAIRED_POINTS:
        return None
    start = planar[inside]
    found_at, found, _ = cv2.calcOpticalFlowPyrLK(warped, now.grey, start, None, winSize=(LK_WINDOW_PX, LK_WINDOW_PX),
                                                  maxLevel=1)
    ok = found.ravel().astype(bool)
    if ok.sum() < MIN_PAIRED_POINTS:
        return None
    start, found_at = start.reshape(-1, 2)[ok], found_at.reshape(-1, 2)[ok]
    leftover, _ = cv2.findHomography(start, found_at, LEAST_SQUARES)  # what a plane still owes after the warp
    if leftover is None:
        return None
    planar_again = cv2.perspectiveTransform(start.reshape(-1, 1, 2).astype(np.float64), leftover).reshape(-1, 2)
    return float(np.median(np.linalg.norm(found_at - planar_again, axis=1))) / now.geometry[4]


def combine(mode: str, parallax: LivenessVerdict | None, blink) -> LivenessVerdict:
    """The verdict of `mode` from the parallax verdict and the blink evidence (edge.blink.BlinkEvidence), each
    None when its cue is off: blink passes once a blink is in its window, else it is pending."""
    blink_state = None if blink is None else (PASS if blink.blinks > 0 else PENDING)
    if mode == "parallax":
        return parallax
    if mode == "blink":
        state = blink_state
    elif mode == "any":
        state = PASS if PASS in (parallax.state, blink_state) else parallax.state
    else:  # all
        state = PASS if parallax.state == blink_state == PASS else FAIL if parallax.state == FAIL else PENDING
    return replace(parallax or LivenessVerdict(state), state=state, blinks=blink.blinks, openness=blink.openness,
                   openness_ratio=blink.ratio)


class Liveness:
    """Per-track liveness; `observe(track, frame, face)` every frame → the track's verdict now. The blink cue
    needs the MediaPipe eye models from `models_dir` (default: $EDGE_MODELS_DIR or ./models)."""

    def __init__(self, settings: LivenessConfig, *, models_dir: Path | None = None) -> None:
        self.settings = settings
        self.tracks: dict[int, TrackState] = {}
        self.on_verdict = None  # optional callable(track_id, frame, face, verdict), e.g. eval-pad's recorder
        self.blink = None
        if settings.mode in BLINK_MODES:
            from edge.blink import Blink
            from engines.fetch import default_models_dir

            self.blink = Blink(settings, models_dir=models_dir or default_models_dir())

    def keep(self, track_ids) -> None:
        """Forget tracks the decider no longer holds."""
        for gone in set(self.tracks) - set(track_ids):
            del self.tracks[gone]
        if self.blink is not None:
            self.blink.keep(track_ids)

    def observe(self, track_id: int, frame: Frame, face: Face) -> LivenessVerdict:
        parallax = self._parallax(track_id, frame, face) if self.settings.mode in PARALLAX_MODES else None
        blink = None if self.blink is None else self.blink.observe(track_id, frame.image, face.landmarks, frame.t_s)
        verdict = combine(self.settings.mode, parallax, blink)
        if self.on_verdict is not None:
            self.on_verdict(track_id, frame, face, verdict)
        return verdict

    def _parallax(self, track_id: int, frame: Frame, face: Face) -> LivenessVerdict:
        """The parallax cue's verdict for this frame."""
        s = self.settings
        state = self.tracks.get(track_id)
        grey = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)  # kept for the next frame: a third of the colour one
        if state is None:
            state = self.tracks[track_id] = TrackState(image=grey, box=face.box)
        geometry = crop_geometry(face.box, state.box, grey.shape, s.work_px)
        if min(geometry[2] - geometry[0], geometry[3] - geometry[1]) * geometry[4] < LK_WINDOW_PX:
            return state.verdict  # the face is (nearly) outside the image: nothing to follow in this frame
        current = grey_crop(grey, geometry)
        if len(state.ids):
            self._follow(state, grey_crop(state.image, geometry), current, geometry)
        if len(state.ids) < s.max_points // 2:
            self._add_points(state, current, face.box, geometry)
        state.image, state.box = grey, face.box
        if not state.keyframes or frame.t_s - state.keyframes[-1].t_s >= s.keyframe_s - KEYFRAME_SLACK_S:
            state.keyframes.append(self._keyframe(state, frame.t_s, face.width_px, current, geometry))
        while state.keyframes and frame.t_s - state.keyframes[0].t_s > s.window_s:
            state.keyframes.popleft()
        state.verdict = self._judge(state, frame.t_s)
        return state.verdict

    def _keyframe(self, state: TrackState, t_s: float, width_px: float, grey: np.ndarray, geometry: tuple) -> Keyframe:
        """This frame's points, with the planar residual and motion (fractions of the face width) since the
        previous keyframe, measured on the points both share."""
        key = Keyframe(t_s, state.ids.copy(), state.points.copy(), grey, geometry)
        if state.keyframes:
            before = state.keyframes[-1]
            _, in_before, in_now = np.intersect1d(before.ids, key.ids, return_indices=True)
            source, target = before.points[in_before], key.points[in_now]
            residual = planar_residual(before, key, source, target, RANSAC_FACE_FRACTION * width_px)
            if residual is not None:
                key.residual = residual / width_px
                key.motion = float(np.median(np.linalg.norm(target - source, axis=1))) / width_px
        return key

    def _follow(self, state: TrackState, before: np.ndarray, now: np.ndarray, geometry: tuple) -> None:
        """Move the points from the previous image to this one; drop those lost or inconsistent."""
        x0, y0, _, _, scale = geometry
        origin = np.array([x0, y0], np.float32)
        start = ((state.points - origin) * scale).reshape(-1, 1, 2).astype(np.float32)
        params = {"winSize": (LK_WINDOW_PX, LK_WINDOW_PX), "maxLevel": LK_LEVELS}
        ahead, found, _ = cv2.calcOpticalFlowPyrLK(before, now, start, None, **params)
        back, found_back, _ = cv2.calcOpticalFlowPyrLK(now, before, ahead, None, **params)
        disagreement = np.linalg.norm((back - start).reshape(-1, 2), axis=1)
        keep = found.ravel().astype(bool) & found_back.ravel().astype(bool) & (disagreement < FB_MAX_PX)
        state.ids = state.ids[keep]
        state.points = ahead.reshape(-1, 2)[keep] / scale + origin

    def _add_points(self, state: TrackState, grey: np.ndarray, box: tuple, geometry: tuple) -> None:
        """New corners inside the face (box shrunk by INNER), away from the points already followed."""
        x0, y0, _, _, scale = geometry
        width, height = box[2] - box[0], box[3] - box[1]
        mask = np.zeros_like(grey)
        left, top = (box[0] + INNER * width - x0) * scale, (box[1] + INNER * height - y0) * scale
        right, bottom = (box[2] - INNER * width - x0) * scale, (box[3] - INNER * height - y0) * scale
        mask[max(0, int(top)):max(0, int(bottom)), max(0, int(left)):max(0, int(right))] = 255
        for x, y in (state.points - np.array([x0, y0], np.float32)) * scale:
            cv2.circle(mask, (int(x), int(y)), CORNER_MIN_DISTANCE_PX, 0, -1)
        wanted = self.settings.max_points - len(state.ids)
        corners = cv2.goodFeaturesToTrack(grey, wanted, CORNER_QUALITY, CORNER_MIN_DISTANCE_PX, mask=mask)
        if corners is None:
            return
        fresh = corners.reshape(-1, 2) / scale + np.array([x0, y0], np.float32)
        state.ids = np.concatenate([state.ids, np.arange(state.next_id, state.next_id + len(fresh))])
        state.points = np.concatenate([state.points, fresh.astype(np.float32)])
        state.next_id += len(fresh)

    def _judge(self, state: TrackState, t_s: float) -> LivenessVerdict:
        """Median planar residual of the moving keyframe pairs in the window: pending until `min_pairs` of them."""
        s = self.settings
        moving = [key for key in state.keyframes
                  if s.min_motion <= key.motion <= s.max_motion and key.residual is not None]
        if len(moving) < s.min_pairs:
            return LivenessVerdict(PENDING, points=len(state.ids))
        parallax = float(np.median([key.residual for key in moving]))
        motion = float(np.median([key.motion for key in moving]))
        return LivenessVerdict(PASS if parallax >= s.min_parallax else FAIL, parallax, motion, len(state.ids),
                               t_s - moving[0].t_s + s.keyframe_s)
