"""Presentation-attack clips for measuring liveness (`python -m edge make-attacks`).

Each clip shows a flat picture moved in front of a camera: the picture is a rigid plane in 3-D that sways,
tilts (yaw, pitch, roll) and is brought toward the camera, projected through a pinhole camera onto a room-like
background, as someone holding a print or a phone to a door camera would. Types (ISO/IEC 30107-3 speaks of
attack instruments):

    print          the photo on paper: lower contrast, warm paper tint, slight blur, grain
    screen-still   the photo on a phone/monitor: a dark bezel, screen gamma, a pixel grid that aliases into moiré
    replay         a real video shown on a screen: every frame of it on the same moving plane

A replay of a live video carries real parallax inside the picture; the plane adds only a homography on top.
Clips are MPEG-4 .mp4 files (OpenCV's own writer; the compression is part of a real camera's picture too),
CLIP_FPS frames per second, CLIP_S long.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ATTACK_TYPES = ("print", "screen-still", "replay")
FRAME_PX = (960, 540)  # width, height of the clips
FOCAL_PX = 750.0  # a 16 cm face is 92 px wide at 1.3 m and 200 px at 0.6 m
CLIP_FPS = 25.0
CLIP_S = 3.0
FACE_M = 0.16  # the printed face is life-size: 16 cm wide
START_M, END_M = 1.3, 0.6  # the picture is brought from this distance to this one
YAW_DEG, PITCH_DEG, ROLL_DEG = 25.0, 15.0, 6.0  # largest tilts while swaying
SWAY_M = 0.06  # largest sideways/up-down movement
CAMERA_NOISE = 2.0  # grey levels of sensor noise added to every frame
NOISE_FIELDS = 5  # distinct noise images per clip, used in turn (drawing one per frame is slow)
PICTURE_FACE_PX = 400  # larger photos are first shrunk (area-averaged) so their face is this wide: twice its
# largest size in a clip, so the camera still resamples a sharp picture without aliasing a huge one
FOURCC = "mp4v"
CLIP_SUFFIX = ".mp4"


@dataclass(frozen=True)
class Motion:
    """One random hand movement: tilt amplitudes and phases, sway, so every clip moves differently."""

    phases: np.ndarray
    rates_hz: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Motion":
        return cls(rng.uniform(0, 2 * np.pi, 5), rng.uniform(0.3, 0.9, 5))

    def pose(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Rotation matrix and translation (metres, camera frame) of the picture plane at time t_s."""
        wave = np.sin(2 * np.pi * self.rates_hz * t_s + self.phases)
        yaw, pitch, roll = np.radians([YAW_DEG * wave[0], PITCH_DEG * wave[1], ROLL_DEG * wave[2]])
        rotation = cv2.Rodrigues(np.array([pitch, yaw, roll], np.float64))[0]
        distance_m = START_M + (END_M - START_M) * min(1.0, t_s / CLIP_S)
        return rotation, np.array([SWAY_M * wave[3], SWAY_M * wave[4], distance_m])


def plane_homography(picture_size: tuple[int, int], face_box: tuple, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Picture pixels → frame pixels for the picture held with its face centre at `translation`."""
    width, height = picture_size
    metres_per_px = FACE_M / max(face_box[2] - face_box[0], 1.0)
    centre = np.array([(face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2])
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    plane = np.column_stack([(corners - centre) * metres_per_px, np.zeros(4)])
    camera = plane @ rotation.T + translation
    projected = FOCAL_PX * camera[:, :2] / camera[:, 2:3] + np.array(FRAME_PX) / 2
    return cv2.getPerspectiveTransform(corners.astype(np.float32), projected.astype(np.float32))


def background(rng: np.random.Generator) -> np.ndarray:
    """A plain room: a lit wall gradient with a few darker furniture blocks and a little texture."""
    width, height = FRAME_PX
    ramp = np.linspace(150, 95, width)[None, :, None] * np.array([0.95, 1.0, 1.05])
    room = np.broadcast_to(ramp, (height, width, 3)).copy()
    for _ in range(4):
        x, y = rng.integers(0, width - 200), rng.integers(height // 3, height - 100)
        room[y:, x:x + rng.integers(80, 260)] *= rng.uniform(0.4, 0.8)
    room += rng.normal(0, 4, room.shape)
    return cv2.GaussianBlur(np.clip(room, 0, 255).astype(np.uint8), (0, 0), 1.5)


def as_print(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paper: contrast compressed toward a warm white, softened, with grain."""
    paper = photo.astype(np.float32) * 0.78 + np.array([30.0, 38.0, 44.0])
    paper = cv2.GaussianBlur(paper, (0, 0), 0.8) + rng.normal(0, 3.0, photo.shape)
    return np.clip(paper, 0, 255).astype(np.uint8)


def as_screen(photo: np.ndarray) -> np.ndarray:
    """A screen: brighter gamma, a sub-pixel grid (it aliases into moiré once resampled) and a dark bezel."""
    lit = 255.0 * (photo.astype(np.float32) / 255.0) ** 0.8
    rows, cols = np.indices(photo.shape[:2])
    grid = 1.0 - 0.12 * ((rows % 3 == 0) | (cols % 3 == 0))
    lit *= grid[..., None]
    bezel = max(4, photo.shape[1] // 25)
    return cv2.copyMakeBorder(np.clip(lit, 0, 255).astype(np.uint8), bezel, bezel, bezel, bezel,
                              cv2.BORDER_CONSTANT, value=(20, 20, 20))


def render(picture: np.ndarray, face_box: tuple, room: np.ndarray, motion: Motion, t_s: float,
           noise: np.ndarray) -> np.ndarray:
    """One camera frame: the picture on its plane at t_s over the room, plus sensor noise."""
    homography = plane_homography((picture.shape[1], picture.shape[0]), face_box, *motion.pose(t_s))
    frame = cv2.warpPerspective(picture, homography, FRAME_PX, dst=room.copy(), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_TRANSPARENT)
    return cv2.add(frame, noise, dtype=cv2.CV_8U)


def noise_fields(rng: np.random.Generator) -> list[np.ndarray]:
    height, width = FRAME_PX[1], FRAME_PX[0]
    return [rng.normal(0, CAMERA_NOISE, (height, width, 3)).astype(np.int16) for _ in range(NOISE_FIELDS)]


def still_frames(photo: np.ndarray, face_box: tuple, kind: str, seed: int) -> Iterator[np.ndarray]:
    """Frames of a `print` or `screen-still` attack made from one photo whose face is `face_box`."""
    rng = np.random.default_rng(seed)
    shrink = PICTURE_FACE_PX / (face_box[2] - face_box[0])
    if shrink < 1.0:
        photo = cv2.resize(photo, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        face_box = tuple(v * shrink for v in face_box)
    if kind == "print":
        picture, box = as_print(photo, rng), face_box
    else:
        picture = as_screen(photo)
        bezel = (picture.shape[1] - photo.shape[1]) // 2
        box = tuple(v + bezel for v in face_box)
    room, motion, noise = background(rng), Motion.random(rng), noise_fields(rng)
    for index in range(int(CLIP_S * CLIP_FPS)):
        yield render(picture, box, room, motion, index / CLIP_FPS, noise[index % NOISE_FIELDS])


def replay_frames(video_frames: Iterator[np.ndarray], face_box: tuple, seed: int) -> Iterator[np.ndarray]:
    """Frames of a `replay` attack: each frame of a real video on a screen on the moving plane, sized so that
    the video's face (about `face_box` in it) is life-size and centred where a held phone would be."""
    rng = np.random.default_rng(seed)
    room, motion, noise = background(rng), Motion.random(rng), noise_fields(rng)
    for index, image in enumerate(video_frames):
        if index >= CLIP_S * CLIP_FPS:
            break
        screen = as_screen(image)
        bezel = (screen.shape[1] - image.shape[1]) // 2
        yield render(screen, tuple(v + bezel for v in face_box), room, motion, index / CLIP_FPS,
                     noise[index % NOISE_FIELDS])


def write_clip(path: Path, frames: Iterator[np.ndarray]) -> int:
    """Write frames to an MPEG-4 clip; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC), CLIP_FPS, FRAME_PX)
    count = 0
    try:
        for frame in frames:
            writer.write(frame)
            count += 1
    finally:
        writer.release()
    return count
