"""Camera sources addressed by URI, one small class each, all with the same interface.

    v4l2:///dev/video0, /dev/video0, /dev/v4l/by-id/…   USB camera through OpenCV's V4L2 backend
    csi://0                                               CSI sensor: Jetson nvarguscamerasrc or Pi picamera2
    rtsp://[user:pass@]host/path                          network camera through OpenCV's FFMPEG backend
    file://video.mp4, video.mp4 (.mp4 .avi .mkv .mov)     every frame in order, timestamps from the file's fps
    images://folder                                       every image in the folder in name order (loop=True repeats)

Constructing a source touches no device; it is opened by `open()`, `with`, or the first `read()`, and released
by `close()`. `status` is "ok" while frames come, "lost" while a live camera is gone and being reconnected in the
background (read() then returns None after timeout_s), and "ended" once a file/folder is finished or the source
is closed (read() returns None from then on). So `None` + "lost" means "try again", `None` + "ended" means "stop".
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from edge.errors import CameraError, InputError
from edge.images import IMAGE_SUFFIXES, load_image, opencv_quiet
from edge.redact import redact
from edge.types import Frame

log = logging.getLogger(__name__)

Status = Literal["ok", "lost", "ended"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
V4L2_BARE_PREFIXES = ("/dev/video", "/dev/v4l/")
SUPPORTED_FORMS = (
    "v4l2:///dev/video0 or /dev/videoN, csi://0, rtsp://host/path, "
    f"file://video.mp4 or a bare {'/'.join(VIDEO_SUFFIXES)} path, images://folder"
)

DEFAULT_READ_TIMEOUT_S = 1.0
INITIAL_BACKOFF_S = 0.25
BACKOFF_FACTOR = 2.0
DEFAULT_MAX_BACKOFF_S = 2.0
FPS_WINDOW_S = 2.0
THREAD_JOIN_TIMEOUT_S = 2.0
FALLBACK_VIDEO_FPS = 30.0  # when a file does not declare its frame rate
DEFAULT_IMAGES_FPS = 30.0  # images:// frames are stamped as if it were a clip at this rate
CSI_DEFAULT_WIDTH_PX = 1280
CSI_DEFAULT_HEIGHT_PX = 720
CSI_DEFAULT_FPS = 30
RTSP_OPEN_TIMEOUT_MS = 5000  # OpenCV's FFMPEG default is 30 s, which would stall reconnection
RTSP_READ_TIMEOUT_MS = 5000
JETSON_MARKERS = (Path("/etc/nv_tegra_release"), Path("/proc/device-tree/compatible"))


class Capture(Protocol):
    """The part of cv2.VideoCapture the sources use; tests pass fakes with the same calls."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...
    def get(self, prop_id: int) -> float: ...
    def set(self, prop_id: int, value: float) -> bool: ...


CaptureFactory = Callable[[str, int, Sequence[int]], Capture]
"""Called like cv2.VideoCapture(target, api_preference, params); the default is open_capture."""


def open_capture(*args) -> cv2.VideoCapture:
    """cv2.VideoCapture(*args) without OpenCV's own warnings: a camera that is not there is reported by the
    source in one line of ours (CameraError), not preceded by a backend dump.

    FFmpeg logs on its own (connection refused, 401, H.264 packet-loss noise, on every reconnection too); it is
    muted unless OPENCV_FFMPEG_LOGLEVEL is set (16 shows its errors). OpenCV reads it when a capture opens.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    with opencv_quiet():
        return cv2.VideoCapture(*args)


class FpsMeter:
    """Frames per second over the last window_s seconds; drops to 0 when frames stop coming."""

    def __init__(self, window_s: float = FPS_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._ticks_s: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._ticks_s.append(self._clock())

    @property
    def fps(self) -> float:
        with self._lock:
            horizon_s = self._clock() - self._window_s
            while self._ticks_s and self._ticks_s[0] < horizon_s:
                self._ticks_s.popleft()
            if len(self._ticks_s) < 2 or self._ticks_s[-1] == self._ticks_s[0]:
                return 0.0
            return (len(self._ticks_s) - 1) / (self._ticks_s[-1] - self._ticks_s[0])


def backoff_delays_s(max_backoff_s: float = DEFAULT_MAX_BACKOFF_S) -> Iterator[float]:
    """Waits between reconnection attempts: 0.25 s, doubling, capped at max_backoff_s, forever."""
    delay_s = INITIAL_BACKOFF_S
    while True:
        yield min(delay_s, max_backoff_s)
        delay_s *= BACKOFF_FACTOR


class Source(ABC):
    """Common interface: read() → Frame | None, close(), context manager, fps, live, counters, status."""

    live = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._status: Status = "ok"
        self._opened = False
        self._frames_read = 0
        self._meter = FpsMeter()

    def open(self) -> Source:
        """Open the device or file now (read() does it on first use); idempotent, no-op once closed. CameraError."""
        if not self._opened and self._status != "ended":
            self._open()
            self._opened = True
        return self

    @abstractmethod
    def read(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Frame | None:
        """The next frame, or None: see `status` for why ("ended": no more frames; "lost": camera gone)."""

    def close(self) -> None:
        """Release the device or file; idempotent. Afterwards read() returns None and status is "ended"."""
        self._status = "ended"

    @abstractmethod
    def _open(self) -> None:
        """Acquire the file or device; raise CameraError saying what to fix when that fails."""

    @property
    def status(self) -> Status:
        return self._status

    @property
    def fps(self) -> float:
        """Measured frames per second over the last FPS_WINDOW_S (live: frames from the camera; files: reads)."""
        return self._meter.fps

    @property
    def frames_read(self) -> int:
        """Frames returned by read()."""
        return self._frames_read

    @property
    def frames_dropped(self) -> int:
        """Frames captured but never returned because a newer one replaced them (always 0 for files)."""
        return 0

    def __enter__(self) -> Source:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.uri)!r}, status={self.status!r})"


class VideoFileSource(Source):
    """A video file played frame by frame, none dropped; t_s = index / the file's fps, so runs are repeatable."""

    def __init__(self, path: str | Path, *, capture_factory: CaptureFactory = open_capture) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise CameraError(f"video {self.path} not found: check the path (relative paths start at {Path.cwd()})")
        self._capture_factory = capture_factory
        self._capture: Capture | None = None
        self._file_fps = FALLBACK_VIDEO_FPS
        self._next_index = 0

    def _open(self) -> None:
        capture = self._capture_factory(str(self.path), cv2.CAP_ANY, [])
        if not capture.isOpened():
            capture.release()
            raise CameraError(
                f"video {self.path} cannot be opened: not a video, or a codec this OpenCV lacks; "
                f"re-encode with `ffmpeg -i {self.path} -c:v libx264 out.mp4`"
            )
        declared_fps = capture.get(cv2.CAP_PROP_FPS)
        self._file_fps = declared_fps if declared_fps > 0 else FALLBACK_VIDEO_FPS
        self._capture = capture

    def read(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Frame | None:
        """The next frame in order; None at the end (status "ended"). timeout_s is unused: files never wait."""
        if self._status == "ended":
            return None
        self.open()
        assert self._capture is not None
        ok, image = self._capture.read()
        if not ok or image is None:
            if self._next_index == 0:
                self.close()
                raise CameraError(f"video {self.path} has no readable frames: re-encode it or pick another file")
            self.close()
            return None
        frame = Frame(image, self._next_index, self._next_index / self._file_fps)
        self._next_index += 1
        self._frames_read += 1
        self._meter.tick()
        return frame

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        super().close()


class ImageFolderSource(Source):
    """Every image in a folder in name order, as frames stamped at `fps`; loop=True starts again at the end."""

    def __init__(self, folder: str | Path, *, loop: bool = False, fps: float = DEFAULT_IMAGES_FPS) -> None:
        super().__init__(str(folder))
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraError(f"images folder {self.folder} not found: check the path in images://…")
        self.loop = loop
        self._stamp_fps = fps
        self._paths: list[Path] = []
        self._next_index = 0

    def _open(self) -> None:
        self._paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise CameraError(f"images folder {self.folder} has no {' '.join(IMAGE_SUFFIXES)} files")

    def read(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Frame | None:
        """The next image; None after the last one unless loop=True (status "ended"). timeout_s is unused."""
        if self._status == "ended":
            return None
        self.open()
        if self._next_index >= len(self._paths) and not self.loop:
            self.close()
            return None
        path = self._paths[self._next_index % len(self._paths)]
        try:
            image = load_image(path)
        except InputError as err:
            raise CameraError(f"images://{self.folder}: {err}") from None
        frame = Frame(image, self._next_index, self._next_index / self._stamp_fps)
        self._next_index += 1
        self._frames_read += 1
        self._meter.tick()
        return frame


class LiveSource(Source):
    """A camera read continuously by a daemon thread that keeps only the newest frame and reconnects when lost.

    Subclasses say how to open the capture (`_open_capture`) and what to tell the user when that fails.
    """

    live = True

    def __init__(
        self,
        uri: str,
        *,
        capture_factory: CaptureFactory = open_capture,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        super().__init__(uri)
        self._capture_factory = capture_factory
        self.max_backoff_s = max_backoff_s
        self._newest: Frame | None = None
        self._frames_captured = 0
        self._frames_dropped = 0
        self._opened_at_s = 0.0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def _open_capture(self) -> Capture:
        """A new capture for this camera (check isOpened()); called on open and on every reconnection."""

    @abstractmethod
    def _open_error(self) -> CameraError:
        """The error for a first open that failed, naming the likely fix."""

    def _open(self) -> None:
        capture = self._open_capture()
        if not capture.isOpened():
            capture.release()
            raise self._open_error()
        self._opened_at_s = time.monotonic()
        name = f"camera {redact(self.uri)}"
        self._thread = threading.Thread(target=self._grab, args=(capture,), name=name, daemon=True)
        self._thread.start()

    def read(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Frame | None:
        """The newest frame not yet returned, waiting up to timeout_s for one; older ones are dropped.

        None means no new frame within timeout_s: status "lost" → the camera is gone and being reconnected,
        "ok" → the camera is merely slower than timeout_s, "ended" → the source was closed.
        """
        if self._status == "ended":
            return None
        self.open()
        with self._changed:
            self._changed.wait_for(lambda: self._newest is not None or self._status == "ended", timeout=timeout_s)
            frame, self._newest = self._newest, None
        if frame is not None:
            self._frames_read += 1
        return frame

    def close(self) -> None:
        """Stop the grabber thread (it releases the capture) and wait up to THREAD_JOIN_TIMEOUT_S for it."""
        self._stop.set()
        with self._changed:
            super().close()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(THREAD_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("camera_close_slow source=%s detail=capture read still blocked", redact(self.uri))

    @property
    def frames_dropped(self) -> int:
        return self._frames_dropped

    @property
    def thread(self) -> threading.Thread | None:
        """The grabber thread (None before open); exposed so callers and tests can check it has stopped."""
        return self._thread

    def _grab(self, capture: Capture | None) -> None:
        """Grabber loop: read as fast as the camera delivers; on failure mark lost and reopen with backoff."""
        delays_s = backoff_delays_s(self.max_backoff_s)
        lost_at_s = 0.0
        try:
            while not self._stop.is_set():
                if capture is None:
                    if self._stop.wait(next(delays_s)):
                        break
                    capture = self._reopen()
                    continue
                ok, image = capture.read()
                if self._stop.is_set():
                    break
                if ok and image is not None:
                    if self._status == "lost":
                        lost_for_s = time.monotonic() - lost_at_s
                        log.info("camera_recovered source=%s after_s=%.1f", redact(self.uri), lost_for_s)
                    delays_s = backoff_delays_s(self.max_backoff_s)
                    self._publish(image)
                    continue
                if self._status != "lost":
                    lost_at_s = time.monotonic()
                    log.warning("camera_lost source=%s action=reconnecting", redact(self.uri))
                    self._set_status("lost")
                capture.release()
                capture = None
        finally:
            if capture is not None:
                capture.release()

    def _reopen(self) -> Capture | None:
        """One reconnection attempt: the opened capture, or None (the grabber then backs off and tries again)."""
        try:
            capture = self._open_capture()
        except (CameraError, cv2.error, OSError) as err:
            log.warning("camera_reopen_failed source=%s error=%s", redact(self.uri), err)
            return None
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _publish(self, image: np.ndarray) -> None:
        with self._changed:
            if self._newest is not None:
                self._frames_dropped += 1
            self._newest = Frame(image, self._frames_captured, time.monotonic() - self._opened_at_s)
            self._frames_captured += 1
            if self._status == "lost":
                self._status = "ok"
            self._changed.notify_all()
        self._meter.tick()

    def _set_status(self, status: Status) -> None:
        with self._changed:
            if self._status != "ended":
                self._status = status
            self._changed.notify_all()


class V4L2Source(LiveSource):
    """A USB (UVC) camera at a /dev path; width/height/fps are requested from the driver when given."""

    def __init__(
        self,
        device: str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        capture_factory: CaptureFactory = open_capture,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        super().__init__(f"v4l2://{device}", capture_factory=capture_factory, max_backoff_s=max_backoff_s)
        self.device = device
        self._requested = {cv2.CAP_PROP_FRAME_WIDTH: width, cv2.CAP_PROP_FRAME_HEIGHT: height, cv2.CAP_PROP_FPS: fps}

    def _open_capture(self) -> Capture:
        capture = self._capture_factory(self.device, cv2.CAP_V4L2, [])
        if capture.isOpened():
            for prop_id, value in self._requested.items():
                if value is not None:
                    capture.set(prop_id, value)
        return capture

    def _open_error(self) -> CameraError:
        if not os.path.exists(self.device):
            return CameraError(
                f"camera {self.device} not found: is it plugged in? list cameras with `v4l2-ctl --list-devices`"
            )
        if not os.access(self.device, os.R_OK | os.W_OK):
            return CameraError(
                f"camera {self.device}: permission denied: the service user needs the `video` group "
                "(`sudo usermod -aG video $USER`, then log in again)"
            )
        return CameraError(
            f"camera {self.device} cannot be opened: busy in another program, or not a capture node; "
            f"check with `v4l2-ctl -d {self.device} --all`"
        )


class RtspSource(LiveSource):
    """A network camera over RTSP through OpenCV's FFMPEG backend, with short open/read timeouts."""

    def _open_capture(self) -> Capture:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, RTSP_OPEN_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, RTSP_READ_TIMEOUT_MS,
        ]
        return self._capture_factory(self.uri, cv2.CAP_FFMPEG, params)

    def _open_error(self) -> CameraError:
        return CameraError(
            f"stream {redact(self.uri)} cannot be opened: check the address, credentials and that the camera is "
            f"reachable (`ffprobe '{redact(self.uri)}'`)"
        )


def is_jetson() -> bool:
    """True on an NVIDIA Jetson (L4T release file, or a Tegra device tree)."""
    release, compatible = JETSON_MARKERS
    if release.exists():
        return True
    try:
        return b"nvidia,tegra" in compatible.read_bytes()
    except OSError:
        return False


def opencv_has_gstreamer() -> bool:
    """True when the imported OpenCV was built with GStreamer (JetPack's is; PyPI wheels are not)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def picamera2_available() -> bool:
    return importlib.util.find_spec("picamera2") is not None


def csi_pipeline(sensor_id: int, width_px: int, height_px: int, fps: int) -> str:
    """GStreamer pipeline for a Jetson CSI sensor: NVMM NV12 → nvvidconv → BGRx → BGR, newest buffer only."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width_px}, height={height_px}, framerate={fps}/1, format=NV12 ! "
        f"nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


class _Picamera2Capture:
    """picamera2 (Raspberry Pi CSI via libcamera) behind the VideoCapture calls the grabber makes."""

    def __init__(self, camera_num: int, width_px: int, height_px: int, fps: int) -> None:
        from picamera2 import Picamera2  # system package python3-picamera2, only on a Pi

        self._camera = None
        try:
            camera = Picamera2(camera_num=camera_num)
            # "RGB888" is B,G,R in memory, the order OpenCV expects.
            main = {"size": (width_px, height_px), "format": "RGB888"}
            camera.configure(camera.create_video_configuration(main=main, controls={"FrameRate": fps}))
            camera.start()
            self._camera = camera
        except Exception as err:  # libcamera reports a missing/busy sensor with assorted exception types
            log.warning("camera_open_failed source=csi://%d error=%s", camera_num, err)

    def isOpened(self) -> bool:
        return self._camera is not None

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self._camera is None:
            return False, None
        try:
            return True, self._camera.capture_array("main")
        except Exception as err:  # same: any libcamera failure means "no frame", which triggers a reconnect
            log.warning("camera_read_failed source=picamera2 error=%s", err)
            return False, None

    def release(self) -> None:
        if self._camera is not None:
            self._camera.close()
            self._camera = None

    def get(self, prop_id: int) -> float:
        return 0.0

    def set(self, prop_id: int, value: float) -> bool:
        return False


class CsiSource(LiveSource):
    """A CSI sensor: nvarguscamerasrc through GStreamer on Jetson, picamera2 on a Raspberry Pi."""

    def __init__(
        self,
        sensor_id: int,
        *,
        width: int = CSI_DEFAULT_WIDTH_PX,
        height: int = CSI_DEFAULT_HEIGHT_PX,
        fps: int = CSI_DEFAULT_FPS,
        capture_factory: CaptureFactory = open_capture,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        super().__init__(f"csi://{sensor_id}", capture_factory=capture_factory, max_backoff_s=max_backoff_s)
        self.sensor_id = sensor_id
        self.width_px, self.height_px, self.fps_requested = width, height, fps

    def _open_capture(self) -> Capture:
        if is_jetson():
            if not opencv_has_gstreamer():
                raise CameraError(
                    f"{self.uri} on Jetson needs OpenCV built with GStreamer, and PyPI's opencv-python has none: "
                    "use JetPack's system OpenCV (`sudo apt install nvidia-opencv`) from a venv created with "
                    "--system-site-packages, and `pip uninstall opencv-python opencv-python-headless` in it"
                )
            pipeline = csi_pipeline(self.sensor_id, self.width_px, self.height_px, self.fps_requested)
            return self._capture_factory(pipeline, cv2.CAP_GSTREAMER, [])
        if picamera2_available():
            return _Picamera2Capture(self.sensor_id, self.width_px, self.height_px, self.fps_requested)
        raise CameraError(
            f"{self.uri} needs a CSI backend and none is available: on a Raspberry Pi install picamera2 "
            "(`sudo apt install python3-picamera2`, venv created with --system-site-packages); on a Jetson use "
            "JetPack's OpenCV with GStreamer; for a USB camera use v4l2:///dev/video0 instead"
        )

    def _open_error(self) -> CameraError:
        if is_jetson():
            return CameraError(
                f"{self.uri} cannot be opened through nvarguscamerasrc: is the ribbon cable seated and the sensor "
                f"detected? test with `gst-launch-1.0 nvarguscamerasrc sensor-id={self.sensor_id} num-buffers=1 ! "
                "fakesink`; if it is held by a dead process, `sudo systemctl restart nvargus-daemon`"
            )
        return CameraError(
            f"{self.uri} cannot be opened through picamera2: is the ribbon cable seated and the camera listed by "
            "`rpicam-hello --list-cameras`? is another program using it?"
        )


def open_source(uri: str, **options: object) -> Source:
    """The source for uri (see the module docstring for the forms), not yet opened; options go to its class.

    Raises CameraError for an unsupported form, an option the source does not take, or a missing file/folder.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if uri.startswith(V4L2_BARE_PREFIXES):
            return _build(V4L2Source, uri, uri, options)
        if Path(uri).suffix.lower() in VIDEO_SUFFIXES:
            return _build(VideoFileSource, uri, uri, options)
        raise CameraError(f"camera source {uri!r} not understood: use {SUPPORTED_FORMS}")
    scheme = scheme.lower()
    if scheme == "v4l2":
        return _build(V4L2Source, rest, uri, options)
    if scheme == "csi":
        if not rest.isdigit():
            raise CameraError(f"camera source {uri!r}: the CSI sensor id must be a number, e.g. csi://0")
        return _build(CsiSource, int(rest), uri, options)
    if scheme in ("rtsp", "rtsps"):
        return _build(RtspSource, uri, uri, options)
    if scheme == "file":
        return _build(VideoFileSource, rest, uri, options)
    if scheme == "images":
        return _build(ImageFolderSource, rest, uri, options)
    raise CameraError(f"camera source {redact(uri)!r}: unknown scheme {scheme!r}; use {SUPPORTED_FORMS}")


def _build(cls: type[Source], target: object, uri: str, options: dict[str, object]) -> Source:
    """cls(target, **options), with an unknown option reported as a CameraError that lists the accepted ones."""
    accepted = [name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CameraError(
            f"camera source {redact(uri)!r}: unknown option {', '.join(unknown)}; it accepts {', '.join(accepted)}"
        )
    return cls(target, **options)
