"""Door decisions: k-of-n voting per track, cooldown, unknown rate limit, IoU tracking (pure logic)."""
from __future__ import annotations

from edge.config import DecideConfig
from edge.decide import Decider, iou
from edge.types import Match

BOX = (100.0, 100.0, 200.0, 220.0)
OTHER_BOX = (400.0, 100.0, 500.0, 220.0)


def known(name: str, distance: float = 0.3) -> Match:
    return Match(person=name, distance_l2=distance, margin_l2=0.2, candidate=name)


def unknown(distance: float = 0.9) -> Match:
    return Match(person=None, distance_l2=distance, margin_l2=0.0, candidate="someone")


def feed(decider, sequence, box=BOX, start_frame=0, fps=10.0):
    events = []
    for i, match in enumerate(sequence):
        frame = start_frame + i
        detections = [] if match is None else [(box, match)]
        events += decider.update(detections, frame, frame / fps)
    return events


def test_iou():
    assert iou(BOX, BOX) == 1.0
    assert iou(BOX, OTHER_BOX) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 15, 10)) - 50 / 150) < 1e-9


def test_single_lucky_frame_never_unlocks():
    decider = Decider(DecideConfig(votes_needed=3, window_frames=5))
    events = feed(decider, [known("ann"), unknown(), unknown(), unknown(), unknown()])
    assert [e.event for e in events] == ["unknown"]


def test_k_of_n_unlocks_once_per_track():
    decider = Decider(DecideConfig(votes_needed=3, window_frames=5))
    events = feed(decider, [known("ann"), unknown(), known("ann"), known("ann")] + [known("ann")] * 20)
    assert [(e.event, e.person, e.frame, e.votes) for e in events] == [("unlock", "ann", 3, 3)]


def test_votes_outside_the_window_do_not_count():
    decider = Decider(DecideConfig(votes_needed=3, window_frames=3))
    events = feed(decider, [known("ann"), unknown(), known("ann"), unknown(), known("ann")])
    assert [e.event for e in events if e.event == "unlock"] == []


def test_cooldown_blocks_a_second_unlock_for_the_same_person():
    decider = Decider(DecideConfig(votes_needed=2, window_frames=3, cooldown_s=10.0, max_missed_frames=1))
    first = feed(decider, [known("ann")] * 3, fps=10.0)
    # The face leaves (track expires) and returns 2 s later: still in cooldown.
    again = feed(decider, [None, None, None] + [known("ann")] * 5, start_frame=3)
    # 20 s later: a new unlock is allowed.
    later = feed(decider, [None, None] + [known("ann")] * 3, start_frame=200)
    assert [e.event for e in first] == ["unlock"]
    assert again == []
    assert [e.event for e in later] == ["unlock"]


def test_two_people_tracked_separately():
    decider = Decider(DecideConfig(votes_needed=2, window_frames=3))
    events = []
    for frame in range(3):
        events += decider.update([(BOX, known("ann")), (OTHER_BOX, known("bob"))], frame, frame * 0.1)
    assert sorted((e.person, e.track) for e in events) == [("ann", 1), ("bob", 2)]


def test_moving_face_keeps_its_track():
    decider = Decider(DecideConfig(votes_needed=3, window_frames=5))
    events = []
    for frame in range(4):
        shift = frame * 10.0
        box = (BOX[0] + shift, BOX[1], BOX[2] + shift, BOX[3])
        events += decider.update([(box, known("ann"))], frame, frame * 0.1)
    assert [(e.event, e.track) for e in events] == [("unlock", 1)]


def test_unknown_events_are_rate_limited():
    decider = Decider(DecideConfig(votes_needed=2, window_frames=3, unknown_interval_s=5.0, max_missed_frames=0))
    events = feed(decider, [unknown()] * 5)  # one track: reported once
    events += feed(decider, [None] + [unknown()] * 5, start_frame=10)  # new track 1 s later: rate-limited
    events += feed(decider, [None] + [unknown()] * 5, start_frame=100)  # 10 s later: reported again
    assert [(e.event, e.frame) for e in events] == [("unknown", 1), ("unknown", 102)]


def test_no_detections_no_events():
    assert Decider().update([], 0, 0.0) == []
