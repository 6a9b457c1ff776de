"""Embedding store: atomic, private, model-stamped persistence and vectorised 1:N matching (synthetic vectors)."""
from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge.errors import StoreError
from edge.store import ABSENT_DISTANCE_L2, EMBEDDING_DIM, Store, generate_key

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "0123abcd:prep-1"
THRESHOLD_L2 = 0.6
MARGIN_L2 = 0.05
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
SEED_PERSONS = 20_000  # big enough that one save takes milliseconds, so kills land mid-write
KILL_ROUNDS = 5
COMMITS_BEFORE_KILL = 2
MAX_KILL_DELAY_S = 0.1
WAIT_TIMEOUT_S = 20.0
POLL_S = 0.01

# The child's vector for a name, so the parent can check every enrolment it finds (same code on both sides).
VECTOR_FOR = """
import zlib, numpy as np
def vector_for(name):
    return np.random.default_rng(zlib.crc32(name.encode())).standard_normal(128).astype(np.float32)
"""
ADD_CHILD = VECTOR_FOR + """
import sys
from edge.store import Store
path, fingerprint, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = Store.open(path, fingerprint=fingerprint)
for i in range(count):
    with store.edit():
        store.add_person(f"{tag}-{i}", vector_for(f"{tag}-{i}"))
"""
CRASH_CHILD = VECTOR_FOR + """
import itertools, sys
from edge.store import Store
path, fingerprint, tag = sys.argv[1], sys.argv[2], sys.argv[3]
store = Store.open(path, fingerprint=fingerprint)
for i in itertools.count():
    with store.edit():
        store.add_person(f"crash-{tag}-{i}", vector_for(f"crash-{tag}-{i}"))
"""


def vector_for(name: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(name.encode())).standard_normal(EMBEDDING_DIM).astype(np.float32)


def unit(rng: np.random.Generator, count: int = 1) -> np.ndarray:
    vectors = rng.standard_normal((count, EMBEDDING_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def nudged(vector: np.ndarray, rng: np.random.Generator, distance_l2: float) -> np.ndarray:
    """A unit vector about `distance_l2` away from `vector` (a new photo of the same person)."""
    step = rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
    step -= step @ vector * vector
    angle = 2.0 * np.arcsin(distance_l2 / 2.0)  # chord length on the unit sphere -> angle
    return np.cos(angle) * vector + np.sin(angle) * step / np.linalg.norm(step)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "people.edgestore"


def open_store(path: Path, **options) -> Store:
    return Store.open(path, fingerprint=FINGERPRINT, **options)


def enrol(path: Path, people: dict[str, np.ndarray], **options) -> Store:
    store = open_store(path, **options)
    with store.edit():
        for name, embeddings in people.items():
            store.add_person(name, embeddings)
    return store


# ---- persistence ------------------------------------------------------------------------------------------------

def test_round_trip_keeps_persons_and_embeddings(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path)
    with store.edit():
        ada = store.add_person("Ada", unit(rng, 3) * 5.0, note="badge 17")
        store.add_person("Grace", unit(rng, 1))
    loaded = open_store(path)
    assert loaded.persons == store.persons
    assert loaded.find(ada.id) == ada and ada.note == "badge 17" and ada.embedding_count == 3
    assert ada.created_utc.endswith("+00:00")
    assert len(loaded) == 2 and loaded.embedding_count == 4
    np.testing.assert_array_equal(loaded.embeddings("ada"), store.embeddings("Ada"))
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings("Ada"), axis=1), 1.0, rtol=1e-6)


def test_missing_file_is_an_empty_store_created_by_the_first_save(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path)
    assert len(store) == 0 and not path.exists()
    (answer,) = store.match(unit(rng), threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person is None and answer.candidate is None and answer.distance_l2 == ABSENT_DISTANCE_L2
    assert store.nearest(unit(rng)[0]) == (None, ABSENT_DISTANCE_L2)
    with store.edit():
        pass
    assert not path.exists()
    with store.edit():
        store.add_person("Ada", unit(rng))
    assert path.exists()


def test_files_are_private(path: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    key = generate_key(tmp_path / "store.key")
    enrol(path, {"Ada": unit(rng)}, key_path=key)
    enrol(path, {"Grace": unit(rng)}, key_path=key)
    for private in (path, path.with_name(path.name + ".bak"), path.with_name(path.name + ".lock"), key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_saves_leave_no_temp_files(path: Path, rng: np.random.Generator) -> None:
    for name in ("Ada", "Grace", "Linus"):
        enrol(path, {name: unit(rng)})
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "people.edgestore", "people.edgestore.bak", "people.edgestore.lock"]


def test_backup_holds_the_previous_version(path: Path, rng: np.random.Generator) -> None:
    enrol(path, {"Ada": unit(rng)})
    enrol(path, {"Grace": unit(rng)})
    backup = open_store(path.with_name(path.name + ".bak"))
    assert [p.name for p in backup.persons] == ["Ada"]
    assert [p.name for p in open_store(path).persons] == ["Ada", "Grace"]


def test_backup_is_copied_where_hard_links_fail(path: Path, rng: np.random.Generator,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    enrol(path, {"Ada": unit(rng)})
    monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    enrol(path, {"Grace": unit(rng)})
    backup = path.with_name(path.name + ".bak")
    assert [p.name for p in open_store(backup).persons] == ["Ada"]
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a file to another user")
def test_save_keeps_the_owner_of_the_previous_file(path: Path, rng: np.random.Generator) -> None:
    enrol(path, {"Ada": unit(rng)})
    os.chown(path, 12345, 12345)
    enrol(path, {"Grace": unit(rng)})
    assert (path.stat().st_uid, path.stat().st_gid) == (12345, 12345)


def test_a_failing_edit_writes_nothing_and_rolls_back(path: Path, rng: np.random.Generator) -> None:
    store = enrol(path, {"Ada": unit(rng)})
    before = path.read_bytes()
    with pytest.raises(KeyError), store.edit():
        store.add_person("Grace", unit(rng))
        raise KeyError("boom")
    assert path.read_bytes() == before
    assert [p.name for p in store.persons] == ["Ada"]


def test_changes_outside_edit_are_refused(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path)
    with pytest.raises(RuntimeError, match="store.edit"):
        store.add_person("Ada", unit(rng))
    with store.edit(), pytest.raises(RuntimeError, match="already active"):
        with store.edit():
            pass


# ---- refusals: the message says what to do, the file is untouched --------------------------------------------

def assert_refused(path: Path, message: str, **options) -> StoreError:
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StoreError, match=message) as raised:
        Store.open(path, **{"fingerprint": FINGERPRINT, **options})
    assert (path.read_bytes() if path.is_file() else None) == before
    return raised.value


def test_another_model_is_refused_with_re_enrol_advice(path: Path, rng: np.random.Generator) -> None:
    enrol(path, {"Ada": unit(rng)})
    error = assert_refused(path, "was enrolled with another model", fingerprint="ffff:prep-2")
    assert str(path) in str(error) and "re-enrol" in str(error) and "python -m edge enroll --from-dir" in str(error)
    assert FINGERPRINT in str(error) and "ffff:prep-2" in str(error)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:10], id="truncated-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: bytes(random.Random(1).randbytes(len(data))), id="garbage"),
        pytest.param(lambda data: data[:-100] + bytes([data[-100] ^ 1]) + data[-99:], id="one-bit-flipped"),
    ],
)
def test_corrupt_files_are_refused_with_restore_advice(path: Path, rng: np.random.Generator, damage) -> None:
    enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    path.write_bytes(damage(path.read_bytes()))
    error = assert_refused(path, "is corrupt")
    assert f"restore it from backup {path}.bak or re-enrol" in str(error)


def test_wrong_key_is_refused(path: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    right, wrong = generate_key(tmp_path / "right.key"), generate_key(tmp_path / "wrong.key")
    enrol(path, {"Ada": unit(rng)}, key_path=right)
    assert_refused(path, f"cannot decrypt store {path} with key {wrong}: wrong key or the file was modified",
                   key_path=wrong)


def test_encrypted_store_needs_its_key(path: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    enrol(path, {"Ada": unit(rng)}, key_path=generate_key(tmp_path / "store.key"))
    assert_refused(path, "is encrypted: pass its key file")


def test_modified_ciphertext_is_refused(path: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    key = generate_key(tmp_path / "store.key")
    enrol(path, {"Ada": unit(rng)}, key_path=key)
    data = bytearray(path.read_bytes())
    data[-50] ^= 1
    path.write_bytes(bytes(data))
    assert_refused(path, "wrong key or the file was modified", key_path=key)


def test_bad_key_files_are_refused(path: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"0" * 16)
    short.chmod(0o600)
    assert_refused(path, "holds 16 bytes, expected 32", key_path=short)
    assert_refused(path, "cannot read key file", key_path=tmp_path / "absent.key")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        generate_key(short)
    assert short.read_bytes() == b"0" * 16


@pytest.mark.parametrize("layout", ["under-a-file", "a-directory"])
def test_unusable_paths_are_refused_with_the_reason(tmp_path: Path, layout: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    path = blocker / "people.edgestore" if layout == "under-a-file" else tmp_path
    reason = "Not a directory" if layout == "under-a-file" else "Is a directory"
    assert_refused(path, f"cannot read store {path}: {reason}")
    assert blocker.read_text() == "not a folder"


def test_saving_where_the_folder_became_a_file_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = tmp_path / "state"
    store = open_store(folder / "people.edgestore")
    folder.write_text("not a folder")
    with pytest.raises(StoreError, match=f"cannot lock store {folder / 'people.edgestore'}"), store.edit():
        store.add_person("Ada", unit(rng))
    assert folder.read_text() == "not a folder"


# ---- encryption at rest -------------------------------------------------------------------------------------------

def test_encrypted_store_round_trips_and_hides_templates(path: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    key = generate_key(tmp_path / "store.key")
    assert len(key.read_bytes()) == 32
    embeddings = unit(rng, 2)
    store = enrol(path, {"Ada Lovelace": embeddings}, key_path=key)
    data = path.read_bytes()
    assert b"Ada Lovelace" not in data and embeddings[0].tobytes()[:16] not in data
    loaded = open_store(path, key_path=key)
    np.testing.assert_array_equal(loaded.embeddings("Ada Lovelace"), store.embeddings("Ada Lovelace"))


def test_plain_store_opened_with_a_key_is_encrypted_on_next_save(path: Path, tmp_path: Path,
                                                                rng: np.random.Generator) -> None:
    enrol(path, {"Ada": unit(rng)})
    key = generate_key(tmp_path / "store.key")
    store = open_store(path, key_path=key)
    assert [p.name for p in store.persons] == ["Ada"]
    with store.edit():
        store.add_person("Grace", unit(rng))
    assert_refused(path, "is encrypted")
    assert b"Ada" not in path.with_name(path.name + ".bak").read_bytes()  # no plaintext copy left behind
    assert [p.name for p in open_store(path, key_path=key).persons] == ["Ada", "Grace"]


# ---- editing ------------------------------------------------------------------------------------------------------

def test_rename_and_find_by_id_or_name(path: Path, rng: np.random.Generator) -> None:
    store = enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    ada = store.find("ADA")
    with store.edit():
        renamed = store.rename(ada.id, "Ada Lovelace")
        store.rename("grace", "GRACE")  # a change of case only is allowed
    loaded = open_store(path)
    assert loaded.find("ada lovelace") == renamed and renamed.id == ada.id
    assert loaded.find("grace").name == "GRACE"
    with pytest.raises(StoreError, match="no person 'Ada'.*python -m edge people"):
        loaded.find("Ada")


def test_remove_erases_the_templates_from_the_file_and_its_backup(path: Path, rng: np.random.Generator) -> None:
    ada, grace = unit(rng, 2), unit(rng, 1)
    store = enrol(path, {"Ada": ada, "Grace": grace})
    stored_ada = store.embeddings("Ada")
    with store.edit():
        removed = store.remove("ada")
    assert removed.name == "Ada" and removed.embedding_count == 2
    for saved in (path, path.with_name(path.name + ".bak")):
        data = saved.read_bytes()
        assert b"Ada" not in data and not any(row.tobytes() in data for row in stored_ada)
        assert store.embeddings("Grace").tobytes() in data
    loaded = open_store(path)
    assert [p.name for p in loaded.persons] == ["Grace"] and loaded.embedding_count == 1
    with pytest.raises(StoreError, match="no person"):
        loaded.find(removed.id)


def test_duplicate_names_are_refused_ignoring_case(path: Path, rng: np.random.Generator) -> None:
    store = enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    before = path.read_bytes()
    with pytest.raises(StoreError, match="'Ada' is already enrolled"), store.edit():
        store.add_person(" ada ", unit(rng))
    with pytest.raises(StoreError, match="cannot rename to 'ADA'"), store.edit():
        store.rename("Grace", "ADA")
    assert path.read_bytes() == before


@pytest.mark.parametrize("name, message", [
    ("", "1 to 64 characters"),
    ("   ", "1 to 64 characters"),
    ("x" * 65, "1 to 64 characters"),
    ("Ada\nLovelace", r"U\+000A \(Cc: control"),
    ("Ada\x00", r"U\+0000 \(Cc: control"),
    ("deadbeef0123", "looks like a person id"),
])
def test_invalid_names_are_refused(path: Path, rng: np.random.Generator, name: str, message: str) -> None:
    store = open_store(path)
    with pytest.raises(StoreError, match=message), store.edit():
        store.add_person(name, unit(rng))
    assert not path.exists()


def test_invalid_embeddings_are_refused(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path)
    bad = unit(rng, 2)
    bad[1, 5] = np.nan
    for embeddings, message in [(bad, "NaN"), (np.zeros((1, EMBEDDING_DIM)), "length ~0"),
                                (np.ones((2, 64)), r"shape \(k, 128\)"), (np.ones((0, 128)), "k >= 1")]:
        with pytest.raises(ValueError, match=message), store.edit():
            store.add_person("Ada", embeddings)
    assert len(store) == 0


def test_oldest_embeddings_are_dropped_beyond_the_limit(path: Path, rng: np.random.Generator) -> None:
    first, second = unit(rng, 2), unit(rng, 2)
    store = open_store(path, max_embeddings_per_person=3)
    with store.edit():
        store.add_person("Ada", first)
        store.add_person("Grace", unit(rng, 4))
        updated = store.add_embeddings("Ada", second)
    assert updated.embedding_count == 3 and store.find("Grace").embedding_count == 3
    loaded = open_store(path, max_embeddings_per_person=3)
    np.testing.assert_allclose(loaded.embeddings("Ada"), np.concatenate([first[1:], second]), atol=1e-6)
    assert loaded.embedding_count == 6


# ---- matching -----------------------------------------------------------------------------------------------------

def test_match_picks_the_right_person(path: Path, rng: np.random.Generator) -> None:
    people = {f"person {i}": unit(rng) for i in range(50)}
    store = enrol(path, people)
    queries = np.stack([nudged(people["person 3"][0], rng, 0.3), nudged(people["person 41"][0], rng, 0.4)])
    first, second = store.match(queries, threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert first.person == "person 3" and second.person == "person 41"
    assert first.distance_l2 == pytest.approx(0.3, abs=1e-4) and second.distance_l2 == pytest.approx(0.4, abs=1e-4)
    assert first.margin_l2 > 0.5 and first.extra["candidate_id"] == store.find("person 3").id
    nearest, distance_l2 = store.nearest(queries[1])
    assert nearest == store.find("person 41") and distance_l2 == pytest.approx(0.4, abs=1e-4)


def test_match_is_unknown_above_the_threshold(path: Path, rng: np.random.Generator) -> None:
    ada = unit(rng)
    store = enrol(path, {"Ada": ada, "Grace": unit(rng)})
    (answer,) = store.match(nudged(ada[0], rng, 0.7), threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person is None and answer.candidate == "Ada"
    assert answer.distance_l2 == pytest.approx(0.7, abs=1e-4)


def test_match_is_unknown_when_two_persons_are_too_close(path: Path, rng: np.random.Generator) -> None:
    ada = unit(rng)
    twin = nudged(ada[0], rng, 0.02)
    store = enrol(path, {"Ada": ada, "Twin": twin, "Grace": unit(rng)})
    (answer,) = store.match(nudged(ada[0], rng, 0.2), threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person is None and answer.candidate in ("Ada", "Twin")
    assert answer.distance_l2 < THRESHOLD_L2 and answer.margin_l2 < MARGIN_L2


def test_match_compares_with_each_persons_mean_template(path: Path, rng: np.random.Generator) -> None:
    centre = unit(rng)[0]
    ada = np.stack([nudged(centre, rng, 0.3) for _ in range(4)])  # four photos around one face
    template = unit_of(ada.mean(axis=0))
    store = enrol(path, {"Grace": unit(rng, 3), "Ada": ada, "Linus": unit(rng, 2)})
    probe = nudged(template, rng, 0.25)
    (answer,) = store.match(probe, threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person == "Ada" and answer.distance_l2 == pytest.approx(0.25, abs=1e-4)
    # not the nearest row: the distance is to the mean, and a row's own vector is further than the template is
    (row,) = store.match(ada[0], threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert row.distance_l2 == pytest.approx(float(np.linalg.norm(ada[0] - template)), abs=1e-4)
    assert row.distance_l2 > 0.1


def test_a_single_person_wins_by_the_absent_distance(path: Path, rng: np.random.Generator) -> None:
    ada = unit(rng)
    store = enrol(path, {"Ada": ada})
    (answer,) = store.match(nudged(ada[0], rng, 0.3), threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person == "Ada"
    assert answer.margin_l2 == pytest.approx(ABSENT_DISTANCE_L2 - answer.distance_l2)


# ---- several processes --------------------------------------------------------------------------------------------

def test_reload_if_changed_sees_another_writer(path: Path, rng: np.random.Generator) -> None:
    kiosk = enrol(path, {"Ada": unit(rng)})
    assert not kiosk.reload_if_changed()
    enrol(path, {"Grace": unit(rng)})
    assert kiosk.reload_if_changed()
    assert [p.name for p in kiosk.persons] == ["Ada", "Grace"]
    assert not kiosk.reload_if_changed()


def test_two_writing_processes_lose_nothing(path: Path) -> None:
    adds = 20
    children = [subprocess.Popen([sys.executable, "-c", ADD_CHILD, str(path), FINGERPRINT, tag, str(adds)],
                                 env=CHILD_ENV) for tag in ("left", "right")]
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    store = open_store(path)
    assert sorted(p.name for p in store.persons) == sorted(f"{tag}-{i}" for tag in ("left", "right")
                                                           for i in range(adds))
    for person in store.persons:
        np.testing.assert_allclose(store.embeddings(person.id)[0], unit_of(vector_for(person.name)), atol=1e-6)


def unit_of(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def wait_for_persons(reader: Store, count: int, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while len(reader) < count:
        assert child.poll() is None, "the enrolling child died on its own"
        assert time.monotonic() < deadline, f"the child did not reach {count} persons in {WAIT_TIMEOUT_S} s"
        time.sleep(POLL_S)
        reader.reload_if_changed()


def test_sigkill_during_saves_loses_no_committed_person(path: Path, rng: np.random.Generator) -> None:
    seed = unit(rng, SEED_PERSONS)
    store = open_store(path)
    with store.edit():
        for i, vector in enumerate(seed):
            store.add_person(f"seed-{i}", vector)
    chaos = random.Random(11)
    for round_index in range(KILL_ROUNDS):
        reader = open_store(path)
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), FINGERPRINT, str(round_index)],
                                 env=CHILD_ENV)
        try:
            wait_for_persons(reader, len(reader) + COMMITS_BEFORE_KILL, child)
            visible = {p.id: reader.embeddings(p.id) for p in reader.persons}
            time.sleep(chaos.uniform(0.0, MAX_KILL_DELAY_S))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        after = open_store(path)
        assert len(after) >= len(visible)
        for person_id, embeddings in visible.items():
            np.testing.assert_array_equal(after.embeddings(person_id), embeddings)
        for person in after.persons[SEED_PERSONS:]:
            np.testing.assert_allclose(after.embeddings(person.id)[0], unit_of(vector_for(person.name)), atol=1e-6)
    with store.edit():
        store.add_person("after the crashes", unit(rng))
    assert not list(path.parent.glob("*.tmp")), "stale temp files of killed writers are removed by the next save"


def test_save_after_a_kill_between_backup_link_and_rename_leaves_no_temp(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path)
    with store.edit():
        store.add_person("ann", unit(rng))
    # A writer killed after hard-linking the backup to the live file but before renaming its new file over it
    # leaves .bak and the store as two names of one file.
    store.backup_path.unlink(missing_ok=True)
    os.link(path, store.backup_path)
    with store.edit():
        store.add_person("bob", unit(rng))
    assert not list(path.parent.glob("*.tmp"))
    assert [p.name for p in open_store(path).persons] == ["ann", "bob"]


def test_a_key_file_that_group_or_others_may_use_is_refused_like_an_ssh_key(path: Path, tmp_path: Path,
                                                                           rng: np.random.Generator) -> None:
    key = generate_key(tmp_path / "store.key")
    enrol(path, {"Ada": unit(rng)}, key_path=key)
    for mode in range(0o400, 0o1000):  # every mode the owner can read the key under
        key.chmod(mode)
        if mode & 0o077:
            assert_refused(path, f"key file {key} has mode {mode:04o}: group or others may use it; make it private "
                                 f"with `chmod 600 {key}`", key_path=key)
        else:
            assert [p.name for p in open_store(path, key_path=key).persons] == ["Ada"]


# ---- rows: where each embedding came from, forgetting one, format 1 -------------------------------------------

STORE_V1 = Path(__file__).parent / "data" / "store_v1.edgestore"  # written by the format-1 code (Ada 2 rows, Grace 1)


def test_rows_keep_their_source_and_date_through_the_cap(path: Path, rng: np.random.Generator) -> None:
    store = open_store(path, max_embeddings_per_person=3)
    with store.edit():
        store.add_person("Ada", unit(rng, 2), sources=["photo a.jpg", "photo b.jpg"])
        store.add_person("Grace", unit(rng))
        store.add_embeddings("Ada", unit(rng, 2), sources="auto-update track 4")
    rows = open_store(path).rows("Ada")
    assert [(r.index, r.source) for r in rows] == [(0, "photo b.jpg"), (1, "auto-update track 4"),
                                                   (2, "auto-update track 4")]  # the oldest row was dropped
    assert all(r.added_utc.endswith("+00:00") for r in rows)
    assert [r.source for r in open_store(path).rows("Grace")] == ["enrolment"]


def test_forget_row_erases_one_embedding_also_from_the_backup(path: Path, rng: np.random.Generator) -> None:
    ada, grace = unit(rng, 3), unit(rng)
    store = enrol(path, {"Ada": ada, "Grace": grace})
    with store.edit():
        forgotten = store.forget_row("Ada", 1)
    assert forgotten.index == 1 and forgotten.source == "enrolment"
    reopened = open_store(path)
    assert np.allclose(reopened.embeddings("Ada"), ada[[0, 2]], atol=1e-6)
    assert np.allclose(reopened.embeddings("Grace"), grace, atol=1e-6)
    backup = Store.open(reopened.backup_path, fingerprint=FINGERPRINT)
    assert not any(np.allclose(row, ada[1], atol=1e-6) for row in backup.embeddings("Ada"))
    with pytest.raises(StoreError, match="rows 0 to 1, not 5"), reopened.edit():
        reopened.forget_row("Ada", 5)
    with pytest.raises(StoreError, match="only one: remove the person"), reopened.edit():
        reopened.forget_row("Grace", 0)


def test_a_format_1_store_is_read_and_written_back_as_format_2(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "old.edgestore"
    path.write_bytes(STORE_V1.read_bytes())
    store = Store.open(path, fingerprint="test:format-1")
    assert [(p.name, p.embedding_count, p.note) for p in store.persons] == [("Ada", 2, "two photos"), ("Grace", 1, None)]
    ada_created = store.find("Ada").created_utc
    assert [(r.source, r.added_utc) for r in store.rows("Ada")] == [("enrolment", ada_created)] * 2
    old_rows = store.embeddings("Ada")
    (answer,) = store.match(old_rows.mean(axis=0), threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person == "Ada" and answer.distance_l2 < 1e-3
    with store.edit():
        store.add_embeddings("Grace", unit(rng), sources="photo new.jpg")
    assert path.read_bytes()[8:10] == (2).to_bytes(2, "little")  # format version 2 on disk now
    reopened = Store.open(path, fingerprint="test:format-1")
    assert np.array_equal(reopened.embeddings("Ada"), old_rows)
    assert [r.source for r in reopened.rows("Grace")] == ["enrolment", "photo new.jpg"]
    assert reopened.rows("Ada")[0].added_utc == ada_created
    assert reopened.backup_path.read_bytes() == STORE_V1.read_bytes()  # the format-1 file kept as the backup


def test_nearest_finds_the_person_with_the_closest_single_row(path: Path, rng: np.random.Generator) -> None:
    rows = unit(rng, 3)  # three unrelated rows: their mean template is far from each of them
    store = enrol(path, {"Grace": unit(rng), "Ada": rows})
    person, distance = store.nearest(rows[2])
    assert person.name == "Ada" and distance < 1e-3


def test_rows_that_cancel_out_match_nothing_and_hide_no_one(path: Path, rng: np.random.Generator) -> None:
    ada, grace = unit(rng)[0], unit(rng)
    store = enrol(path, {"Odd": np.stack([ada, -ada]), "Grace": grace})
    (answer,) = store.match(grace, threshold_l2=THRESHOLD_L2, margin_l2=MARGIN_L2)
    assert answer.person == "Grace" and answer.distance_l2 < 1e-3
