"""The doorway loop: camera → pipeline → match → decide → door, with button enrolment, audit log and watchdog.

`Kiosk.step(frame)` processes one frame and returns its events (tests drive it directly); `Kiosk.run(source)`
is the loop. The door is locked at start, after every pulse, and on any exit: normal end, SIGTERM/SIGINT or an
exception anywhere in the loop.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, OrderedDict
from datetime import datetime

import numpy as np

from edge.config import Config
from edge.decide import Decider, Decision
from edge.errors import StoreError, first_line
from edge.fuse import face_weight
from edge.liveness import Liveness
from edge.quality import quality_problem, quality_score
from edge.sdnotify import Notifier
from edge.types import EmbeddedFace, Frame, Match

log = logging.getLogger("edge.kiosk")
STORE_CHECK_S = 1.0
RECENT_FRAMES = 256
# Button enrolment keeps frames at least this far from each other (consecutive video frames are near-duplicates).
DISTINCT_FRAME_L2 = 0.05
AUTO_UPDATE_SOURCE = "auto-update"
# A settled-unknown track is embedded again as soon as its face is this much wider than at its latest embedding.
REFRESH_WIDER = 1.1
# Frame times are sums of floats: 8/25 - 3/25 comes out a hair under 0.2 s. Intervals are compared with this slack.
FRAME_TIME_EPS_S = 1e-6


class StopRequest:
    """SIGTERM and SIGINT ask the door loop to stop. The handler only records the first signal and never raises, so
    however many signals come, in whatever order and at whatever moment, none can interrupt driving the door locked
    and releasing it (a raised exception could land inside `door.lock()` or skip `door.close()`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def install(self) -> StopRequest:
        """Handle SIGTERM/SIGINT from now on (main thread only); `restore` puts the previous handlers back."""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def ignore(self) -> None:
        """Ignore SIGTERM/SIGINT from now on, for a process on its way out: while Python shuts down it puts its own
        handlers back to the defaults, and a late signal would then kill it mid-exit with a traceback or status -15."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, _frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name


class Kiosk:
    def __init__(
        self, *, config: Config, pipeline, store, door, audit=None, emit=None, clock=time.monotonic,
        press_button_at: set[int] = frozenset(), unknown=None, live=None,
    ) -> None:
        self.config, self.pipeline, self.store, self.door, self.audit = config, pipeline, store, door, audit
        self.emit = emit or (lambda event: None)
        self.clock = clock
        self.decider = Decider(config.decide)
        self.liveness = (Liveness(config.liveness, models_dir=config.resolved_models_dir())
                         if config.liveness.mode != "off" else None)
        self._button = threading.Event()
        self._capture_left = 0
        self._candidates: list[EmbeddedFace] = []
        self._admin_seen_s = float("-inf")
        self._last_store_check = float("-inf")
        self._scanned_s = float("-inf")  # frame time of the latest whole-frame scan
        self._frame_wall: OrderedDict[int, float] = OrderedDict()
        self.latencies_ms: list[float] = []
        self.press_button_at = press_button_at
        self.counts: Counter[str] = Counter()
        self.last_faces: list[EmbeddedFace] = []
        self.last_matches: list = []
        self.unknown, self.live = unknown, live  # edge.unknown.UnknownCollector, edge.live.LiveWriter (surfaces' feeds)

    def press_button(self) -> None:
        """Called from gpiozero's Button thread (or a test): ask to enrol the next good face."""
        self._button.set()

    def _event(self, name: str, frame: Frame, **fields) -> dict:
        event = {"event": name, "person": None, "frame": frame.index, "t_s": round(frame.t_s, 3), "distance_l2": None}
        event.update(fields)
        self.counts[name] += 1
        log.info("event=%s %s", name, " ".join(f"{k}={v}" for k, v in event.items() if k != "event"))
        self.emit(event)
        return event

    def _reload_store(self) -> None:
        now = self.clock()
        if now - self._last_store_check >= STORE_CHECK_S:
            self._last_store_check = now
            if self.store.reload_if_changed():
                log.info("event=store_reloaded people=%d", len(self.store))
                self._unsettle()

    def _unsettle(self) -> None:
        """The store changed (someone enrolled, renamed, synced): faces voted unknown so far may be known now, so
        their tracks are embedded every frame again until their window says unknown again."""
        for track in self.decider.tracks.values():
            if track.settled_unknown:
                track.votes.clear()

    def step(self, frame: Frame) -> list[dict]:
        """Process one frame; returns the events it caused (unlock, unknown, liveness_fail, enrolled, enroll_refused)."""
        if frame.index in self.press_button_at:
            self.press_button()
        self._frame_wall[frame.index] = self.clock()
        while len(self._frame_wall) > RECENT_FRAMES:
            self._frame_wall.popitem(last=False)
        self._reload_store()
        capturing = self._button.is_set() or self._capture_left > 0  # button enrolment looks at every face
        found = self.pipeline.detect(frame.image, near=[] if capturing else self._followed(frame))
        if self.pipeline.detector.last_whole:
            self._scanned_s = frame.t_s
        tracks = self.decider.track([f.box for f in found], frame.index)
        chosen = [i for i, (track, face) in enumerate(zip(tracks, found)) if capturing or self._needs_embedding(track, face)]
        embedded = dict(zip(chosen, self.pipeline.embed_faces(frame.image, [found[i] for i in chosen])))
        faces = [embedded.get(i) or EmbeddedFace(face=face, chip=None, embedding=None) for i, face in enumerate(found)]
        matches = self._fused_matches(tracks, embedded, frame.index)
        shown = [match if i in embedded else track.last_match for i, (track, match) in enumerate(zip(tracks, matches))]
        self.last_faces, self.last_matches = faces, shown
        if any(m is not None and m.person in self.config.enroll.admins for m in shown):
            self._admin_seen_s = frame.t_s
        events = self._enrolment(frame, faces)
        live = None if self.liveness is None else (lambda track_id, i: self._liveness(tracks[i], frame, faces[i].face))
        for decision in self.decider.decide(tracks, matches, frame.index, frame.t_s, liveness=live):
            events.append(self._act(decision, frame, faces))
        if self.liveness is not None:
            self.liveness.keep(self.decider.tracks)
        if self.unknown is not None:
            self.unknown.observe(frame, faces, matches, self.decider.tracks)
        if self.live is not None:
            self.live.update(frame, faces, shown, door_unlocked=self.door.is_unlocked, counts=self.counts,
                             fps=self.recent_fps())
        return events

    def _followed(self, frame: Frame) -> list:
        """The boxes of the faces followed from the previous frame, to be looked for only around where they were
        (FaceDetector.detect_near); none, so the whole frame is scanned, when `detector.scan_every_s` has passed since
        the latest whole scan (or time went backwards: another stream)."""
        since = frame.t_s - self._scanned_s
        if not 0 <= since < self.config.detector.scan_every_s - FRAME_TIME_EPS_S:
            return []
        return list(self.pipeline.detector.following)

    def _needs_embedding(self, track, face) -> bool:
        """Whether this frame's face of the track must be embedded. An unlocked track is decided (the same track
        never opens the door twice); one voted unknown for a whole window is refreshed every
        `decide.unknown_refresh_frames` frames, or as soon as its face is 10 % wider than at its latest embedding
        (someone enrolled who was too far away to be recognised keeps being looked at as they come closer)."""
        if track.unlocked:
            return False
        if not track.settled_unknown:
            return True
        return (track.last_frame - track.embedded_frame >= self.config.decide.unknown_refresh_frames
                or face.width_px >= REFRESH_WIDER * track.embedded_width_px)

    def _liveness(self, track, frame: Frame, face):
        """The track's liveness verdict with this frame; an unlocked track keeps its verdict (nothing is left to
        decide on it). The blink cue needs the face's landmarks every frame: predicted here for a face not embedded
        this frame (a track settled as unknown is embedded only now and then)."""
        if track.unlocked:
            return track.liveness
        if face.landmarks is None and self.liveness.blink is not None:
            face = self.pipeline.add_landmarks(frame.image, [face])[0]
        return self.liveness.observe(track.id, frame, face)

    def _fused_matches(self, tracks: list, embedded: dict[int, EmbeddedFace], frame_index: int) -> list[Match | None]:
        """Each embedded face joins its track's fused embedding (weighted by its quality); the 1:N match is taken on
        that. None, no vote, for a face not embedded this frame and for a track none of whose frames counts yet
        (all side-on)."""
        fused: dict[int, np.ndarray] = {}
        for i, face in embedded.items():
            track = tracks[i]
            track.template.add(face.embedding, face_weight(face))
            track.embedded_frame, track.embedded_width_px = frame_index, face.face.width_px
            vector = track.template.vector()
            if vector is not None:
                fused[i] = vector
        answers = self.store.match(np.stack(list(fused.values())), threshold_l2=self.config.match.threshold_l2,
                                   margin_l2=self.config.match.margin_l2) if fused else []
        matches: list[Match | None] = [None] * len(tracks)
        for i, match in zip(fused, answers):
            matches[i] = tracks[i].last_match = match
        return matches

    def _act(self, decision: Decision, frame: Frame, faces: list[EmbeddedFace]) -> dict:
        door_action = "none"
        latency = {}
        if decision.event == "unlock":
            self.door.unlock()
            door_action = "pulse"
            first_wall = self._frame_wall.get(decision.first_frame)
            if first_wall is not None:
                latency_ms = (self.clock() - first_wall) * 1e3
                self.latencies_ms.append(latency_ms)
                latency = {"latency_ms": round(latency_ms, 1), "frames_to_decide": decision.frame - decision.first_frame + 1}
        face, match = next(((f, m) for f, m in zip(faces, self.last_matches) if f.face.box == decision.box), (None, None))
        person_id = match.extra.get("candidate_id") if match is not None and decision.person is not None else None
        audit = {}
        if self.audit is not None:
            try:
                audit["audit_id"] = self.audit.record(decision, door_action=door_action,
                                                      snapshot=None if face is None else face.chip, person_id=person_id)
            except Exception as err:  # the log is a record of the door, never a reason to stop it
                log.error("event=audit_write_failed decision=%s frame=%d error=%s: %s", decision.event, frame.index,
                          type(err).__name__, first_line(err))
        event = self._event(
            decision.event, frame, person=decision.person, person_id=person_id,
            distance_l2=round(decision.distance_l2, 4), margin_l2=round(decision.margin_l2, 4), track=decision.track,
            votes=decision.votes, door=door_action, liveness=decision.liveness.state,
            liveness_evidence=decision.liveness.evidence(), **latency, **audit,
        )
        if decision.event == "unlock" and self.config.enroll.auto_update:
            self._auto_update(decision, frame)
        return event

    def _enrolment(self, frame: Frame, faces: list[EmbeddedFace]) -> list[dict]:
        """Button enrolment: after a press (by an admin, or anyone while no admin is configured) watch
        `capture_frames` frames and enrol the best face that passes the quality gates."""
        cfg = self.config.enroll
        if self._button.is_set():
            self._button.clear()
            if cfg.admins and frame.t_s - self._admin_seen_s > cfg.admin_window_s:
                return [self._event("enroll_refused", frame, reason="no admin recognised in the last "
                                    f"{cfg.admin_window_s:g} s")]
            self._capture_left, self._candidates = cfg.capture_frames, []
            self._event("enroll_started", frame, frames=cfg.capture_frames)
        if self._capture_left <= 0:
            return []
        self._capture_left -= 1
        if faces:
            largest = faces[0]
            if quality_problem(largest, cfg) is None:
                self._candidates.append((largest, frame.index))
        if self._capture_left > 0:
            return []
        if not self._candidates:
            return [self._event("enroll_refused", frame, reason="no face good enough (size, sharpness, frontal)")]
        return [self._enrol(best_distinct(self._candidates, cfg.button_rows), frame)]

    def _enrol(self, chosen: list[tuple[EmbeddedFace, int]], frame: Frame) -> dict:
        """Enrol a new person from the chosen (face, frame index) pairs, best first, one row each."""
        other, distance = self.store.nearest(chosen[0][0].embedding)
        if other is not None and distance < self.config.match.threshold_l2:
            return self._event("enroll_refused", frame, reason=f"already enrolled as {other.name}", distance_l2=round(distance, 4))
        base = datetime.now().strftime("person-%Y%m%d-%H%M%S")
        try:
            with self.store.edit():
                taken = {p.name for p in self.store.persons}
                name = next(n for n in (base, *(f"{base}-{i}" for i in range(2, 100))) if n not in taken)
                self.store.add_person(name, np.stack([face.embedding for face, _ in chosen]),
                                      note=f"button enrolment, frame {frame.index}",
                                      sources=[f"button, frame {index}" for _, index in chosen])
        except StoreError as err:  # the door loop goes on; the admin sees why and can press again
            return self._event("enroll_refused", frame, reason=str(err))
        self.door.confirm()
        self._unsettle()
        return self._event("enrolled", frame, person=name, rows=len(chosen))

    def _auto_update(self, decision: Decision, frame: Frame) -> dict | None:
        """enroll.auto_update: after a confident, unambiguous unlock, add the track's fused embedding to the person
        when it is far enough from each of their rows (a new condition: light, glasses, beard), at most
        `auto_update_max_rows` such rows and never pushing out an enrolled one. Logged; `people forget-row` undoes it."""
        cfg = self.config.enroll
        track = self.decider.tracks.get(decision.track)
        fused = track.template.vector() if track is not None else None
        if (fused is None or decision.distance_l2 >= cfg.auto_update_max_l2
                or decision.margin_l2 < cfg.auto_update_min_margin_l2):
            return None
        try:
            with self.store.edit():
                rows = self.store.rows(decision.person)
                nearest_l2 = float(np.sqrt(np.maximum(2.0 - 2.0 * (self.store.embeddings(decision.person) @ fused), 0.0)).min())
                automatic = sum(r.source.startswith(AUTO_UPDATE_SOURCE) for r in rows)
                if (nearest_l2 < cfg.auto_update_min_l2 or automatic >= cfg.auto_update_max_rows
                        or len(rows) >= cfg.max_embeddings_per_person):
                    return None
                self.store.add_embeddings(decision.person, fused, sources=f"{AUTO_UPDATE_SOURCE}, track {decision.track}")
        except Exception as err:  # an update is a convenience: a failure is logged, the door loop goes on
            log.error("event=template_update_failed person=%s error=%s: %s", decision.person, type(err).__name__,
                      first_line(err))
            return None
        return self._event("template_updated", frame, person=decision.person, row=len(rows),
                           distance_l2=round(decision.distance_l2, 4), new_condition_l2=round(nearest_l2, 4))

    def recent_fps(self) -> float:
        """Frames per second over the last RECENT_FRAMES frames (0.0 before the second frame)."""
        if len(self._frame_wall) < 2:
            return 0.0
        walls = list(self._frame_wall.values())
        return (len(walls) - 1) / max(walls[-1] - walls[0], 1e-9)

    def summary(self, frames: int, elapsed_s: float) -> dict:
        """Loop statistics for the end of a run: fps, events, face-first-visible → relay-on latency."""
        result = {"frames": frames, "fps": round(frames / elapsed_s, 1) if elapsed_s > 0 else 0.0}
        result.update({f"{name}_events": n for name, n in sorted(self.counts.items())})
        if self.latencies_ms:
            result["latency_ms_median"] = round(float(np.median(self.latencies_ms)), 1)
            result["latency_ms_max"] = round(max(self.latencies_ms), 1)
        return result

    def run(self, source, *, notifier: Notifier | None = None, max_frames: int | None = None,
            stop: StopRequest | None = None) -> int:
        """Loop until the source ends (file) or a signal arrives; always leaves the door locked. Returns frames processed.

        Signals are watched through `stop` (the CLI installs one before loading models and keeps it to the end of the
        process); without one, the loop installs its own for SIGTERM/SIGINT and restores the old handlers on exit.
        """
        notifier = notifier or Notifier()
        own_stop = stop is None
        stop = StopRequest().install() if stop is None else stop
        processed = 0
        lost = False
        last = Frame(image=None, index=-1, t_s=0.0)  # the latest frame, to place camera_lost in time
        try:
            self.door.open()
            notifier.ready()
            while not stop.requested and (max_frames is None or processed < max_frames):
                notifier.watchdog()
                frame = source.read()
                if stop.requested:
                    break
                if frame is None:
                    status = getattr(source, "status", "ended")
                    if status == "ended":
                        break
                    if status == "lost" and not lost:
                        lost = True
                        self.door.lock()
                        self._event("camera_lost", Frame(image=None, index=last.index, t_s=last.t_s))
                    continue
                if lost:
                    lost = False
                    self._event("camera_ok", frame)
                self.step(frame)
                processed += 1
                last = frame
            if stop.requested:
                log.info("event=stopping reason=signal signal=%s", stop.reason)
        finally:
            self.door.lock()
            self.door.close()
            notifier.stopping()
            if own_stop:
                stop.restore()
            if self.unknown is not None:
                self.unknown.flush()
        return processed


def best_distinct(candidates: list[tuple[EmbeddedFace, int]], count: int) -> list[tuple[EmbeddedFace, int]]:
    """Up to `count` candidates, best quality first, each at least DISTINCT_FRAME_L2 from those already taken."""
    chosen: list[tuple[EmbeddedFace, int]] = []
    for face, index in sorted(candidates, key=lambda c: quality_score(c[0]), reverse=True):
        if all(np.linalg.norm(face.embedding - other.embedding) >= DISTINCT_FRAME_L2 for other, _ in chosen):
            chosen.append((face, index))
        if len(chosen) == count:
            break
    return chosen
