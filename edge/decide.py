"""Turn per-frame matches into door decisions: track faces by IoU, vote k-of-n, cooldown, rate-limit unknowns.

Pure logic, no I/O: `Decider.update(detections, frame_index, t_s)` returns the events to act on. The door loop
splits it in two so that the match in between is taken on each track's fused embedding: `track(boxes, frame)`,
then `decide(tracks, matches, frame, t_s)` (a match of None: no frame of the track counts yet, no vote).
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.config import DecideConfig
from edge.fuse import TrackTemplate
from edge.liveness import FAIL, LIVENESS_OFF, PASS, LivenessVerdict
from edge.types import Box, Match, iou


@dataclass(frozen=True)
class Decision:
    """An event for the door and the log: `unlock` (person named) or `unknown` (someone not recognised)."""

    event: str
    person: str | None
    track: int
    frame: int
    t_s: float
    distance_l2: float
    margin_l2: float
    votes: int
    first_frame: int
    box: Box
    liveness: LivenessVerdict = LIVENESS_OFF


@dataclass
class Track:
    id: int
    box: Box
    last_frame: int
    first_frame: int
    votes: deque = field(default_factory=deque)
    unlocked: set = field(default_factory=set)
    reported_unknown: bool = False
    template: TrackTemplate | None = None
    reported_liveness_fail: bool = False
    liveness: LivenessVerdict = LIVENESS_OFF
    last_match: Match | None = None  # the latest match taken on the track (shown while frames are not embedded)
    embedded_frame: int = -1  # the latest frame whose face was embedded, and that face's width
    embedded_width_px: float = 0.0

    @property
    def settled_unknown(self) -> bool:
        """Every vote in a full window says unknown: nobody enrolled is close to this face."""
        return len(self.votes) == self.votes.maxlen and all(vote is None for vote in self.votes)


class Decider:
    """Holds the tracks between frames; one instance per camera."""

    def __init__(self, settings: DecideConfig | None = None) -> None:
        self.settings = settings or DecideConfig()
        self.tracks: dict[int, Track] = {}
        self._next_id = 1
        self._last_unlock_s: dict[str, float] = {}
        self._last_unknown_s = float("-inf")

    def _assign(self, boxes: list[Box], frame: int) -> list[Track]:
        """Greedy IoU association: best-overlapping pairs first; leftovers start new tracks."""
        pairs = sorted(
            ((iou(box, track.box), i, tid) for i, box in enumerate(boxes) for tid, track in self.tracks.items()),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        used: set[int] = set()
        for overlap, i, tid in pairs:
            if overlap < self.settings.iou_min:
                break
            if i in assigned or tid in used:
                continue
            assigned[i] = self.tracks[tid]
            used.add(tid)
        for i, box in enumerate(boxes):
            if i not in assigned:
                track = Track(
                    id=self._next_id, box=box, last_frame=frame, first_frame=frame,
                    votes=deque(maxlen=self.settings.window_frames),
                    template=TrackTemplate(self.settings.fuse_frames),
                )
                self._next_id += 1
                self.tracks[track.id] = track
                assigned[i] = track
            assigned[i].box = box
            assigned[i].last_frame = frame
        return [assigned[i] for i in range(len(boxes))]

    def _expire(self, frame: int) -> None:
        stale = [tid for tid, t in self.tracks.items() if frame - t.last_frame - 1 > self.settings.max_missed_frames]
        for tid in stale:
            del self.tracks[tid]

    def update(
        self, detections: list[tuple[Box, Match]], frame: int, t_s: float, *,
        liveness: Callable[[int, int], LivenessVerdict] | None = None,
    ) -> list[Decision]:
        """Feed one frame's faces and their matches; returns the events this frame causes (see decide)."""
        tracks = self.track([box for box, _ in detections], frame)
        return self.decide(tracks, [match for _, match in detections], frame, t_s, liveness=liveness)

    def track(self, boxes: list[Box], frame: int) -> list[Track]:
        """The track of each box (continued by overlap, else new); tracks unseen for too long end first."""
        self._expire(frame)
        return self._assign(boxes, frame)

    def decide(
        self, tracks: list[Track], matches: list[Match | None], frame: int, t_s: float, *,
        liveness: Callable[[int, int], LivenessVerdict] | None = None,
    ) -> list[Decision]:
        """Each track's match this frame is its vote; returns the unlock/unknown/liveness_fail events this frame
        causes. `liveness(track_id, detection_index)`, when given, is asked every frame for every face (a track
        without a vote yet too): an unlock then also needs the track's verdict to be `pass`."""
        decisions = []
        for index, (track, match) in enumerate(zip(tracks, matches)):
            if liveness is not None:
                track.liveness = liveness(track.id, index)
            if match is None:
                continue
            track.votes.append(match.person)
            decision = self._decide(track, match, frame, t_s)
            if decision:
                decisions.append(decision)
        return decisions

    def _decide(self, track: Track, match: Match, frame: int, t_s: float) -> Decision | None:
        s = self.settings
        counts = Counter(track.votes)
        person, votes = max(((p, n) for p, n in counts.items() if p is not None), key=lambda pn: pn[1], default=(None, 0))
        if person is not None and votes >= s.votes_needed and match.person == person:
            if person in track.unlocked or t_s - self._last_unlock_s.get(person, float("-inf")) < s.cooldown_s:
                return None
            if track.liveness.state not in (PASS, LIVENESS_OFF.state):
                return self._liveness_fail(track, person, match, frame, t_s, votes)
            track.unlocked.add(person)
            self._last_unlock_s[person] = t_s
            return Decision(
                "unlock", person, track.id, frame, t_s, match.distance_l2, match.margin_l2, votes, track.first_frame,
                track.box, track.liveness,
            )
        unknown_votes = counts.get(None, 0)
        if unknown_votes >= s.votes_needed and match.person is None and not track.reported_unknown:
            if t_s - self._last_unknown_s < s.unknown_interval_s:
                return None
            track.reported_unknown = True
            self._last_unknown_s = t_s
            return Decision(
                "unknown", None, track.id, frame, t_s, match.distance_l2, match.margin_l2, unknown_votes, track.first_frame,
                track.box, track.liveness,
            )
        return None

    def _liveness_fail(self, track: Track, person: str, match: Match, frame: int, t_s: float, votes: int) -> Decision | None:
        """A recognised face without liveness: the door stays shut; said once per track, once the verdict is
        `fail` (a pending track may still pass: it is waited for)."""
        if track.reported_liveness_fail or track.liveness.state != FAIL:
            return None
        track.reported_liveness_fail = True
        return Decision(
            "liveness_fail", person, track.id, frame, t_s, match.distance_l2, match.margin_l2, votes, track.first_frame,
            track.box, track.liveness,
        )
