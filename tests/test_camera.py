"""Camera sources without hardware: the sample video, PNGs in a tmp folder, and fake captures for live cameras."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import wait_until

from edge import camera
from edge.camera import (
    CsiSource,
    FpsMeter,
    ImageFolderSource,
    RtspSource,
    V4L2Source,
    VideoFileSource,
    backoff_delays_s,
    open_source,
)
from edge.errors import CameraError

SAMPLE_VIDEO = Path(__file__).resolve().parents[1] / "samples" / "video" / "walk_toward_camera.mp4"
SAMPLE_FRAMES = 105
SAMPLE_FPS = 25.0
FAKE_FRAME_INTERVAL_S = 0.002  # a fake camera at 500 fps, far faster than the test reads
FAKE_STALL_LIMIT_S = 10.0



class FakeCamera:
    """A simulated device shared by every capture its factory makes: numbered frames, can be unplugged or stall."""

    def __init__(self, stall_after: int | None = None) -> None:
        self.plugged = True
        self.delivered = 0
        self.stall_after = stall_after
        self.stalled = False
        self.gate = threading.Event()
        self.calls: list[tuple[float, str, int, list[int]]] = []
        self.captures: list[FakeCapture] = []

    def factory(self, target: str, api: int, params: Sequence[int]) -> FakeCapture:
        self.calls.append((time.monotonic(), target, api, list(params)))
        capture = FakeCapture(self, opened=self.plugged)
        self.captures.append(capture)
        return capture


class FakeCapture:
    """The cv2.VideoCapture calls a source makes: frames are 4×4 images filled with their number (mod 256)."""

    def __init__(self, device: FakeCamera, opened: bool) -> None:
        self.device = device
        self.opened = opened
        self.released = False
        self.props: dict[int, float] = {}

    def isOpened(self) -> bool:
        return self.opened and not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        device = self.device
        if device.stall_after is not None and device.delivered >= device.stall_after:
            device.stalled = True
            device.gate.wait(FAKE_STALL_LIMIT_S)
            return False, None
        time.sleep(FAKE_FRAME_INTERVAL_S)
        if not (device.plugged and self.isOpened()):
            return False, None
        image = np.full((4, 4, 3), device.delivered % 256, np.uint8)
        device.delivered += 1
        return True, image

    def release(self) -> None:
        self.released = True

    def get(self, prop_id: int) -> float:
        return 0.0

    def set(self, prop_id: int, value: float) -> bool:
        self.props[prop_id] = value
        return True


# ---- URIs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "cls"),
    [
        ("v4l2:///dev/video0", V4L2Source),
        ("/dev/video2", V4L2Source),
        ("/dev/v4l/by-id/usb-Logitech_C920-video-index0", V4L2Source),
        ("csi://0", CsiSource),
        ("rtsp://host/x", RtspSource),
        ("rtsp://admin:secret@10.0.0.5:554/stream1", RtspSource),
    ],
)
def test_live_uris_map_to_their_class_without_touching_the_device(uri: str, cls: type) -> None:
    device = FakeCamera()
    source = open_source(uri, capture_factory=device.factory)
    assert type(source) is cls
    assert source.live and source.status == "ok" and source.thread is None
    assert device.calls == []
    assert "secret" not in repr(source)


def test_uri_targets_are_parsed() -> None:
    assert open_source("v4l2:///dev/video0").device == "/dev/video0"
    assert open_source("/dev/video2").device == "/dev/video2"
    assert open_source("csi://1").sensor_id == 1
    assert open_source("rtsp://host/x").uri == "rtsp://host/x"


def test_file_and_images_uris_map_to_their_class_without_opening(tmp_path: Path) -> None:
    device = FakeCamera()
    for uri in (f"file://{SAMPLE_VIDEO}", str(SAMPLE_VIDEO)):
        source = open_source(uri, capture_factory=device.factory)
        assert type(source) is VideoFileSource and source.path == SAMPLE_VIDEO and not source.live
    assert device.calls == []
    source = open_source(f"images://{tmp_path}")
    assert type(source) is ImageFolderSource and source.folder == tmp_path and not source.live


@pytest.mark.parametrize("uri", ["http://cam/x", "camera.txt", "0", "usb://0"])
def test_unknown_forms_list_the_supported_ones(uri: str) -> None:
    with pytest.raises(CameraError) as err:
        open_source(uri)
    for form in ("v4l2:///dev/video0", "csi://0", "rtsp://", "file://", "images://"):
        assert form in str(err.value)


def test_bad_csi_id_and_unknown_option_are_errors() -> None:
    with pytest.raises(CameraError, match="must be a number"):
        open_source("csi://front")
    with pytest.raises(CameraError, match=r"unknown option widht; it accepts width, height, fps"):
        open_source("/dev/video0", widht=640)


def test_missing_and_unreadable_videos_are_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    for uri in (str(missing), f"file://{missing}"):
        with pytest.raises(CameraError, match=f"video {missing} not found"):
            open_source(uri)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    source = open_source(str(garbage))
    with pytest.raises(CameraError, match="cannot be opened"):
        source.read()


# ---- files and folders --------------------------------------------------------------------------------------


def test_video_file_plays_every_frame_in_order_with_file_timestamps() -> None:
    with open_source(f"file://{SAMPLE_VIDEO}") as source:
        frames = []
        while (frame := source.read()) is not None:
            assert source.status == "ok"
            frames.append((frame.index, frame.t_s, frame.image.shape))
        assert source.status == "ended"
        assert source.read() is None and source.status == "ended"
        assert source.frames_read == SAMPLE_FRAMES and source.frames_dropped == 0
        assert source.fps > 0
    assert [index for index, _, _ in frames] == list(range(SAMPLE_FRAMES))
    assert [t_s for _, t_s, _ in frames] == pytest.approx([i / SAMPLE_FPS for i in range(SAMPLE_FRAMES)])
    assert {shape for _, _, shape in frames} == {(1080, 1920, 3)}


def write_pngs(folder: Path) -> None:
    """c.png, a.png, b.png filled with 30, 10, 20, plus a file that is not an image."""
    for name, value in (("c.png", 30), ("a.png", 10), ("b.png", 20)):
        cv2.imwrite(str(folder / name), np.full((8, 8, 3), value, np.uint8))
    (folder / "notes.txt").write_text("not an image")


def test_images_folder_plays_in_sorted_order_then_ends(tmp_path: Path) -> None:
    write_pngs(tmp_path)
    with open_source(f"images://{tmp_path}") as source:
        frames = [source.read() for _ in range(3)]
        assert source.read() is None and source.status == "ended"
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 30]
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.t_s for f in frames] == pytest.approx([0.0, 1 / camera.DEFAULT_IMAGES_FPS, 2 / camera.DEFAULT_IMAGES_FPS])


def test_images_folder_loops(tmp_path: Path) -> None:
    write_pngs(tmp_path)
    with open_source(f"images://{tmp_path}", loop=True, fps=10.0) as source:
        frames = [source.read() for _ in range(5)]
        assert source.status == "ok"
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 30, 10, 20]
    assert [f.t_s for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_images_folder_missing_or_empty_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="not found"):
        open_source(f"images://{tmp_path / 'nope'}")
    with pytest.raises(CameraError, match="has no"):
        open_source(f"images://{tmp_path}").read()


# ---- live cameras -------------------------------------------------------------------------------------------


def test_v4l2_open_requests_size_and_rate_from_the_driver() -> None:
    device = FakeCamera()
    options = {"width": 640, "height": 480, "fps": 30}
    with open_source("v4l2:///dev/video0", capture_factory=device.factory, **options) as source:
        assert source.read() is not None
    (_, target, api, _), = device.calls
    assert (target, api) == ("/dev/video0", cv2.CAP_V4L2)
    requested = {cv2.CAP_PROP_FRAME_WIDTH: 640, cv2.CAP_PROP_FRAME_HEIGHT: 480, cv2.CAP_PROP_FPS: 30}
    assert device.captures[0].props == requested


def test_v4l2_missing_device_error_names_the_fix() -> None:
    device = FakeCamera()
    device.plugged = False
    expected = r"camera /dev/video99 not found: is it plugged in\? .*v4l2-ctl --list-devices"
    with pytest.raises(CameraError, match=expected):
        open_source("/dev/video99", capture_factory=device.factory).open()
    assert device.captures[0].released


@pytest.mark.parametrize(("uri", "error"), [
    ("/dev/video99", "error: camera /dev/video99 not found"),
    ("rtsp://127.0.0.1:1/door", "error: stream rtsp://127.0.0.1:1/door cannot be opened"),  # port 1: refused
], ids=["v4l2", "rtsp"])
def test_unreachable_camera_through_the_real_cli_is_our_line_only(tmp_path, uri, error) -> None:
    """The real cv2.VideoCapture (V4L2, FFmpeg): no OpenCV or FFmpeg line before ours."""
    from conftest import cli

    proc = cli("run", "--source", uri, "--store", tmp_path / "s.edgestore", "--audit", tmp_path / "a.sqlite")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"run: source {uri}") and lines[1].startswith(error), proc.stderr


def test_rtsp_opens_with_ffmpeg_and_short_timeouts() -> None:
    device = FakeCamera()
    with open_source("rtsp://host/x", capture_factory=device.factory) as source:
        assert source.read() is not None
    (_, target, api, params), = device.calls
    assert (target, api) == ("rtsp://host/x", cv2.CAP_FFMPEG)
    assert params == [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, camera.RTSP_OPEN_TIMEOUT_MS,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, camera.RTSP_READ_TIMEOUT_MS]


def test_csi_on_jetson_opens_an_nvargus_gstreamer_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(camera, "is_jetson", lambda: True)
    monkeypatch.setattr(camera, "opencv_has_gstreamer", lambda: True)
    device = FakeCamera()
    with open_source("csi://1", capture_factory=device.factory) as source:
        assert source.read() is not None
    (_, pipeline, api, _), = device.calls
    assert api == cv2.CAP_GSTREAMER
    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 ! ")
    assert "width=1280, height=720, framerate=30/1" in pipeline
    assert pipeline.index("nvvidconv") < pipeline.index("BGRx") < pipeline.index("videoconvert")
    assert pipeline.endswith("appsink drop=true max-buffers=1 sync=false")


def test_csi_without_a_backend_says_which_system_package_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeCamera()
    monkeypatch.setattr(camera, "is_jetson", lambda: True)
    monkeypatch.setattr(camera, "opencv_has_gstreamer", lambda: False)
    with pytest.raises(CameraError, match=r"GStreamer.*JetPack's system OpenCV.*--system-site-packages"):
        open_source("csi://0", capture_factory=device.factory).open()
    monkeypatch.setattr(camera, "is_jetson", lambda: False)
    monkeypatch.setattr(camera, "picamera2_available", lambda: False)
    with pytest.raises(CameraError, match=r"python3-picamera2"):
        open_source("csi://0", capture_factory=device.factory).open()
    assert device.calls == []


def test_live_read_returns_the_newest_frame_and_counts_the_dropped() -> None:
    device = FakeCamera(stall_after=50)
    source = open_source("/dev/video0", capture_factory=device.factory)
    try:
        source.open()
        assert wait_until(lambda: device.stalled, timeout_s=5.0)
        frame = source.read()
        assert frame is not None and frame.index == 49 and int(frame.image[0, 0, 0]) == 49
        assert source.frames_read == 1 and source.frames_dropped == 49
        assert source.fps > 0
        assert source.read(timeout_s=0.1) is None and source.status == "ok"
    finally:
        device.gate.set()
        source.close()


def test_live_read_skips_stale_frames_and_close_stops_the_thread() -> None:
    device = FakeCamera()
    source = open_source("v4l2:///dev/video0", capture_factory=device.factory)
    indices = []
    with source:
        for _ in range(5):
            time.sleep(0.05)
            frame = source.read()
            assert frame is not None
            indices.append(frame.index)
        thread = source.thread
        assert thread is not None and thread.is_alive() and thread.daemon
    assert all(later - earlier > 1 for earlier, later in zip(indices, indices[1:])), indices
    assert source.frames_read == 5 and source.frames_dropped > 0
    assert source.frames_read + source.frames_dropped <= device.delivered
    assert not thread.is_alive()
    assert all(capture.released for capture in device.captures)
    assert source.status == "ended" and source.read() is None


def test_lost_camera_reconnects_with_backoff_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge.camera")
    device = FakeCamera()
    with open_source("/dev/video0", capture_factory=device.factory) as source:
        before = source.read()
        assert before is not None and source.status == "ok"

        device.plugged = False
        unplugged_at_s = time.monotonic()
        assert wait_until(lambda: source.status == "lost", timeout_s=1.0)
        source.read(timeout_s=0.05)  # may hand over the last frame captured before the loss
        assert source.read(timeout_s=0.2) is None and source.status == "lost"

        time.sleep(max(0.0, unplugged_at_s + 1.0 - time.monotonic()))
        device.plugged = True
        after = None
        while after is None and time.monotonic() - unplugged_at_s < 5.0:
            after = source.read(timeout_s=0.5)
        recovered_s = time.monotonic() - unplugged_at_s
        assert after is not None and source.status == "ok" and recovered_s < 5.0
        assert after.index > before.index and after.t_s > before.t_s
        following = source.read()
        assert following is not None and following.index > after.index

    reopen_times_s = [called_at_s for called_at_s, *_ in device.calls[1:]]
    assert len(reopen_times_s) == 3  # failed at +0.25 s and +0.75 s, succeeded at +1.75 s
    gaps_s = np.diff([unplugged_at_s, *reopen_times_s])
    assert gaps_s == pytest.approx([0.25, 0.5, 1.0], abs=0.2)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("camera_lost source=v4l2:///dev/video0") for m in messages)
    assert any(m.startswith("camera_recovered source=v4l2:///dev/video0") for m in messages)


# ---- helpers ------------------------------------------------------------------------------------------------


def test_backoff_doubles_from_a_quarter_second_up_to_the_cap() -> None:
    assert list(islice(backoff_delays_s(), 6)) == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert list(islice(backoff_delays_s(max_backoff_s=0.6), 4)) == [0.25, 0.5, 0.6, 0.6]


def test_fps_meter_measures_a_sliding_window() -> None:
    now_s = 0.0
    meter = FpsMeter(window_s=2.0, clock=lambda: now_s)
    assert meter.fps == 0.0
    for step in range(31):
        now_s = step * 0.1
        meter.tick()
    assert meter.fps == pytest.approx(10.0)
    now_s = 10.0
    assert meter.fps == 0.0
