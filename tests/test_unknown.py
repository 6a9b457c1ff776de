"""Unknown-face inbox (grouping, storage, retention, the kiosk's collector), the live feed and the web page's accounts."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

from edge.config import EnrollConfig
from edge.errors import InputError
from edge.live import LiveWriter, read_status
from edge.types import EmbeddedFace, Face, Frame
from edge.unknown import UnknownCollector, UnknownInbox, group_faces
from edge.web.auth import LoginLimiter, Sessions, read_admins, set_password, verify_password

FRONTAL = np.array([[70, 50], [60, 50], [30, 50], [40, 50], [50, 70]], np.float32)


def people_vectors(rng, people: int, each: int, spread_l2: float) -> tuple[np.ndarray, np.ndarray]:
    """`each` unit vectors around each of `people` random directions, about `spread_l2` from their centre."""
    centres = rng.standard_normal((people, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(people), each)
    vectors = centres[labels] + rng.standard_normal((len(labels), 128)) * spread_l2 / np.sqrt(128)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_grouping_finds_the_people():
    vectors, labels = people_vectors(np.random.default_rng(1), people=6, each=5, spread_l2=0.15)
    assert same_partition(group_faces(vectors, 0.34), labels)
    assert len(set(group_faces(vectors, 2.0).tolist())) == 1  # a threshold past every distance: one group
    assert group_faces(vectors[:1], 0.34).tolist() == [0]
    assert group_faces(np.empty((0, 128), np.float32), 0.34).tolist() == []
    with pytest.raises(ValueError, match="grouping method"):
        group_faces(vectors, 0.34, method="ward")


def face(embedding: np.ndarray, *, seed: int, width_px: float = 100.0) -> EmbeddedFace:
    chip = np.random.default_rng(seed).integers(0, 255, (150, 150, 3), dtype=np.uint8)  # sharp: passes the gates
    return EmbeddedFace(face=Face(box=(seed, 0.0, seed + width_px, width_px), score=0.9, landmarks=FRONTAL),
                        chip=chip, embedding=embedding)


def test_inbox_keeps_groups_discards_and_expires(tmp_path):
    vectors, labels = people_vectors(np.random.default_rng(2), people=2, each=3, spread_l2=0.15)
    inbox = UnknownInbox(tmp_path / "unknown", retention_days=1.0)
    now = time.time()
    ids = [inbox.add(face(v, seed=i), track=i, t_unix=now - (2 * 86400 if i == 0 else 0)) for i, v in enumerate(vectors)]
    assert (tmp_path / "unknown" / "chips" / f"{ids[0]}.jpg").exists()
    assert stat.S_IMODE((tmp_path / "unknown" / "unknown.sqlite").stat().st_mode) == 0o600
    assert stat.S_IMODE(inbox.chip_path(ids[1]).stat().st_mode) == 0o600
    groups = inbox.groups(0.34)
    assert sorted(sorted(f.id for f in g) for g in groups) == [ids[:3], ids[3:]]
    np.testing.assert_allclose(inbox.faces([ids[4]])[0].embedding, vectors[4], atol=1e-6)

    assert inbox.prune() == 1  # two days old, retention one day: row and chip gone
    assert not (tmp_path / "unknown" / "chips" / f"{ids[0]}.jpg").exists()
    assert inbox.discard([ids[3], ids[4], 999]) == 2
    assert [f.id for f in inbox.faces()] == [ids[1], ids[2], ids[5]]
    assert sorted(p.name for p in (tmp_path / "unknown" / "chips").iterdir()) == [f"{i}.jpg" for i in (ids[1], ids[2], ids[5])]


def tracks_for(frame: int, boxes: dict[int, tuple]) -> dict:
    return {tid: SimpleNamespace(box=box, last_frame=frame) for tid, box in boxes.items()}


def test_collector_keeps_the_best_face_of_unknown_tracks_only(tmp_path):
    inbox = UnknownInbox(tmp_path / "unknown")
    collector = UnknownCollector(inbox, EnrollConfig(), min_frames=3)
    vectors, _ = people_vectors(np.random.default_rng(3), people=3, each=1, spread_l2=0.0)
    unknown, nobody = SimpleNamespace(person=None), SimpleNamespace(person="Ann")
    for index in range(4):
        stranger = face(vectors[0], seed=10, width_px=100 + 10 * index)  # grows: the last frame is the best
        ann = face(vectors[1], seed=300)
        brief = face(vectors[2], seed=600)
        faces = [stranger, ann] + ([brief] if index < 2 else [])
        matches = [unknown, unknown if index == 0 else nobody] + ([unknown] if index < 2 else [])
        boxes = {1: stranger.face.box, 2: ann.face.box, **({3: brief.face.box} if index < 2 else {})}
        collector.observe(Frame(image=None, index=index), faces, matches, tracks_for(index, boxes))
    assert inbox.faces() == []  # every track is still open, the brief one ended with 2 unknown frames
    collector.observe(Frame(image=None, index=4), [], [], {})  # all tracks end
    kept = inbox.faces()
    assert [f.track for f in kept] == [1]  # not Ann (recognised once), not the brief passer-by
    assert kept[0].quality == pytest.approx(max(f.quality for f in kept))
    np.testing.assert_allclose(kept[0].embedding, vectors[0], atol=1e-6)

    collector.observe(Frame(image=None, index=5), [face(vectors[2], seed=7)] * 1, [unknown], {})  # no track: ignored
    small = face(vectors[2], seed=8, width_px=40)  # below enroll.min_face_px: never kept
    for index in range(6, 10):
        collector.observe(Frame(image=None, index=index), [small], [unknown], tracks_for(index, {9: small.face.box}))
    collector.flush()
    assert len(inbox.faces()) == 1


def test_a_broken_inbox_never_stops_the_door_loop(tmp_path, caplog):
    (tmp_path / "unknown").write_text("a file where the inbox folder should be")
    collector = UnknownCollector(UnknownInbox(tmp_path / "unknown"), EnrollConfig(), min_frames=1)
    stranger = face(np.ones(128, np.float32), seed=4)
    collector.observe(Frame(image=None, index=0), [stranger], [SimpleNamespace(person=None)],
                      tracks_for(0, {1: stranger.face.box}))
    collector.flush()
    assert "event=unknown_not_kept track=1 error=unknown-face inbox" in caplog.text


def test_live_writer_writes_frame_and_status_at_most_once_per_interval(tmp_path):
    clock = iter([0.0, 0.1, 1.2]).__next__
    writer = LiveWriter(tmp_path / "live", interval_s=1.0, clock=clock)
    image = np.zeros((48, 64, 3), np.uint8)
    match = SimpleNamespace(person="Ann", distance_l2=0.2)
    for index in range(3):
        writer.update(Frame(image=image, index=index), [face(np.ones(128), seed=1)], [match], door_unlocked=index == 2,
                      counts={"unlock": index}, fps=10.0 + index)
        status = read_status(tmp_path / "live")
        assert status["frame"] == (0 if index < 2 else 2)
    assert status["door"] == "unlocked" and status["faces"][0]["name"] == "Ann" and status["width"] == 64
    assert status["fps"] == 12.0
    assert stat.S_IMODE((tmp_path / "live" / "frame.jpg").stat().st_mode) == 0o600
    assert read_status(tmp_path / "nowhere") is None
    wide = LiveWriter(tmp_path / "wide", interval_s=0.0)
    wide.update(Frame(image=np.zeros((1080, 1920, 3), np.uint8)), [face(np.ones(128), seed=100)], [match],
                door_unlocked=False, counts={}, fps=0.0)
    status = read_status(tmp_path / "wide")
    assert (status["width"], status["height"], status["faces"][0]["box"]) == (960, 540, [50.0, 0.0, 100.0, 50.0])


def test_admin_passwords_are_argon2_hashes_in_a_private_file(tmp_path):
    path = tmp_path / "admins.json"
    set_password(path, "ann", "correct horse battery")
    set_password(path, "bob", "another long secret")
    admins = read_admins(path)
    assert admins["ann"].startswith("$argon2id$") and "correct" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify_password(admins, "ann", "correct horse battery")
    assert not verify_password(admins, "ann", "another long secret")
    assert not verify_password(admins, "eve", "correct horse battery")
    with pytest.raises(InputError, match="too short"):
        set_password(path, "ann", "short")
    with pytest.raises(InputError, match="admin name"):
        set_password(path, "a\x1bb", "correct horse battery")
    assert verify_password(read_admins(path), "ann", "correct horse battery")  # refused changes changed nothing


def test_set_password_command(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"web": {"admins_file": str(tmp_path / "admins.json")}}))

    def run(password: str, *names: str):
        return subprocess.run([sys.executable, "-m", "edge", "admin", "set-password", *names, "--config", str(config)],
                              cwd=ROOT, input=password + "\n", capture_output=True, text=True, timeout=60)

    ok = run("correct horse battery", "ann")
    assert ok.returncode == 0 and "password set for ann" in ok.stderr
    short = run("short", "bob")
    assert (short.returncode, short.stderr.strip()) == (2, "error: password too short: use at least 10 characters")
    assert list(read_admins(tmp_path / "admins.json")) == ["ann"]


def test_sessions_expire_and_logins_are_rate_limited():
    now = [0.0]
    sessions = Sessions(lifetime_s=60, clock=lambda: now[0])
    token, session = sessions.start("ann")
    assert sessions.get(token) is session and sessions.get("guess") is None and sessions.get(None) is None
    now[0] = 61.0
    assert sessions.get(token) is None
    limiter = LoginLimiter(attempts=3, window_s=100, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after_s("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after_s("10.0.0.1") == pytest.approx(100)
    assert limiter.retry_after_s("10.0.0.2") == 0  # per client address
    now[0] += 101
    assert limiter.retry_after_s("10.0.0.1") == 0
