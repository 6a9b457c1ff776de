"""Audit log: rows, retention, right to be forgotten, --since parsing and the `log` command."""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.audit import SCHEMA, AuditLog, parse_since
from edge.decide import Decision
from edge.errors import InputError

NOW = 1_800_000_000.0


def decision(event: str = "unlock", person: str | None = "ann") -> Decision:
    return Decision(event, person, track=1, frame=7, t_s=0.28, distance_l2=0.21, margin_l2=0.3, votes=3,
                    first_frame=5, box=(10.0, 10.0, 90.0, 110.0))


def test_rows_keep_every_field_and_file_is_private(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite")
    log.record(decision(), door_action="pulse", t_unix=NOW)
    log.record(decision("unknown", None), door_action="none", t_unix=NOW + 1)
    rows = log.rows()
    assert [(r["event"], r["person"], r["door_action"], r["votes"]) for r in rows] == [
        ("unlock", "ann", "pulse", 3), ("unknown", None, "none", 3)]
    assert rows[0]["distance_l2"] == pytest.approx(0.21)
    assert (tmp_path / "audit.sqlite").stat().st_mode & 0o777 == 0o600
    assert [r["event"] for r in log.rows(since_unix=NOW + 0.5)] == ["unknown"]


def test_retention_deletes_old_rows_and_their_snapshots(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite", retention_days=1, snapshot_dir=tmp_path / "snaps")
    chip = np.zeros((150, 150, 3), np.uint8)
    log.record(decision(), door_action="pulse", snapshot=chip, t_unix=NOW - 3 * 86400)
    log.record(decision(), door_action="pulse", snapshot=chip, t_unix=NOW)
    assert len(list((tmp_path / "snaps").iterdir())) == 2
    assert log.prune(now_unix=NOW) == 1
    assert len(log.rows()) == 1 and len(list((tmp_path / "snaps").iterdir())) == 1


def test_forget_person_removes_name_and_snapshots(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite", snapshot_dir=tmp_path / "snaps")
    log.record(decision(person="ann"), door_action="pulse", snapshot=np.zeros((8, 8, 3), np.uint8), t_unix=NOW,
               person_id="id-ann")
    log.record(decision(person="bob"), door_action="pulse", t_unix=NOW, person_id="id-bob")
    assert log.forget_person("id-ann") == 1
    assert [(r["person"], r["snapshot"]) for r in log.rows()] == [(None, None), ("bob", None)]
    assert list((tmp_path / "snaps").iterdir()) == []


def test_parse_since():
    assert parse_since("15m", now_unix=NOW) == NOW - 900
    assert parse_since("2h", now_unix=NOW) == NOW - 7200
    assert parse_since("2026-11-25T08:00:00+00:00") == 1795593600.0
    with pytest.raises(InputError, match="use a duration like 15m"):
        parse_since("yesterday")


def test_log_command(tmp_path):
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    log.record(decision(), door_action="pulse", t_unix=time.time() - 7200)
    log.record(decision("unknown", None), door_action="none")
    log.close()
    result = cli("log", "--audit", path, "--since", "1h", "--json")
    assert result.returncode == 0, result.stderr
    assert [d["event"] for d in json.loads(result.stdout)["decisions"]] == ["unknown"]
    missing = cli("log", "--audit", tmp_path / "none.sqlite")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_doctor_reports_each_check(tmp_path, models_dir):
    from pathlib import Path

    video = Path(__file__).resolve().parents[1] / "samples" / "video" / "walk_toward_camera.mp4"
    good = cli("doctor", "--source", video, "--store", tmp_path / "s.edgestore", "--audit", tmp_path / "a.sqlite", "--json")
    assert good.returncode == 0, good.stderr
    checks = {c["name"]: c for c in json.loads(good.stdout)["checks"]}
    assert set(checks) == {"config", "models", "embedder", "store", "audit", "door", "camera"}
    assert "match their sha256" in checks["models"]["detail"] and "1920x1080" in checks["camera"]["detail"]
    bad = cli("doctor", "--source", "/dev/video99", "--store", tmp_path / "s.edgestore", "--audit", tmp_path / "a.sqlite")
    assert bad.returncode == 2
    assert any(line.startswith("FAIL  camera:") and "/dev/video99" in line for line in bad.stderr.splitlines())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["id-a", "id-b", None]), st.sampled_from(["Ann", "Bo", "Cy"]),
                          st.booleans()), max_size=12))
def test_forgetting_an_id_erases_its_rows_and_snapshots_whatever_the_name_and_nothing_else(visits):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        log = AuditLog(folder / "audit.sqlite", snapshot_dir=folder / "snaps")
        for i, (person_id, name, snapshot) in enumerate(visits):
            log.record(decision(person=None if person_id is None else name), door_action="pulse", t_unix=NOW + i,
                       snapshot=np.zeros((8, 8, 3), np.uint8) if snapshot else None, person_id=person_id)
        before = log.rows()
        assert log.forget_person("id-a") == sum(person_id == "id-a" for person_id, _, _ in visits)
        after = log.rows()
        assert [r["id"] for r in after] == [r["id"] for r in before], "events are kept, only the person goes"
        for old, new in zip(before, after):
            if old["person_id"] == "id-a":
                assert (new["person"], new["person_id"], new["snapshot"]) == (None, None, None)
                assert old["snapshot"] is None or not Path(old["snapshot"]).exists()
            else:
                assert new == old and (old["snapshot"] is None or Path(old["snapshot"]).is_file())
        log.close()


def test_a_log_written_before_person_ids_gains_the_column_and_forgets_by_the_name_of_its_old_rows(tmp_path):
    path = tmp_path / "audit.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace(",\n    person_id TEXT", ""))
    old.execute("INSERT INTO decisions (t_unix, event, person) VALUES (1, 'unlock', 'Ann'), (2, 'unlock', 'Bo')")
    old.commit()
    old.close()
    log = AuditLog(path)
    log.record(decision(person="Ann"), door_action="pulse", t_unix=NOW, person_id="id-a")
    assert log.forget_person("id-a", legacy_name="Ann") == 2
    assert [(r["person"], r["person_id"]) for r in log.rows()] == [(None, None), ("Bo", None), (None, None)]
    log.close()


def test_the_log_folder_snapshots_and_database_are_private_under_any_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        log = AuditLog(tmp_path / "state" / "audit.sqlite", snapshot_dir=tmp_path / "state" / "snapshots")
        log.record(decision(), door_action="pulse", snapshot=np.zeros((8, 8, 3), np.uint8), t_unix=NOW, person_id="i")
        log.close()
    finally:
        os.umask(previous)
    [snapshot] = (tmp_path / "state" / "snapshots").iterdir()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "state", tmp_path / "state" / "snapshots", snapshot,
                                                         tmp_path / "state" / "audit.sqlite")}
    assert modes == {"state": 0o700, "snapshots": 0o700, snapshot.name: 0o600, "audit.sqlite": 0o600}
