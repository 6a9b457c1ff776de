"""The decision rules at their boundaries: cooldown and unknown interval ("within this time"), track continuation
(IoU, missed frames), one unlock per track, and the current frame having the last word."""
from __future__ import annotations

import math

import pytest
from test_decide import BOX, OTHER_BOX, known, unknown

from edge.config import DecideConfig
from edge.decide import Decider, Decision, iou

SHIFTED = (BOX[0] + 50.0, BOX[1], BOX[2] + 50.0, BOX[3])  # half of BOX's width over: IoU exactly 1/3 with BOX


def settings(**values) -> DecideConfig:
    return DecideConfig(**{"votes_needed": 2, "window_frames": 3, "max_missed_frames": 0, **values})


def visits(decider: Decider, match, times: list[tuple[float, float]]) -> list[float]:
    """The face comes for two frames at each pair of times, with frames missing in between (a new track each time);
    returns the times of the decisions."""
    decided = []
    for visit, pair in enumerate(times):
        for step, t_s in enumerate(pair):
            decided += [d.t_s for d in decider.update([(BOX, match)], visit * 10 + step, t_s)]
    return decided


@pytest.mark.parametrize("cooldown_s", [10.0, 0.5])
def test_cooldown_ends_exactly_cooldown_s_after_the_unlock(cooldown_s):
    reopen = 1.0 + cooldown_s
    early = visits(Decider(settings(cooldown_s=cooldown_s)), known("ann"), [(0.9, 1.0), (0.9, math.nextafter(reopen, 0))])
    assert early == [1.0]
    assert visits(Decider(settings(cooldown_s=cooldown_s)), known("ann"), [(0.9, 1.0), (0.9, reopen)]) == [1.0, reopen]


def test_unknown_interval_ends_exactly_unknown_interval_s_after_the_report():
    decider = Decider(settings(unknown_interval_s=5.0))
    assert visits(decider, unknown(), [(0.0, 1.0), (5.5, math.nextafter(6.0, 0)), (5.9, 6.0)]) == [1.0, 6.0]


def test_a_face_overlapping_exactly_iou_min_continues_its_track():
    overlap = 50.0 / 150.0
    same = Decider(settings(iou_min=overlap))
    assert same.update([(BOX, known("ann"))], 0, 0.0) == []
    [decision] = same.update([(SHIFTED, known("ann"))], 1, 0.1)
    assert (decision.track, decision.first_frame, decision.box, decision.votes) == (1, 0, SHIFTED, 2)
    other = Decider(settings(iou_min=math.nextafter(overlap, math.inf)))
    assert other.update([(BOX, known("ann"))], 0, 0.0) == []
    assert other.update([(SHIFTED, known("ann"))], 1, 0.1) == [], "a new track starts with one vote"
    assert sorted(other.tracks) == [1, 2]


@pytest.mark.parametrize("max_missed", [0, 2])
def test_a_track_survives_exactly_max_missed_frames_without_its_face(max_missed):
    kept = Decider(settings(max_missed_frames=max_missed))
    kept.update([(BOX, known("ann"))], 0, 0.0)
    [decision] = kept.update([(BOX, known("ann"))], max_missed + 1, 1.0)
    assert (decision.track, decision.first_frame, decision.votes) == (1, 0, 2)
    lost = Decider(settings(max_missed_frames=max_missed))
    lost.update([(BOX, known("ann"))], 0, 0.0)
    assert lost.update([(BOX, known("ann"))], max_missed + 2, 1.0) == []
    assert list(lost.tracks) == [2], "the old track is gone, a new one started"


def test_a_track_unlocks_once_even_with_no_cooldown():
    decider = Decider(settings(cooldown_s=0.0))
    events = [d for frame in range(20) for d in decider.update([(BOX, known("ann"))], frame, frame * 0.1)]
    assert [(d.event, d.frame) for d in events] == [("unlock", 1)]


def test_the_current_frame_must_agree_with_the_vote():
    """ann holds the vote on track 2 while the cooldown of her unlock on track 1 runs; once it is over, a frame that
    does not recognise her opens nothing, and the next one that does opens the door."""
    decider = Decider(settings(votes_needed=2, window_frames=5, cooldown_s=1.0))
    events = []
    for frame, (t_s, match) in enumerate([(0.0, known("ann")), (0.1, known("ann")), (0.5, known("ann")),
                                          (0.6, known("ann")), (1.2, unknown()), (1.3, known("ann"))]):
        box = BOX if frame < 2 else OTHER_BOX
        events += decider.update([(box, match)], frame, t_s)
    assert [(d.event, d.track, d.frame) for d in events] == [("unlock", 1, 1), ("unlock", 2, 5)]


def test_an_unknown_needs_an_unrecognised_current_frame():
    """Like the unlock: the unknown votes pile up on track 2 while the interval runs; once it is over, a frame that
    recognises someone reports nothing, the next unrecognised one does."""
    decider = Decider(settings(votes_needed=2, window_frames=5, unknown_interval_s=1.0))
    events = []
    for frame, (t_s, match) in enumerate([(0.0, unknown()), (0.1, unknown()), (0.5, unknown()), (0.6, unknown()),
                                          (1.2, known("bob")), (1.3, unknown())]):
        box = BOX if frame < 2 else OTHER_BOX
        events += decider.update([(box, match)], frame, t_s)
    assert [(d.event, d.track, d.frame, d.votes) for d in events] == [("unknown", 1, 1, 2), ("unknown", 2, 5, 3)]


def test_a_decision_carries_the_current_match_and_the_track():
    decider = Decider(settings(votes_needed=2, window_frames=3))
    decider.update([(BOX, known("ann", 0.31))], 4, 0.4)
    [decision] = decider.update([(SHIFTED, known("ann", 0.29))], 5, 0.5)
    assert decision == Decision("unlock", "ann", 1, 5, 0.5, 0.29, 0.2, 2, 4, SHIFTED)


def test_the_most_voted_person_wins_the_track():
    decider = Decider(settings(votes_needed=2, window_frames=4))
    sequence = [known("ann"), known("bob"), known("ann"), known("bob")]  # most votes, not the last name, wins
    events = [d for frame, match in enumerate(sequence) for d in decider.update([(BOX, match)], frame, frame * 0.1)]
    assert [(d.person, d.frame) for d in events] == [("ann", 2)]


def test_a_track_reports_its_unknown_once_even_with_no_interval():
    decider = Decider(settings(unknown_interval_s=0.0))
    events = [d for frame in range(10) for d in decider.update([(BOX, unknown())], frame, frame * 0.1)]
    assert events == [Decision("unknown", None, 1, 1, 0.1, 0.9, 0.0, 2, 0, BOX)]


def test_iou_of_boxes_apart_vertically_or_without_area():
    assert iou((0, 0, 10, 10), (0, 20, 10, 30)) == 0.0
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0, "no area, no overlap (and no division by zero)"
    assert iou((0, 0, 0.5, 1), (0, 0, 0.5, 1)) == 1.0


def frame_tracks(decider: Decider, boxes: list, frame: int) -> dict[int, tuple]:
    decider.update([(box, unknown()) for box in boxes], frame, frame * 0.1)
    return {tid: track.box for tid, track in decider.tracks.items()}


def test_each_face_continues_at_most_one_track_and_each_track_at_most_one_face():
    left, right = (0.0, 0.0, 10.0, 10.0), (4.0, 0.0, 14.0, 10.0)
    moved_right = (9.0, 0.0, 19.0, 10.0)  # IoU 1/3 with `right`, less than `left` has with it
    decider = Decider(settings(iou_min=0.3))
    frame_tracks(decider, [left, right], 0)
    assert frame_tracks(decider, [left, moved_right], 1) == {1: left, 2: moved_right}
    nudged = (1.0, 0.0, 11.0, 10.0)  # overlaps `left` as much as `left` itself nearly does
    single = Decider(settings(iou_min=0.3))
    frame_tracks(single, [left], 0)
    assert frame_tracks(single, [left, nudged], 1) == {1: left, 2: nudged}, "the second face starts its own track"


def test_a_face_without_a_match_this_frame_does_not_hold_up_the_others():
    """A decided track is not embedded again, so it has no match; the faces after it still vote."""
    decider = Decider(settings())
    decided = [d for i in range(3) for d in decider.update([(BOX, None), (OTHER_BOX, known("ann"))], i, i / 10)]
    assert [(d.event, d.person, d.box) for d in decided] == [("unlock", "ann", OTHER_BOX)]
