"""Typed configuration: every field has a bound, a default and a one-line description; unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.errors import ConfigError, first_line


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectorConfig(Section):
    confidence: float = Field(0.5, ge=0.05, le=0.99, description="res10 SSD score needed to keep a box")
    nms_iou: float = Field(0.4, ge=0.1, le=0.9, description="boxes overlapping more than this IoU are merged (NMS)")
    min_face_px: int = Field(30, ge=16, le=1000, description="ignore faces whose box is narrower than this")
    max_side_px: int = Field(640, ge=300, le=4096, description="images are downscaled to this longest side before detection")
    max_overhang: float = Field(0.1, ge=0.0, le=0.5, description="reject boxes extending further past the image edge (fraction of box size)")
    max_aspect: float = Field(2.0, ge=1.2, le=4.0, description="reject boxes whose height/width (or width/height) exceeds this")
    backend: Literal["auto", "opencv", "onnxruntime"] = Field(
        "auto", description="detector runtime; auto = ONNX Runtime when the converted .onnx exists (make models), else OpenCV dnn"
    )
    threads: int = Field(2, ge=1, le=64, description="CPU threads for the ONNX Runtime detector (README, Speed)")
    precision: Literal["int8", "fp32"] = Field(
        "int8", description="camera frames' ONNX Runtime detector: int8 (quantised by make models; README, Speed) or fp32; photos always fp32"
    )
    max_input_aspect: float = Field(
        1.2, ge=1.0, le=2.0,
        description="a wide (tall) camera frame reaches the SSD 300 px high (wide), up to 300 × this wide (high); photos 300×300",
    )
    scan_every_s: float = Field(
        0.2, ge=0.0, le=10.0,
        description="door loop: the whole frame is scanned at least this often; between scans each face is looked for "
                    "only around where it was (README, Speed); a newcomer is found within this time; 0 = every frame",
    )


class EmbedderConfig(Section):
    backend: Literal["auto", "onnxruntime", "opencv", "tensorrt"] = Field(
        "auto", description="embedding backend; auto = TensorRT when a matching engine exists, else ONNX Runtime"
    )
    threads: int = Field(2, ge=1, le=64, description="CPU threads for the embedding backend (README, Speed: 2 on a 2-core board)")
    max_batch: int = Field(8, ge=1, le=64, description="most faces embedded in one forward pass")
    mirror_average: bool = Field(True, description="average each face's embedding with its mirror image's (stores remember the setting)")


# Security level → (target false-accept rate per decision, threshold_l2). Measured on lfw_dev with eval-templates
# (mean templates, one probe photo, centre face): the strictest threshold over enrolments of K = 1, 2, 3 photos at
# that FAR, rounded down (README, Security levels). A door track's fused frames are near-duplicates, not independent
# photos, so the one-photo (M=1) column applies.
SECURITY_LEVELS: dict[str, tuple[float, float]] = {"standard": (1e-4, 0.344), "high": (1e-5, 0.311),
                                                   "highest": (1e-6, 0.275)}
DEFAULT_SECURITY = "high"


class MatchConfig(Section):
    security: Literal["standard", "high", "highest"] = Field(
        DEFAULT_SECURITY, description="target false-accept rate per decision: standard 1e-4, high 1e-5, highest 1e-6; sets threshold_l2"
    )
    threshold_l2: float = Field(SECURITY_LEVELS[DEFAULT_SECURITY][1], gt=0.0, le=2.0,
                                description="accept below this L2 distance between unit embeddings; set it only to override the security level (e.g. from calibrate)")
    margin_l2: float = Field(0.05, ge=0.0, le=1.0, description="the best person must beat the second best by at least this")

    @model_validator(mode="before")
    @classmethod
    def _threshold_from_security(cls, data):
        """threshold_l2 follows `security` unless it is given explicitly."""
        if isinstance(data, dict) and data.get("threshold_l2") is None:
            level = data.get("security", DEFAULT_SECURITY)
            if level in SECURITY_LEVELS:
                data = {**data, "threshold_l2": SECURITY_LEVELS[level][1]}
        return data


class DecideConfig(Section):
    votes_needed: int = Field(3, ge=1, le=30, description="frames the same person must win (k) before the door opens")
    window_frames: int = Field(5, ge=1, le=60, description="the last n frames of a track that the vote looks at")
    fuse_frames: int = Field(10, ge=1, le=60, description="a track's last frames fused (quality-weighted) into the embedding each vote is taken on; 1 = the frame alone")
    iou_min: float = Field(0.3, ge=0.05, le=0.95, description="box overlap needed to continue a track in the next frame")
    max_missed_frames: int = Field(5, ge=0, le=100, description="a track ends after this many frames without its face")
    cooldown_s: float = Field(10.0, ge=0.0, le=3600.0, description="no second unlock for the same person within this time")
    unknown_interval_s: float = Field(10.0, ge=0.0, le=3600.0, description="at most one `unknown` event per this interval")
    unknown_refresh_frames: int = Field(
        5, ge=1, le=100, description="a track voted unknown for a whole window is embedded again every this many frames, "
        "or sooner once its face is 10 % wider (it came closer); 1 = every frame. Unlocked tracks are not embedded again")

    @model_validator(mode="after")
    def _votes_fit_window(self) -> "DecideConfig":
        if self.votes_needed > self.window_frames:
            raise ValueError("votes_needed cannot exceed window_frames")
        return self


class EnrollConfig(Section):
    min_face_px: int = Field(80, ge=20, le=2000, description="enrolment needs a face at least this wide (detector box)")
    min_sharpness: float = Field(10.0, ge=0.0, le=10000.0, description="variance of the Laplacian of the chip; lower = blurred")
    max_yaw_ratio: float = Field(0.25, ge=0.0, le=1.0, description="nose offset from the eyes' midpoint / eye distance; 0 = frontal")
    max_embeddings_per_person: int = Field(10, ge=1, le=100, description="templates kept per person (oldest dropped)")
    admins: list[str] = Field(default_factory=list, description="people whose presence allows button enrolment; empty = anyone (set up mode)")
    admin_window_s: float = Field(30.0, ge=0.0, le=3600.0, description="a button press counts within this time of an admin being recognised")
    capture_frames: int = Field(10, ge=1, le=300, description="frames watched after a button press; the best faces are enrolled")
    button_rows: int = Field(3, ge=1, le=20, description="button enrolment keeps up to this many of the best, mutually distinct faces of the capture")
    auto_update: bool = Field(False, description="after a confident, unambiguous unlock add the track's fused embedding as a row when it shows a new condition (README: why off)")
    auto_update_max_l2: float = Field(0.25, gt=0.0, le=2.0, description="auto_update: only unlocks whose fused distance is below this count as confident")
    auto_update_min_margin_l2: float = Field(0.15, ge=0.0, le=2.0, description="auto_update: the runner-up must be at least this much further (unambiguous)")
    auto_update_min_l2: float = Field(0.12, ge=0.0, le=2.0, description="auto_update: the fused embedding must be this far from every row of the person (a new condition)")
    auto_update_max_rows: int = Field(3, ge=1, le=50, description="auto_update: at most this many automatic rows per person")


class StoreConfig(Section):
    path: Path = Field(Path("state/store.edgestore"), description="embedding store file (the service uses /var/lib/edge-access)")
    key_file: Path | None = Field(None, description="32-byte key file for AES-GCM encryption at rest (None = unencrypted)")


class AuditConfig(Section):
    path: Path = Field(Path("state/audit.sqlite"), description="SQLite decision log")
    retention_days: float = Field(30.0, ge=0.01, le=3650.0, description="decisions (and snapshots) older than this are deleted")
    snapshots: bool = Field(False, description="keep a face chip JPEG with each decision (biometric data: off by default)")


class DoorConfig(Section):
    kind: Literal["gpio", "simulated"] = Field("simulated", description="gpio drives the relay; simulated only logs")
    relay_pin: int | str = Field(
        17, description="relay GPIO: BCM number or name ('GPIO17', 'BOARD11'); with gpiod 'gpiochip0:105' or a line name ('PQ.05')"
    )
    active_high: bool = Field(True, description="false for relay boards that switch on a low input")
    pulse_s: float = Field(3.0, ge=0.2, le=60.0, description="how long the relay stays energised per unlock")
    led_pin: int | str | None = Field(None, description="optional status LED GPIO")
    buzzer_pin: int | str | None = Field(None, description="optional buzzer GPIO")
    button_pin: int | str | None = Field(None, description="optional enrolment button GPIO (to ground, internal pull-up)")
    gpio_backend: Literal["auto", "gpiozero", "gpiod"] = Field(
        "auto", description="pin driver; auto = gpiozero's own on a Raspberry Pi or with GPIOZERO_PIN_FACTORY set, else gpiod (Jetson)"
    )


class CameraConfig(Section):
    source: str = Field("v4l2:///dev/video0", description="camera URI: v4l2:///dev/videoN, csi://0, rtsp://…, file://…, images://dir")
    width: int = Field(640, ge=160, le=4096, description="requested capture width in pixels (live cameras)")
    height: int = Field(480, ge=120, le=4096, description="requested capture height in pixels (live cameras)")


class MqttConfig(Section):
    enabled: bool = Field(False, description="publish to an MQTT broker (Home Assistant discovery, door state, decision events)")
    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is the usual TLS port)")
    tls_ca: Path | None = Field(None, description="CA certificate file; set to connect over TLS")
    tls_cert: Path | None = Field(None, description="client certificate for TLS client authentication (with tls_key)")
    tls_key: Path | None = Field(None, description="private key of tls_cert")
    username: str | None = Field(None, description="broker user name (None = anonymous)")
    password_file: Path | None = Field(None, description="file holding the broker password (kept out of config.yaml)")
    client_id: str | None = Field(None, description="MQTT client id and Home Assistant device id (None = edge-access-<hostname>)")
    base_topic: str = Field("edge-access", min_length=1, description="topics are <base_topic>/<client_id>/…")
    discovery_prefix: str = Field("homeassistant", min_length=1, description="Home Assistant's discovery prefix")
    qos: int = Field(1, ge=1, le=2, description="QoS of events and states (1 or 2: the outbox needs the broker's ack)")
    publish_names: bool = Field(True, description="put recognised people's names in events; false = only 'known'")
    remote_unlock: bool = Field(False, description="accept UNLOCK on the command topic (with the code; never a retained one)")
    unlock_code_file: Path | None = Field(None, description="file holding the remote unlock code (needed for remote_unlock)")
    code_format: str = Field(r"^\d{4,8}$", description="regular expression the code must match (Home Assistant asks for it)")
    remote_unlock_interval_s: float = Field(10.0, ge=1.0, le=3600.0, description="at most one remote unlock attempt per this time")
    outbox_path: Path | None = Field(None, description="events wait here (on disk) while the broker is away (None = mqtt_outbox.sqlite beside the audit log)")
    outbox_max_events: int = Field(10000, ge=10, le=1_000_000, description="the outbox keeps this many; the oldest are dropped")
    keepalive_s: int = Field(30, ge=5, le=600, description="MQTT keepalive; a dead broker is noticed within 1.5 × this")
    reconnect_max_s: float = Field(30.0, ge=0.5, le=600.0, description="longest wait between reconnection attempts")
    diagnostics_interval_s: float = Field(60.0, ge=1.0, le=3600.0, description="how often fps, store size and outbox depth are published")

    @model_validator(mode="after")
    def _complete(self) -> "MqttConfig":
        if self.remote_unlock and self.unlock_code_file is None:
            raise ValueError("remote_unlock needs unlock_code_file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class ImagesConfig(Section):
    max_megapixels: float = Field(
        50.0, ge=0.1, le=170.0,
        description="photos given to enroll, verify, identify and eval larger than this are refused before decoding",
    )


class LivenessConfig(Section):
    mode: Literal["off", "parallax", "blink", "any", "all"] = Field(
        "parallax", description="off; parallax (the face shows depth) or blink (the eyes blink) before an unlock; any: "
        "either cue passes; all: both must (README, Liveness)"
    )
    window_s: float = Field(2.0, ge=0.2, le=30.0, description="evidence older than this is forgotten (a swapped-in photo cannot inherit it)")
    min_parallax: float = Field(0.006, ge=0.0, le=1.0, description="median off-homography residual / face width needed to pass")
    min_motion: float = Field(0.02, ge=0.0, le=1.0, description="a keyframe step counts when the face moved this much (fraction of its width)")
    max_motion: float = Field(0.55, ge=0.0, le=10.0, description="faster steps (fraction of the face width) are tracking jumps between faces, not evidence")
    keyframe_s: float = Field(0.2, ge=0.02, le=5.0, description="the planar fit is measured between points this far apart in time")
    min_pairs: int = Field(3, ge=1, le=100, description="moving keyframe steps needed in the window before pass or fail")
    max_points: int = Field(60, ge=16, le=500, description="corner points followed per face")
    work_px: int = Field(120, ge=40, le=400, description="faces are tracked at this width (larger faces are downscaled)")
    blink_window_s: float = Field(5.0, ge=0.5, le=60.0, description="blink cue: a blink counts this long; the open-eye baseline is the median openness over this time")
    blink_closed_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="blink cue: openness below this fraction of the baseline starts a blink")
    blink_open_ratio: float = Field(0.85, gt=0.0, le=1.0, description="blink cue: back above this fraction of the baseline ends it")
    blink_max_s: float = Field(0.5, ge=0.05, le=2.0, description="blink cue: eyes closed longer than this are not a blink")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML reads a bare `off` as false: `mode: off` means what it says."""
        return "off" if value is False else value


class FleetConfig(Section):
    dsn: str | None = Field(None, description="PostgreSQL connection string of the fleet (None = this door stands alone)")
    dsn_file: Path | None = Field(None, description="file holding the DSN (with its password), mode 0600; instead of dsn")
    door_id: str = Field("door", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                         description="this door's unique name in the fleet (letters, digits, . _ -)")
    schema_name: str = Field("edge_fleet", min_length=1, max_length=40, pattern=r"^[a-z_][a-z0-9_]*$",
                             description="PostgreSQL schema holding the fleet tables")
    sync_interval_s: float = Field(30.0, ge=0.5, le=3600.0, description="pull at least this often (NOTIFY wakes the door sooner)")
    connect_timeout_s: float = Field(5.0, ge=1.0, le=120.0, description="give up a connection attempt or a stalled link after this")
    state_path: Path = Field(Path("state/fleet.sqlite"), description="this door's replica state: versions, id map, audit cursor")

    @model_validator(mode="after")
    def _one_dsn_source(self) -> "FleetConfig":
        if self.dsn is not None and self.dsn_file is not None:
            raise ValueError("give either dsn or dsn_file, not both")
        return self


class UnknownConfig(Section):
    keep: bool = Field(False, description="keep the best chip + embedding of every unrecognised track for the admin page's inbox (biometric data: off by default)")
    path: Path | None = Field(None, description="folder of the unknown-face inbox, SQLite + chip JPEGs, mode 0600 (None: 'unknown' next to the audit log)")
    retention_days: float = Field(7.0, ge=0.01, le=365.0, description="kept unknown faces older than this are deleted from disk")
    group_l2: float = Field(0.34, gt=0.0, le=2.0, description="faces closer than this (average linkage) are grouped as one person; README, Unknown-face inbox")


class WebConfig(Section):
    host: str = Field("127.0.0.1", description="address the admin page listens on (127.0.0.1: this machine only; use an SSH tunnel or TLS)")
    port: int = Field(8080, ge=1, le=65535, description="TCP port of the admin page")
    admins_file: Path = Field(Path("state/admins.json"), description="admin names and argon2 password hashes (python -m edge admin set-password)")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS and mark the session cookie Secure")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    session_hours: float = Field(8.0, ge=0.1, le=720.0, description="a login lasts this long")
    login_attempts: int = Field(5, ge=1, le=100, description="failed logins allowed per client address in login_window_s before refusing")
    login_window_s: float = Field(300.0, ge=1.0, le=86400.0, description="window for login_attempts")
    max_upload_mb: float = Field(20.0, ge=0.1, le=500.0, description="largest upload accepted (all photos of one form together)")
    page_size: int = Field(25, ge=5, le=500, description="log rows per page")
    live_dir: Path | None = Field(None, description="where the door loop leaves its latest frame and status for the page (None: 'live' next to the audit log)")
    live_interval_s: float = Field(1.0, ge=0.0, le=60.0, description="the door loop writes its latest frame this often (0 = never: no live view)")

    @model_validator(mode="after")
    def _tls_pair(self) -> "WebConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class Config(Section):
    models_dir: Path | None = Field(None, description="model folder (default: $EDGE_MODELS_DIR or ./models)")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="face detector settings")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="embedding backend settings")
    match: MatchConfig = Field(default_factory=MatchConfig, description="matching thresholds")
    decide: DecideConfig = Field(default_factory=DecideConfig, description="voting, cooldown and rate limits")
    enroll: EnrollConfig = Field(default_factory=EnrollConfig, description="enrolment quality gates and button enrolment")
    store: StoreConfig = Field(default_factory=StoreConfig, description="where enrolments are kept")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="decision log")
    door: DoorConfig = Field(default_factory=DoorConfig, description="relay, LED, buzzer and button wiring")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="camera source")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT broker and Home Assistant discovery")
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="limits on photos read from files")
    liveness: LivenessConfig = Field(default_factory=LivenessConfig, description="presentation-attack detection (photos, screens)")
    fleet: FleetConfig = Field(default_factory=FleetConfig, description="PostgreSQL fleet sync (off unless a dsn is set)")
    unknown: UnknownConfig = Field(default_factory=UnknownConfig, description="unknown-face inbox (off by default)")
    web: WebConfig = Field(default_factory=WebConfig, description="admin web page (python -m edge web)")

    def resolved_models_dir(self) -> Path:
        from engines.fetch import default_models_dir

        return self.models_dir or default_models_dir()


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    return f"{where}: {first['msg']}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error instead of the last one winning
    silently (a second `match:` section would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: Path | str | None = None) -> Config:
    """Config from a YAML file (None → all defaults); any problem is one ConfigError line naming the key."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): "
                          "save it as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} is not UTF-8 text (it holds NUL bytes, as UTF-16 does): save it as UTF-8")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {first_line(getattr(err, 'problem', None) or err)}"
                          ) from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. a date like 2026-13-45 that YAML cannot hold
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"config file {path}: {_describe(err)}") from None
