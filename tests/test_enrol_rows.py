"""Enrolment keeps every good photo as a row with its source; `people show` lists rows, `people forget-row` drops one."""
from __future__ import annotations

import json

import cv2
from conftest import ROOT, cli

SAMPLES = ROOT / "samples" / "photos"


def test_every_good_photo_becomes_a_row_and_one_row_can_be_forgotten(tmp_path, models_dir):
    store = tmp_path / "rows.edgestore"
    blurred = tmp_path / "blurred.jpg"
    cv2.imwrite(str(blurred), cv2.GaussianBlur(cv2.imread(str(SAMPLES / "obama.jpg")), (0, 0), 8))
    enrolled = cli("enroll", "ann", SAMPLES / "obama.jpg", blurred, SAMPLES / "obama2.jpg", "--store", store, "--json")
    assert enrolled.returncode == 0, enrolled.stderr
    report = json.loads(enrolled.stdout)
    assert report["templates"] == 2 and report["photos"] == [str(SAMPLES / "obama.jpg"), str(SAMPLES / "obama2.jpg")]
    assert [s["photo"] for s in report["skipped"]] == [str(blurred)]
    assert "face too blurred" in report["skipped"][0]["reason"] and "1 photo(s) skipped" in enrolled.stderr

    shown = json.loads(cli("people", "show", "ann", "--store", store, "--json").stdout)
    assert [(r["row"], r["source"]) for r in shown["rows"]] == [(0, "photo obama.jpg"), (1, "photo obama2.jpg")]
    assert all(r["added"].endswith("+00:00") for r in shown["rows"])

    forgot = cli("people", "forget-row", "ann", "0", "--store", store, "--json")
    assert forgot.returncode == 0, forgot.stderr
    assert json.loads(forgot.stdout)["forgotten_row"]["source"] == "photo obama.jpg"
    shown = json.loads(cli("people", "show", "ann", "--store", store, "--json").stdout)
    assert [(r["row"], r["source"]) for r in shown["rows"]] == [(0, "photo obama2.jpg")]

    for bad, message in ((["0"], "only one: remove the person"), (["x"], "needs PERSON and ROW"),
                         ([], "usage: python -m edge people forget-row PERSON ROW")):
        result = cli("people", "forget-row", "ann", *bad, "--store", store)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_no_good_photo_among_several_is_one_line_and_nothing_stored(tmp_path, models_dir):
    store = tmp_path / "none.edgestore"
    photo = cv2.imread(str(SAMPLES / "obama.jpg"))
    bad = []
    for i, sigma in enumerate((8, 10)):
        bad.append(tmp_path / f"blurred{i}.jpg")
        cv2.imwrite(str(bad[-1]), cv2.GaussianBlur(photo, (0, 0), sigma))
    result = cli("enroll", "ann", *bad, "--store", store)
    assert result.returncode == 2 and "none of the 2 photos of ann can be enrolled" in result.stderr.splitlines()[-1]
    assert not store.exists()
