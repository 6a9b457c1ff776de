"""Audit log: rows, retention, right to be forgotten, --since parsing and the `log` command."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import cli

from edge.audit import AuditLog, parse_since
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
    log.record(decision(person="ann"), door_action="pulse", snapshot=np.zeros((8, 8, 3), np.uint8), t_unix=NOW)
    log.record(decision(person="bob"), door_action="pulse", t_unix=NOW)
    assert log.forget_person("ann") == 1
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
