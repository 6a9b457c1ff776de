"""`make demo` end to end: the real pipeline and door loop on the bundled media give the expected answers."""
from __future__ import annotations

import json

import cv2
from conftest import cli


def test_demo_runs_and_every_step_gives_the_expected_answer(models_dir, tmp_path):
    result = cli("demo", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    unlocks = [e for e in events if e["event"] == "unlock"]
    enrolled = [e for e in events if e["event"] == "enrolled"]
    assert len(enrolled) == 1 and len(unlocks) == 2  # one per pass, both for the person enrolled at the door
    assert {e["person"] for e in unlocks} == {enrolled[0]["person"]}
    assert "every step gave the expected answer" in result.stderr
    sheet = cv2.imread(str(tmp_path / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] >= 1920
