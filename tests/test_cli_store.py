"""Enrolment, identification and people management through the real CLI, and its store errors (issue 5)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, cli, untrusted_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PEOPLE = ROOT / "samples" / "people"  # the same five people as ../shared/data/people/train, bundled
SAMPLES = ROOT / "samples" / "photos"


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, models_dir) -> Path:
    path = tmp_path_factory.mktemp("store") / "people.edgestore"
    result = cli("enroll", "--from-dir", PEOPLE, "--store", path, "--json")
    assert result.returncode == 0, result.stderr
    enrolled = json.loads(result.stdout)["enrolled"]
    assert sorted(p["name"] for p in enrolled) == ["alex_lacamoire", "biden", "kit_harington", "obama", "rose_leslie"]
    assert "[5/5] rose_leslie" in result.stderr  # progress
    return path


def identify(store: Path, image: Path) -> list[dict]:
    result = cli("identify", image, "--store", store, "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)["faces"]


@pytest.mark.parametrize(
    "photo, expected",
    [
        ("obama1.jpg", ["obama"]),
        ("alex_lacamoire1.jpg", ["alex_lacamoire"]),
        ("johnsnow_test1.jpg", ["kit_harington"]),
        ("kit_with_rose.jpg", ["kit_harington", "rose_leslie"]),
        ("obama_and_biden.jpg", ["biden", "obama"]),
    ],
)
def test_identify_the_test_photos(store, data_dir, photo, expected):
    faces = identify(store, data_dir / "people" / "test" / photo)
    assert sorted(f["name"] for f in faces if f["name"]) == expected
    for face in faces:
        if face["name"]:
            assert face["distance_l2"] < 0.33 and face["margin"] >= 0.05


def test_someone_not_enrolled_is_unknown_and_exit_1(store, data_dir):
    result = cli("identify", data_dir / "pairs" / "img10.jpg", "--store", store, "--json")
    assert result.returncode == 1
    faces = json.loads(result.stdout)["faces"]
    assert len(faces) == 1 and faces[0]["name"] is None and faces[0]["distance_l2"] > 0.33


def test_people_list_show_rename_remove(store, tmp_path):
    copy = tmp_path / "copy.edgestore"
    shutil.copy(store, copy)
    listed = json.loads(cli("people", "list", "--store", copy, "--json").stdout)["people"]
    assert [(p["name"], p["templates"]) for p in listed] == [
        ("alex_lacamoire", 1), ("biden", 2), ("kit_harington", 2), ("obama", 2), ("rose_leslie", 2)]
    shown = json.loads(cli("people", "show", "obama", "--store", copy, "--json").stdout)
    assert shown["id"] == next(p["id"] for p in listed if p["name"] == "obama")
    assert cli("people", "rename", "obama", "Barack Obama", "--store", copy).returncode == 0
    faces = identify(copy, SAMPLES / "obama.jpg")
    assert [f["name"] for f in faces] == ["Barack Obama"]
    removed = cli("people", "remove", "Barack Obama", "--store", copy, "--audit", tmp_path / "none.sqlite", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] is True
    assert [f["name"] for f in identify(copy, SAMPLES / "obama.jpg")] == [None]
    names = [p["name"] for p in json.loads(cli("people", "list", "--store", copy, "--json").stdout)["people"]]
    assert "Barack Obama" not in names and len(names) == 4
    assert "no person 'nobody'" in one_line_error(cli("people", "show", "nobody", "--store", copy))


def test_duplicate_enrolment_is_refused_unless_forced(store, tmp_path):
    copy = tmp_path / "copy.edgestore"
    shutil.copy(store, copy)
    line = one_line_error(cli("enroll", "barack", SAMPLES / "obama2.jpg", "--store", copy))
    assert "looks like obama" in line and "--force" in line
    assert len(json.loads(cli("people", "list", "--store", copy, "--json").stdout)["people"]) == 5
    assert cli("enroll", "barack", SAMPLES / "obama2.jpg", "--store", copy, "--force").returncode == 0
    # More photos of an enrolled person are added to them, not refused.
    added = cli("enroll", "obama", SAMPLES / "obama2.jpg", "--store", copy, "--json")
    assert added.returncode == 0 and json.loads(added.stdout)["templates"] == 3


def test_enrolment_quality_gates(tmp_path, data_dir, models_dir):
    store = tmp_path / "gates.edgestore"
    several = one_line_error(cli("enroll", "two", data_dir / "people" / "test" / "obama_and_biden.jpg", "--store", store))
    assert "2 faces found; enrolment needs exactly one (or pass --largest)" in several
    photo = cv2.imread(str(SAMPLES / "obama.jpg"))
    small = tmp_path / "small.jpg"
    cv2.imwrite(str(small), cv2.resize(photo, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA))
    assert "face too small" in one_line_error(cli("enroll", "small", small, "--store", store))
    blurred = tmp_path / "blurred.jpg"
    cv2.imwrite(str(blurred), cv2.GaussianBlur(photo, (0, 0), 8))
    assert "face too blurred" in one_line_error(cli("enroll", "blurred", blurred, "--store", store))
    assert not store.exists(), "nothing was enrolled, so no store was written"


def test_wrong_model_store_is_refused_and_untouched(store, tmp_path):
    copy = tmp_path / "copy.edgestore"
    shutil.copy(store, copy)
    before = copy.read_bytes()
    config = tmp_path / "plain.yaml"
    config.write_text("embedder:\n  mirror_average: false\n")  # another preprocessing: another fingerprint
    line = one_line_error(cli("identify", SAMPLES / "obama.jpg", "--store", copy, "--config", config))
    assert "another model" in line and "re-enrol" in line
    assert copy.read_bytes() == before


def test_corrupt_store_and_unreadable_path(store, tmp_path):
    corrupt = tmp_path / "corrupt.edgestore"
    corrupt.write_bytes(store.read_bytes()[:-100])
    before = corrupt.read_bytes()
    assert "corrupt" in one_line_error(cli("people", "list", "--store", corrupt))
    assert "corrupt" in one_line_error(cli("enroll", "ann", SAMPLES / "biden.jpg", "--store", corrupt))
    assert corrupt.read_bytes() == before
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    one_line_error(cli("people", "list", "--store", not_a_folder / "store.edgestore"))


def test_encrypted_store_needs_the_right_key(store, tmp_path):
    from edge.store import generate_key

    key, wrong = generate_key(tmp_path / "store.key"), generate_key(tmp_path / "wrong.key")
    encrypted = tmp_path / "secret.edgestore"
    config = tmp_path / "key.yaml"
    config.write_text(f"store:\n  key_file: {key}\n")
    assert cli("enroll", "obama", SAMPLES / "obama.jpg", "--store", encrypted, "--config", config).returncode == 0
    assert b"obama" not in encrypted.read_bytes()
    faces = json.loads(cli("identify", SAMPLES / "obama2.jpg", "--store", encrypted, "--config", config, "--json").stdout)
    assert [f["name"] for f in faces["faces"]] == ["obama"]
    wrong_config = tmp_path / "wrong.yaml"
    wrong_config.write_text(f"store:\n  key_file: {wrong}\n")
    assert "wrong key" in one_line_error(cli("people", "list", "--store", encrypted, "--config", wrong_config))
    assert "key" in one_line_error(cli("people", "list", "--store", encrypted))


def test_identify_with_nobody_enrolled_says_so_and_reports_no_distance(tmp_path):
    result = cli("identify", SAMPLES / "obama.jpg", "--store", tmp_path / "empty.edgestore", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["faces"][0] | {"box": None} == {
        "box": None, "name": None, "distance_l2": None, "margin": None}
    assert "nobody is enrolled in" in result.stderr and "closest" not in result.stderr
    assert not (tmp_path / "empty.edgestore").exists(), "identify must not create a store"


def test_erasure_follows_the_person_id_through_a_rename_and_the_last_removal_leaves_a_normal_empty_store(tmp_path,
                                                                                                        models_dir):
    from edge.audit import AuditLog
    from edge.config import Config
    from edge.decide import Decision
    from edge.embed import store_fingerprint
    from edge.store import Store

    path, audit_path = tmp_path / "people.edgestore", tmp_path / "audit" / "audit.sqlite"
    store = Store.open(path, fingerprint=store_fingerprint(Config()))
    with store.edit():
        ada = store.add_person("Ada", np.eye(128, dtype=np.float32)[0])
    log = AuditLog(audit_path, snapshot_dir=audit_path.parent / "snapshots")

    def visit(name: str) -> None:
        log.record(Decision("unlock", name, 1, 7, 0.3, 0.2, 0.3, 3, 5, (0.0, 0.0, 9.0, 9.0)), door_action="pulse",
                   snapshot=np.zeros((8, 8, 3), np.uint8), person_id=ada.id)

    visit("Ada")
    assert cli("people", "rename", "Ada", "Grace", "--store", path).returncode == 0
    visit("Grace")
    removed = cli("people", "remove", "Grace", "--store", path, "--audit", audit_path, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["audit_rows_anonymised"] == 2
    assert [(r["person"], r["person_id"], r["snapshot"]) for r in log.rows()] == [(None, None, None)] * 2
    assert list((audit_path.parent / "snapshots").iterdir()) == []
    log.close()
    listed = cli("people", "list", "--store", path, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["people"] == []
    assert "no person 'Grace'" in one_line_error(cli("people", "show", "Grace", "--store", path))


def test_a_batch_enrols_everyone_it_can_and_ends_with_a_summary_of_the_failures(tmp_path, models_dir):
    from test_images import png_declaring

    folder = tmp_path / "people"
    for name in ("obama", "biden"):
        shutil.copytree(PEOPLE / name, folder / name)
    (folder / "bomb").mkdir()
    (folder / "bomb" / "huge.png").write_bytes(png_declaring(100_000, 100_000))
    shutil.copytree(PEOPLE / "kit_harington", folder / "kit\u200bharington")
    result = cli("enroll", "--from-dir", folder, "--store", tmp_path / "s.edgestore", "--json")
    assert result.returncode == 2, result.stderr
    assert sorted(p["name"] for p in json.loads(result.stdout)["enrolled"]) == ["biden", "obama"]
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: 2 of 4 people not enrolled: 'bomb', 'kit\\u200bharington' (reasons above)", result.stderr
    assert "huge.png: its header declares over 179 megapixels, above the limit of 50 megapixels" in result.stderr
    assert "Traceback" not in result.stderr and "libpng" not in result.stderr


PEOPLE_WORDS = ["list", "show", "rename", "remove", "frobnicate", "--json", "-x", "Ada", "ADA", "Grace", ""]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.one_of(st.sampled_from(PEOPLE_WORDS), untrusted_text(40)), max_size=4))
def test_people_with_any_arguments_is_done_or_one_line_never_an_internal_error(words, tmp_path_factory, models_dir):
    from edge.__main__ import main
    from edge.config import Config
    from edge.embed import store_fingerprint
    from edge.store import Store

    folder = tmp_path_factory.mktemp("people")
    store = Store.open(folder / "people.edgestore", fingerprint=store_fingerprint(Config()))
    with store.edit():
        store.add_person("Ada", np.eye(128, dtype=np.float32)[0])
        store.add_person("Grace", np.eye(128, dtype=np.float32)[1])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(["people", *words, "--store", str(folder / "people.edgestore"), "--audit",
                         str(folder / "audit.sqlite")])
        except SystemExit as exit_:  # argparse's usage error
            code = exit_.code
    lines = stderr.getvalue().strip().splitlines()
    assert code in (0, 2), stderr.getvalue()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
