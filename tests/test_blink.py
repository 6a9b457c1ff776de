"""The blink cue: blinks found in synthetic eye-openness sequences (and slow closings, stares and noise not
counted), how the liveness modes combine the cues, the crops, and the real FaceMesh + iris models on real photos
(open eyes, eyes painted shut, a tilted head, a still photo)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge import blink
from edge.blink import BlinkEvidence, BlinkTrack, add_sample, eye_openness, eye_regions, region_from_landmarks
from edge.config import LivenessConfig
from edge.errors import ModelError
from edge.liveness import FAIL, PASS, PENDING, Liveness, LivenessVerdict, combine
from edge.types import Face, Frame
from test_liveness import attack_clips, enrolled_store, run_events  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "samples" / "photos"
FPS = 25.0
OPEN = 0.30  # a typical open-eye aspect ratio from FaceMesh
SETTINGS = LivenessConfig(mode="blink")


def feed(values, *, settings: LivenessConfig = SETTINGS, start_s: float = 0.0) -> list[BlinkEvidence]:
    track = BlinkTrack()
    return [add_sample(track, start_s + i / FPS, v, settings) for i, v in enumerate(values)]


def jitter(seconds: float, *, level: float = OPEN, spread: float = 0.03, seed: int = 0) -> list[float]:
    """Open eyes with landmark noise: ±spread relative, uniform."""
    rng = np.random.default_rng(seed)
    return list(level * (1 + rng.uniform(-spread, spread, int(seconds * FPS))))


def test_a_blink_is_seen_when_the_eyes_open_again():
    closing = [0.20, 0.08, 0.06, 0.12, 0.22]  # 0.2 s, the usual blink
    evidence = feed(jitter(1.0) + closing + [OPEN] * 5)
    blinks = [e.blinks for e in evidence]
    assert max(blinks[:25 + 4]) == 0  # not while the eyes are still closed or reopening
    assert blinks[25 + 5:] == [1] * 5  # once back above 85 % of the open-eye level
    assert min(e.ratio for e in evidence) == pytest.approx(0.06 / OPEN, rel=0.05)


def test_eyes_closed_longer_than_a_blink_are_not_one():
    evidence = feed(jitter(1.0) + [0.05] * int(0.8 * FPS) + [OPEN] * 10)
    assert max(e.blinks for e in evidence) == 0


def test_a_stare_with_landmark_noise_and_a_slow_nod_never_blink():
    """A photo's eyes: noisy but open for ten seconds; then the openness sinking over two seconds (a head nodding
    down, a picture tilted away) and staying there."""
    sinking = list(np.linspace(OPEN, 0.4 * OPEN, int(2 * FPS)))
    evidence = feed(jitter(10.0, spread=0.08) + sinking + [0.4 * OPEN] * 25)
    assert max(e.blinks for e in evidence) == 0


def test_after_a_lasting_change_of_level_blinks_count_again():
    """Eyes narrowed for good (a head lowered, the camera seen from below): later blinks from that level count."""
    low = 0.5 * OPEN
    evidence = feed(jitter(1.0) + jitter(6.0, level=low, seed=2) + [0.03, 0.03, low, low])
    assert [e.blinks for e in evidence[:-2]] == [0] * (len(evidence) - 2) and evidence[-1].blinks == 1


def test_a_dip_before_the_open_eye_level_is_known_is_not_judged():
    evidence = feed([OPEN, 0.05, OPEN] + jitter(1.0))
    assert max(e.blinks for e in evidence) == 0


def test_a_blink_is_forgotten_after_the_window():
    settings = LivenessConfig(mode="blink", blink_window_s=2.0)
    evidence = feed(jitter(1.0) + [0.05, 0.05, OPEN] + jitter(3.0, seed=1), settings=settings)
    blinks = [e.blinks for e in evidence]
    ended = 25 + 2
    assert blinks[ended] == 1 and blinks[ended + int(1.9 * FPS)] == 1
    assert blinks[ended + int(2.1 * FPS):] == [0] * len(blinks[ended + int(2.1 * FPS):])


def test_two_blinks_in_quick_succession_both_count():
    """Closed frames are kept out of the open-eye level: else, early in a track, the first blink's six closed
    frames would outnumber the open ones and hide the second blink."""
    closed = [0.05] * 6
    evidence = feed([OPEN] * 3 + closed + [OPEN] * 2 + closed + [OPEN] * 2)
    assert evidence[-1].blinks == 2


def test_a_blink_counts_with_the_shortest_window():
    """With a 0.5 s window the level before the dip has left the window when the eyes reopen: the dip is judged
    against the level it started from."""
    settings = LivenessConfig(mode="blink", blink_window_s=0.5)
    evidence = feed([OPEN] * 15 + [0.05] * 10 + [OPEN], settings=settings)
    assert evidence[-1].blinks == 1


def test_the_threshold_is_relative_to_this_face():
    """Narrow eyes (open level 0.18) blink down to 0.07: a blink, though a wide eye would read 0.18 as closed."""
    evidence = feed(jitter(1.0, level=0.18) + [0.07, 0.07, 0.18, 0.18])
    assert evidence[-1].blinks == 1
    assert feed(jitter(1.0, level=0.18) + [0.14, 0.14, 0.18])[-1].blinks == 0  # 78 %: not closed


# ---- modes -------------------------------------------------------------------------------------------------------


PARALLAX = {state: LivenessVerdict(state, parallax=0.01, motion=0.05, points=40, evidence_s=0.8)
            for state in (PASS, FAIL, PENDING)}
BLINKED, NOT_YET = BlinkEvidence(1, 0.3, 1.0), BlinkEvidence(0, 0.3, 1.0)


@pytest.mark.parametrize("mode, parallax, blinked, state", [
    ("blink", None, True, PASS), ("blink", None, False, PENDING),
    ("any", PASS, False, PASS), ("any", FAIL, True, PASS), ("any", FAIL, False, FAIL), ("any", PENDING, False, PENDING),
    ("all", PASS, True, PASS), ("all", PASS, False, PENDING), ("all", FAIL, True, FAIL),
    ("all", PENDING, True, PENDING),
])
def test_modes_combine_the_cues(mode, parallax, blinked, state):
    verdict = combine(mode, PARALLAX.get(parallax), BLINKED if blinked else NOT_YET)
    assert verdict.state == state
    evidence = verdict.evidence()
    assert evidence["blinks"] == int(blinked) and evidence["openness"] == 0.3
    assert evidence["parallax"] == (0.01 if parallax else 0.0)


def test_parallax_mode_keeps_its_evidence_unchanged():
    verdict = combine("parallax", PARALLAX[PASS], None)
    assert verdict == PARALLAX[PASS] and "blinks" not in verdict.evidence()


@pytest.mark.parametrize("mode", ["off", "parallax", "blink", "any", "all"])
def test_every_mode_is_a_valid_config(mode):
    assert LivenessConfig(mode=mode).mode == mode


def test_a_missing_facemesh_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="face_landmark.onnx not found: run `make models`"):
        Liveness(LivenessConfig(mode="any"), models_dir=tmp_path)


# ---- the crop ----------------------------------------------------------------------------------------------------


def five_points(angle_rad: float, centre=(200.0, 150.0), eyes_px: float = 60.0) -> np.ndarray:
    """dlib-order 5 points of an upright face turned by angle_rad (image coordinates, y down)."""
    upright = np.array([[40, 0], [20, 0], [-40, 0], [-20, 0], [0, 40]], np.float64) * eyes_px / 60.0
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    return upright @ np.array([[cos, sin], [-sin, cos]]) + centre


@pytest.mark.parametrize("angle_deg", [0.0, 25.0, -40.0])
def test_the_face_crop_levels_the_eyes_and_sits_below_them(angle_deg):
    points = five_points(np.radians(angle_deg))
    region = region_from_landmarks(points)
    assert region.angle_rad == pytest.approx(np.radians(angle_deg))
    assert region.side_px == pytest.approx(blink.ROI_SIDE_PER_EYES * 60.0)
    to_crop = region.to_crop(blink.MESH_PX)
    in_crop = points @ to_crop[:, :2].T + to_crop[:, 2]
    assert in_crop[0, 1] == pytest.approx(in_crop[2, 1])  # eyes level
    assert in_crop[0, 0] > in_crop[2, 0]  # not mirrored: the image's right eye stays on the right
    eye_line_y = blink.MESH_PX / 2 - blink.ROI_CENTRE_DOWN * 60.0 * blink.MESH_PX / region.side_px
    assert in_crop[0, 1] == pytest.approx(eye_line_y)
    assert in_crop[4, 1] > eye_line_y  # the nose below
    assert region.to_frame(in_crop, blink.MESH_PX) == pytest.approx(points)


def test_each_eye_crop_is_centred_on_its_corners_and_the_second_mirrored():
    """MediaPipe's iris model sees the subject's right eye as is and the left one mirrored, inner corner first."""
    mesh = np.zeros((blink.MESH_POINTS, 2))
    mesh[[33, 133, 362, 263]] = [(100, 200), (140, 204), (180, 204), (220, 200)]
    first, second = eye_regions(mesh)
    assert first.centre == pytest.approx((120, 202)) and second.centre == pytest.approx((200, 202))
    assert first.side_px == pytest.approx(blink.EYE_SIDE_PER_CORNERS * np.hypot(40, 4))
    for region, (outer, inner) in ((first, (33, 133)), (second, (263, 362))):
        to_crop = region.to_crop(blink.IRIS_PX)
        corners = mesh[[outer, inner]] @ to_crop[:, :2].T + to_crop[:, 2]
        assert corners[0, 0] < blink.IRIS_PX / 2 < corners[1, 0]  # outer corner on the crop's left, both eyes
        assert corners[0, 1] == pytest.approx(corners[1, 1]) == pytest.approx(blink.IRIS_PX / 2)


def test_eye_openness_is_lid_distance_over_eye_width():
    contour = np.zeros((blink.EYE_POINTS, 3))
    contour[list(blink.CONTOUR_CORNERS), :2] = (0, 0), (40, 0)
    for (upper, lower), height in zip(blink.LID_PAIRS, (10, 14, 12)):
        contour[upper, :2], contour[lower, :2] = (15, -height / 2), (15, height / 2)
    assert eye_openness(contour) == pytest.approx(12 / 40)


# ---- the real models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eyes_and_faces(models_dir):
    from edge.config import Config
    from edge.pipeline import Pipeline

    for name in (blink.MESH_FILE, blink.IRIS_FILE):
        if not (models_dir / name).exists():
            pytest.skip(f"{models_dir / name} absent: run `make models`")
    pipeline = Pipeline(Config(models_dir=models_dir))
    image = cv2.imread(str(PHOTOS / "obama.jpg"))
    return blink.EyeLandmarks(models_dir=models_dir, threads=1), pipeline, image, pipeline.locate(image)[0]


def test_open_eyes_in_a_photo(eyes_and_faces):
    eyes, _, image, face = eyes_and_faces
    openness, logit = eyes.openness(image, face.landmarks)
    assert logit > 10 and 0.12 < openness < 0.35
    points, _ = eyes.mesh(image, region_from_landmarks(face.landmarks))
    corners = points[[33, 133, 362, 263], :2]  # inside the crop's upper half, left to right as in the image
    assert np.all((corners > 0) & (corners < blink.MESH_PX)) and np.all(corners[:, 1] < blink.MESH_PX / 2)
    assert np.all(np.diff(corners[:, 0]) > 0)


def painted_shut(image: np.ndarray, eyes: blink.EyeLandmarks, points5: np.ndarray) -> np.ndarray:
    """The photo with both eyes closed by hand: the lid skin just above each eye copied over it, a lash line
    where the lids meet, softened."""
    region = region_from_landmarks(points5)
    points = region.to_frame(eyes.mesh(image, region)[0], blink.MESH_PX)
    shut = image.copy()
    for corners, upper, lower in (((33, 133), [160, 158], [144, 153]), ((263, 362), [385, 387], [380, 373])):
        x0, x1 = int(points[list(corners), 0].min()) - 2, int(points[list(corners), 0].max()) + 3
        top, bottom = int(points[upper, 1].min()) - 2, int(points[lower, 1].max()) + 2
        shut[top:bottom, x0:x1] = image[2 * top - bottom:top, x0:x1]
        lash_y = int(points[lower, 1].mean()) - 1
        cv2.line(shut, (x0 + 1, lash_y), (x1 - 2, lash_y), (35, 30, 30), max(1, (bottom - top) // 6))
        shut[top - 1:bottom + 1, x0:x1] = cv2.GaussianBlur(shut[top - 3:bottom + 3, x0:x1], (3, 3), 0)[2:-2]
    return shut


def test_eyes_painted_shut_read_as_closed(eyes_and_faces):
    """The iris model's lids follow the picture: shut eyes fall below the closed ratio of the open ones."""
    eyes, _, image, face = eyes_and_faces
    open_eyes, _ = eyes.openness(image, face.landmarks)
    shut, logit = eyes.openness(painted_shut(image, eyes, face.landmarks), face.landmarks)
    assert logit > 10 and shut < LivenessConfig().blink_closed_ratio * open_eyes


def test_a_tilted_head_gives_the_same_openness(eyes_and_faces):
    """The crops turn with the eye line: the photo rotated by 30° reads (nearly) the same openness."""
    eyes, pipeline, image, face = eyes_and_faces
    upright, _ = eyes.openness(image, face.landmarks)
    height, width = image.shape[:2]
    turned = cv2.warpAffine(image, cv2.getRotationMatrix2D((width / 2, height / 2), 30, 1.0), (width, height))
    tilted, logit = eyes.openness(turned, pipeline.locate(turned)[0].landmarks)
    assert logit > 10 and tilted == pytest.approx(upright, rel=0.1)


def test_the_door_loop_measures_openness_on_every_frame_of_an_unknown_face(eyes_and_faces, models_dir, tmp_path):
    """The loop embeds a track settled as unknown only every few frames; the blink cue still sees every frame."""
    from edge.config import Config
    from edge.door import SimulatedDoor
    from edge.kiosk import Kiosk
    from edge.store import Store

    _, pipeline, image, _ = eyes_and_faces
    config = Config(models_dir=models_dir, liveness=LivenessConfig(mode="blink"))
    store = Store.open(tmp_path / "empty.edgestore", fingerprint=pipeline.embedder.fingerprint)
    kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=SimulatedDoor(pulse_s=0.1))
    seen = []
    kiosk.liveness.on_verdict = lambda track, frame, face, verdict: seen.append(verdict.openness)
    frames = config.decide.window_frames + 3 * config.decide.unknown_refresh_frames
    for i in range(frames):
        kiosk.step(Frame(image, i, i / FPS))
    assert len(seen) == frames and min(seen) > 0.1


def test_a_still_photo_never_passes_on_blinks(eyes_and_faces, models_dir):
    """Three seconds of the same photo, shifted a pixel or two per frame: open eyes, no blink, pending."""
    _, _, image, face = eyes_and_faces
    live = Liveness(LivenessConfig(mode="blink"), models_dir=models_dir)
    states, openness = [], []
    for i in range(int(3 * FPS)):
        step = np.array([i % 3, (i // 3) % 2], np.float64)
        frame = cv2.warpAffine(image, np.float32([[1, 0, step[0]], [0, 1, step[1]]]), image.shape[1::-1],
                               borderMode=cv2.BORDER_REPLICATE)
        moved = Face(tuple(np.add(face.box, np.tile(step, 2))), face.score, face.landmarks + step)
        verdict = live.observe(1, Frame(frame, i, i / FPS), moved)
        states.append(verdict.state)
        openness.append(verdict.openness)
    assert set(states) == {PENDING} and verdict.blinks == 0
    assert np.ptp(openness) < 0.2 * np.median(openness)  # steady on a still face, far from a blink's dip


def test_eval_pad_reports_the_deepest_eye_closing():
    """Per track the deepest openness ratio and the blinks held; per attack type the deepest over its clips."""
    from edge.config import Config
    from edge.pad import TrackRecord, pad_report

    record = TrackRecord(0.0)
    for t_s, (state, blinks, ratio) in enumerate([(PENDING, 0, 1.0), (PENDING, 0, 0.7), (PASS, 1, 0.95)]):
        record.times_s.append(float(t_s))
        record.widths_px.append(100.0)
        record.states.append(state)
        record.openness_ratios.append(ratio)
        record.blinks = max(record.blinks, blinks)
    summary = record.summary(1)
    assert summary["blinks"] == 1 and summary["min_openness_ratio"] == 0.7 and summary["time_to_pass_s"] == 2.0
    clips = [{"clip": name, "frames": 75, "tracks": 1, "accepted": False, "max_parallax": 0.0, "blinks": 0,
              "min_openness_ratio": ratio} for name, ratio in (("a", 0.9), ("b", 0.76), ("c", None))]
    report = pad_report({"print": clips}, [], Config(liveness=LivenessConfig(mode="blink")))
    assert report["attacks"]["print"]["min_openness_ratio"] == 0.76
    assert TrackRecord(0.0).min_openness_ratio() is None  # blink cue off


# ---- end to end: the real loop -----------------------------------------------------------------------------------


def test_a_print_of_an_enrolled_person_does_not_open_on_blinks(attack_clips, enrolled_store, tmp_path, models_dir):
    """Through the real `run` CLI: with blink alone the print stays pending (no unlock, nothing reported); with
    `any` the parallax cue fails it and the event carries the blink evidence too (no blink, eyes open)."""
    for name in (blink.MESH_FILE, blink.IRIS_FILE):
        if not (models_dir / name).exists():
            pytest.skip(f"{models_dir / name} absent: run `make models`")
    out, _ = attack_clips
    clip = f"file://{out / 'print' / 'obama2.mp4'}"
    (tmp_path / "blink").mkdir()
    events = run_events(clip, enrolled_store, tmp_path / "blink", "liveness:", "  mode: blink")
    assert [e["event"] for e in events if e["event"] in ("unlock", "liveness_fail")] == []
    events = run_events(clip, enrolled_store, tmp_path, "liveness:", "  mode: any")
    assert [e for e in events if e["event"] == "unlock"] == []
    [refused] = [e for e in events if e["event"] == "liveness_fail"]
    evidence = refused["liveness_evidence"]
    assert refused["person"] == "obama" and evidence["blinks"] == 0 and 0.1 < evidence["openness"] < 0.5
    assert evidence["parallax"] < LivenessConfig().min_parallax
