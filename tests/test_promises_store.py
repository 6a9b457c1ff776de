"""The store's promises, pinned where they are made: the match boundaries as documented ("closer than" the threshold,
"ahead by" the margin) and the durability order of every write, seen by recording the system calls (a kill test
cannot see a page cache that was never flushed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from test_store import FINGERPRINT, enrol, nudged, open_store, path, rng, unit  # noqa: F401  (path, rng: fixtures)

from edge.errors import StoreError
from edge.store import (
    ABSENT_DISTANCE_L2, CHECKSUM_BYTES, EMBEDDING_DIM, FLAG_ENCRYPTED, FORMAT_VERSION, GCM_TAG_BYTES, HEADER, MAGIC,
    META_LENGTH, NONCE_BYTES, Row, Store, generate_key,
)
from edge.types import Match

# ---- match boundaries -------------------------------------------------------------------------------------------


@pytest.fixture
def ada_and_grace(path: Path, rng: np.random.Generator) -> tuple[Store, np.ndarray]:
    """A store of two and a query close to Ada, with its exact distance and margin as the store computes them."""
    ada = unit(rng)
    store = enrol(path, {"Ada": ada, "Grace": unit(rng)})
    query = nudged(ada[0], rng, 0.3)[None, :]
    return store, query


def answer(store: Store, query: np.ndarray, *, threshold_l2: float = 2.0, margin_l2: float = 0.0):
    (match,) = store.match(query, threshold_l2=threshold_l2, margin_l2=margin_l2)
    return match


def test_a_match_exactly_at_the_threshold_is_refused(ada_and_grace):
    store, query = ada_and_grace
    distance = answer(store, query).distance_l2
    assert answer(store, query, threshold_l2=distance).person is None, "accepted only when closer than the threshold"
    assert answer(store, query, threshold_l2=math.nextafter(distance, math.inf)).person == "Ada"


def test_a_margin_exactly_at_the_minimum_is_accepted(ada_and_grace):
    store, query = ada_and_grace
    margin = answer(store, query).margin_l2
    assert margin > 0
    assert answer(store, query, margin_l2=margin).person == "Ada", "ahead by at least the margin is enough"
    assert answer(store, query, margin_l2=math.nextafter(margin, math.inf)).person is None


def test_margin_is_measured_to_the_second_best_person_not_to_another_template(path, rng):
    ada = unit(rng)
    store = enrol(path, {"Ada": np.concatenate([ada, nudged(ada[0], rng, 0.05)[None, :]]), "Grace": unit(rng)})
    match = answer(store, nudged(ada[0], rng, 0.3)[None, :], threshold_l2=0.6, margin_l2=0.3)
    assert match.person == "Ada", "Ada's second template is not a rival"
    assert match.margin_l2 > 0.9


# ---- durability order -------------------------------------------------------------------------------------------


def name_of(path: Path, store_path: Path) -> str:
    """The role of a path in a save: store, backup, temp (new store), staging (new backup name), folder."""
    name = path.name
    if path == store_path.parent:
        return "folder"
    if name == store_path.name:
        return "store"
    if name == store_path.name + ".bak":
        return "backup"
    if name.startswith(f".{store_path.name}.bak.") and name.endswith(".tmp"):
        return "staging"
    if name.startswith(f".{store_path.name}.") and name.endswith(".tmp"):
        return "temp"
    return name


@pytest.fixture
def calls(monkeypatch, path: Path) -> list[tuple]:
    """Every fsync, link and rename, in order, with the bytes an fsynced file held at that moment."""
    recorded: list[tuple] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        content = target.read_bytes() if target.is_file() else None
        recorded.append(("fsync", name_of(target, path), content))
        real_fsync(fd)

    def replace(source, target) -> None:
        recorded.append(("rename", name_of(Path(source), path), name_of(Path(target), path)))
        real_replace(source, target)

    def link(source, target) -> None:
        recorded.append(("link", name_of(Path(source), path), name_of(Path(target), path)))
        real_link(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return recorded


def steps(calls: list[tuple]) -> list[tuple]:
    return [call[:2] if call[0] == "fsync" else call for call in calls]


def test_first_save_fsyncs_the_full_temp_file_then_renames_then_fsyncs_the_folder(path, rng, calls):
    enrol(path, {"Ada": unit(rng)})
    assert steps(calls) == [("fsync", "temp"), ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[0][2] == path.read_bytes(), "the temp file was complete when it was fsynced"


def test_a_save_keeps_the_previous_file_as_backup_before_replacing_it(path, rng, calls):
    store = enrol(path, {"Ada": unit(rng)})
    previous = path.read_bytes()
    calls.clear()
    with store.edit():
        store.add_person("Grace", unit(rng))
    assert steps(calls) == [("fsync", "temp"), ("link", "store", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[0][2] == path.read_bytes()
    assert store.backup_path.read_bytes() == previous


def test_an_erasing_save_makes_the_backup_the_new_file(path, rng, calls):
    store = enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    calls.clear()
    with store.edit():
        store.remove("Ada")
    assert steps(calls) == [("fsync", "temp"), ("link", "temp", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert store.backup_path.read_bytes() == path.read_bytes() == calls[0][2]


def test_a_copied_backup_is_fsynced_before_it_gets_its_name(path, rng, calls, monkeypatch):
    store = enrol(path, {"Ada": unit(rng)})
    previous = path.read_bytes()

    def no_hard_links(source, target) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    calls.clear()
    with store.edit():
        store.add_person("Grace", unit(rng))
    assert steps(calls) == [("fsync", "temp"), ("fsync", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[1][2] == previous, "the copy was complete when it was fsynced"


def test_a_new_key_file_is_fsynced_and_so_is_its_folder(tmp_path, calls):
    key = generate_key(tmp_path / "store.key")
    assert [(call[0], call[1]) for call in calls] == [("fsync", "store.key"), ("fsync", "folder")]
    assert calls[0][2] == key.read_bytes() and len(calls[0][2]) == 32


# ---- each refusal names what is wrong and what to do ------------------------------------------------------------


def plain_store_bytes(meta: dict, matrix: bytes = b"") -> bytes:
    """A plain store file with a valid checksum around the given metadata (so only the metadata is wrong)."""
    body = json.dumps({"fingerprint": FINGERPRINT, "dim": EMBEDDING_DIM, **meta}).encode()
    data = HEADER.pack(MAGIC, FORMAT_VERSION, 0) + META_LENGTH.pack(len(body)) + body + matrix
    return data + hashlib.sha256(data).digest()


def sealed(payload: bytes) -> bytes:
    """A plain store file around any payload, with a valid checksum."""
    data = HEADER.pack(MAGIC, FORMAT_VERSION, 0) + payload
    return data + hashlib.sha256(data).digest()


ONE_ROW = np.ones((1, EMBEDDING_DIM), "<f4").tobytes()
COLUMNS = {"ids": ["0123456789ab"], "names": ["Ada"], "created_utc": ["2026-01-01T00:00:00+00:00"], "notes": [None],
           "counts": [1]}
ROWS = {"row_sources": {"values": ["enrolment"], "index": [0]},
        "row_added_utc": {"values": ["2026-01-01"], "index": [0]}}


@pytest.mark.parametrize(("data", "reason"), [
    (HEADER.pack(MAGIC, FORMAT_VERSION, 0) + b"\0" * 31, f"{HEADER.size + 31} bytes, too short for a store"),
    (b"\0" * (HEADER.size + 32), "it does not start like an edge store"),
    (HEADER.pack(MAGIC, FORMAT_VERSION, 0) + b"\0" * 32, "checksum mismatch: the file is truncated or was modified"),
    (plain_store_bytes({k: v for k, v in COLUMNS.items() if k != "counts"}, ONE_ROW), "metadata lacks 'counts'"),
    (plain_store_bytes({**COLUMNS, "names": ["Ada", "Grace"]}, ONE_ROW), "metadata columns are not lists of one length"),
    (plain_store_bytes({**COLUMNS, "names": "Ada"}, ONE_ROW), "metadata columns are not lists of one length"),
    (plain_store_bytes({**COLUMNS, "dim": 64}, ONE_ROW), "embeddings have 64 dimensions, expected 128"),
    (plain_store_bytes({**COLUMNS, "counts": ["one"]}, ONE_ROW), "embedding counts are not integers"),
    (plain_store_bytes(COLUMNS, ONE_ROW * 2), f"{2 * len(ONE_ROW)} bytes of embeddings, the metadata describes "
                                              f"{len(ONE_ROW)}"),
    (plain_store_bytes({**COLUMNS, "counts": [0]}), "0 bytes of embeddings, the metadata describes 0"),
    (sealed(b"\0" * (META_LENGTH.size - 1)), "payload shorter than its length field"),
    (sealed(META_LENGTH.pack(100) + b"{}"), "metadata runs past the end of the file"),
    (sealed(META_LENGTH.pack(0)), "unreadable metadata: Expecting value: line 1 column 1 (char 0)"),
    (sealed(META_LENGTH.pack(2) + b"[]"), "metadata is not a JSON object"),
    (b"EDGESTOR", "8 bytes, shorter than the 16-byte header"),
    (HEADER.pack(MAGIC, FORMAT_VERSION, 0), f"{HEADER.size} bytes, too short for a store"),
    (HEADER.pack(MAGIC, FORMAT_VERSION, 2) + b"\0" * 32, "unknown flags 0x2"),
    (plain_store_bytes(COLUMNS, ONE_ROW), "row sources or dates are malformed"),
    (plain_store_bytes({**COLUMNS, **ROWS, "row_added_utc": {"values": ["2026-01-01"], "index": [0, 0]}}, ONE_ROW),
     "row sources and dates do not match the embeddings"),
], ids=["short", "not-a-store", "checksum", "no-counts", "ragged", "not-lists", "dim", "counts-text", "extra-rows",
        "empty-person", "payload-short", "metadata-past-end", "no-metadata", "metadata-list", "header-short",
        "header-only", "flags", "no-row-columns", "row-columns-ragged"])
def test_a_corrupt_file_is_refused_with_what_is_wrong(path, data, reason):
    path.write_bytes(data)
    with pytest.raises(StoreError) as refused:
        Store.open(path, fingerprint=FINGERPRINT)
    assert str(refused.value) == (f"store {path} is corrupt ({reason}); restore it from backup {path}.bak or "
                                  "re-enrol")


@pytest.mark.parametrize(("extra", "reason"), [(-1, "43 bytes, too short for an encrypted store"),
                                                (0, "cannot decrypt store")])
def test_an_encrypted_file_too_short_to_hold_nonce_and_tag_is_corrupt(path, tmp_path, extra, reason):
    key = generate_key(tmp_path / "store.key")
    path.write_bytes(HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_ENCRYPTED) + b"\0" * (NONCE_BYTES + GCM_TAG_BYTES + extra))
    with pytest.raises(StoreError, match=re.escape(reason)):
        Store.open(path, fingerprint=FINGERPRINT, key_path=key)


def test_key_file_problems_say_how_to_fix_them(path, tmp_path):
    absent = tmp_path / "absent.key"
    with pytest.raises(StoreError) as refused:
        Store.open(path, fingerprint=FINGERPRINT, key_path=absent)
    assert str(refused.value) == (f"cannot read key file {absent}: No such file or directory; create one with "
                                  "edge.store.generate_key or fix the path")
    short = tmp_path / "short.key"
    short.write_bytes(b"0" * 16)
    with pytest.raises(StoreError) as refused:
        Store.open(path, fingerprint=FINGERPRINT, key_path=short)
    assert str(refused.value) == (f"key file {short} holds 16 bytes, expected 32 random bytes: create one with "
                                  "edge.store.generate_key")
    with pytest.raises(StoreError) as refused:
        generate_key(short)
    assert str(refused.value) == (f"key file {short} already exists; refusing to overwrite it, stores encrypted "
                                  "with it would become unreadable")
    missing_folder = tmp_path / "no-such-folder" / "store.key"
    with pytest.raises(StoreError) as refused:
        generate_key(missing_folder)
    assert str(refused.value) == f"cannot create key file {missing_folder}: No such file or directory"


def test_an_unknown_person_error_says_how_to_list_them(path, rng):
    store = enrol(path, {"Ada": unit(rng)})
    with pytest.raises(StoreError) as refused:
        store.find("Grace")
    assert str(refused.value) == f"no person 'Grace' (id or name) in {path}: list them with `python -m edge people list`"


def test_one_edit_can_rename_add_templates_and_enrol_again(path, rng):
    store = enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    with store.edit():
        store.rename("Ada", "Ada Lovelace")
        assert store.find("ada lovelace").name == "Ada Lovelace", "found under the new name before the save"
        store.add_embeddings("Grace", unit(rng, 2))
        store.add_person("Linus", unit(rng))
    assert [(p.name, p.embedding_count) for p in store.persons] == [("Ada Lovelace", 1), ("Grace", 3), ("Linus", 1)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", p.id) for p in store.persons), "ids are 12 hex digits"
    assert open_store(path).persons == store.persons


@pytest.mark.parametrize("names", [["A"], ["Ada", "Grace Hopper"], ["x" * 30] * 1])
def test_the_matrix_starts_16_byte_aligned_in_the_file(path, rng, names):
    enrol(path, {name: unit(rng) for name in names})
    data = path.read_bytes()
    (meta_bytes,) = META_LENGTH.unpack_from(data, HEADER.size)
    matrix_start = HEADER.size + META_LENGTH.size + meta_bytes
    assert matrix_start % 16 == 0
    assert len(data) - CHECKSUM_BYTES - matrix_start == len(names) * EMBEDDING_DIM * 4


# ---- rows: each keeps its own origin --------------------------------------------------------------------------


class Clock(datetime):
    """The store's clock, set by hand: every row added gets `Clock.at`."""

    at = datetime(2026, 1, 1, tzinfo=timezone.utc)

    @classmethod
    def now(cls, tz=None):
        return cls.at


def test_each_row_keeps_its_own_source_and_date_and_forgetting_one_returns_it(path, rng, monkeypatch):
    monkeypatch.setattr("edge.store.datetime", Clock)
    store = open_store(path)
    dates = [f"2026-01-0{day}T00:00:00+00:00" for day in (1, 2, 3, 4)]
    with store.edit():
        store.add_person("Grace", unit(rng))
        Clock.at = datetime.fromisoformat(dates[1])
        store.add_person("Ada", unit(rng), sources="photo a.jpg")
        Clock.at = datetime.fromisoformat(dates[2])
        store.add_embeddings("Ada", unit(rng))  # no source given: an enrolment
        Clock.at = datetime.fromisoformat(dates[3])
        store.add_embeddings("Ada", unit(rng), sources="door camera")
    reopened = open_store(path)
    assert [(r.index, r.source, r.added_utc) for r in reopened.rows("Ada")] == [
        (0, "photo a.jpg", dates[1]), (1, "enrolment", dates[2]), (2, "door camera", dates[3])]
    with reopened.edit():
        assert reopened.forget_row("Ada", 2) == Row(2, "door camera", dates[3])
    with pytest.raises(StoreError, match=r"rows 0 to 1, not 2: see `python -m edge people show`"), reopened.edit():
        reopened.forget_row("Ada", 2)
    with pytest.raises(StoreError, match=r"remove the person instead \(`python -m edge people remove`\)"), \
            reopened.edit():
        reopened.forget_row("Grace", 0)


def test_an_empty_store_answers_absent_with_margin_0_and_one_person_is_measured_to_absent(path, rng):
    store = open_store(path)
    queries = unit(rng, 2)
    assert store.match(queries, threshold_l2=2.0, margin_l2=0.0) == [
        Match(person=None, distance_l2=ABSENT_DISTANCE_L2, margin_l2=0.0)] * 2
    store = enrol(path, {"Ada": queries[0]})
    (alone,) = store.match(queries[1], threshold_l2=2.0, margin_l2=0.0)
    assert alone.person == "Ada" and alone.margin_l2 == pytest.approx(ABSENT_DISTANCE_L2 - alone.distance_l2)


def test_a_newer_format_or_another_model_is_refused_with_what_to_do(path, rng):
    path.write_bytes(HEADER.pack(MAGIC, 9, 0) + b"\0" * 32)
    with pytest.raises(StoreError) as refused:
        Store.open(path, fingerprint=FINGERPRINT)
    assert str(refused.value) == (f"store {path} has format version 9, this program reads versions 1, 2: use the edge "
                                  "release that wrote it")
    path.write_bytes(plain_store_bytes({**COLUMNS, **ROWS}, ONE_ROW))
    assert open_store(path).embeddings("Ada").dtype == np.float32  # the file's float32 rows, as written
    with pytest.raises(StoreError) as refused:
        Store.open(path, fingerprint="ffff:prep-2")
    assert str(refused.value).endswith(f"(mv {path} {path}.old) and run `python -m edge enroll --from-dir PHOTOS_DIR`")


TIMED_PERSONS = 2000  # so a logged duration of 0.0 ms would be wrong, not a fast machine


def logged_fields(caplog, event: str) -> dict[str, str]:
    """The key=value fields of the one log line that starts with `event`."""
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(event)]
    return dict(pair.split("=", 1) for pair in line.split()[1:])


def test_a_failed_write_says_what_to_check_and_a_save_is_logged_as_one_line(path, rng, monkeypatch, caplog):
    store = enrol(path, {"Ada": unit(rng, 2), **{f"p{i}": unit(rng) for i in range(TIMED_PERSONS - 1)}})
    caplog.set_level(logging.INFO, logger="edge.store")
    with store.edit():
        store.add_person("Grace", unit(rng))
    fields = logged_fields(caplog, "store_saved")
    assert {k: v for k, v in fields.items() if k != "save_ms"} == {
        "path": str(path), "persons": str(TIMED_PERSONS + 1), "rows": str(TIMED_PERSONS + 2),
        "encrypted": "False"}
    assert 0.0 < float(fields["save_ms"]) < 60_000.0

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edge.store._write_atomically", disk_full)
    with pytest.raises(StoreError) as refused, store.edit():
        store.add_person("Hedy", unit(rng))
    assert str(refused.value) == (f"cannot write store {path}: No space left on device; check that its folder exists, "
                                  "is writable by this user and has free space")


def test_an_encrypted_store_keeps_its_previous_file_as_backup_on_every_save(path, tmp_path, rng):
    key = generate_key(tmp_path / "store.key")
    store = open_store(path, key_path=key)
    for name in ("Ada", "Grace", "Hedy"):
        with store.edit():
            store.add_person(name, unit(rng))
    backup = Store.open(store.backup_path, fingerprint=FINGERPRINT, key_path=key)
    assert [p.name for p in backup.persons] == ["Ada", "Grace"]


def test_the_new_file_is_written_in_the_store_folder(path, rng, monkeypatch):
    """A rename is atomic only within one filesystem: the temp file lives next to the store."""
    renamed_from = []
    real_replace = os.replace

    def replace(source, target) -> None:
        renamed_from.append(Path(source).parent)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    enrol(path, {"Ada": unit(rng)})
    assert renamed_from == [path.parent]


def test_a_bad_note_or_row_source_is_refused_naming_the_field(path, rng):
    store = open_store(path)
    with pytest.raises(StoreError, match=r"^note must be 1 to \d+ characters, got 0"), store.edit():
        store.add_person("Ada", unit(rng), note=" ")
    with pytest.raises(StoreError, match=r"^row source must be 1 to \d+ characters, got 0"), store.edit():
        store.add_person("Ada", unit(rng), sources=" ")
    with pytest.raises(ValueError, match=r"^1 sources for 2 embeddings$"), store.edit():
        store.add_person("Ada", unit(rng, 2), sources=["photo a.jpg"])


def test_invalid_embeddings_and_a_taken_name_are_refused_saying_what_is_wrong(path, rng):
    store = enrol(path, {"Ada": unit(rng)})
    refusals = [(np.zeros((2, 64), np.float32), "embeddings must have shape (k, 128) with k >= 1, got (2, 64)"),
                (np.full((1, EMBEDDING_DIM), np.nan, np.float32),
                 "embeddings contain NaN or infinity: the embedder produced invalid output"),
                (np.zeros((1, EMBEDDING_DIM), np.float32),
                 "an embedding has length ~0 and no direction: the embedder produced invalid output")]
    for embeddings, reason in refusals:
        with pytest.raises(ValueError) as refused, store.edit():
            store.add_person("Grace", embeddings)
        assert str(refused.value) == reason
    with pytest.raises(StoreError) as refused, store.edit():
        store.add_person("ada", unit(rng))
    assert str(refused.value) == (f"'Ada' is already enrolled in {path}: choose another name, or add the embeddings "
                                  "to that person")


def test_misuse_and_unreadable_paths_say_what_to_do(rng, tmp_path):
    path = tmp_path / "door" / "people.edgestore"
    path.parent.mkdir()
    with pytest.raises(ValueError) as refused:
        Store.open(path, fingerprint="")
    assert str(refused.value) == ("fingerprint must name the embedding model, e.g. '<onnx sha256>:<preprocessing "
                                  "version>'")
    store = enrol(path, {"Ada": unit(rng)})
    with pytest.raises(RuntimeError) as refused:
        store.add_person("Grace", unit(rng))
    assert str(refused.value) == "change the store inside `with store.edit():` so the change is locked and saved"
    with pytest.raises(StoreError) as refused:
        Store.open(tmp_path, fingerprint=FINGERPRINT)
    assert str(refused.value) == (f"cannot read store {tmp_path}: Is a directory; check the path and that this user "
                                  "may read it")
    path.parent.rename(tmp_path / "moved")
    path.parent.write_bytes(b"")  # where the store's folder was, now a file
    with pytest.raises(StoreError) as refused:
        store.reload_if_changed()
    assert str(refused.value) == (f"cannot read store {path}: Not a directory; check the path and that this user "
                                  "may read it")


def test_a_load_is_logged_as_one_line(path, rng, caplog):
    enrol(path, {"Ada": unit(rng, 2), **{f"p{i}": unit(rng) for i in range(TIMED_PERSONS)}})
    caplog.set_level(logging.DEBUG, logger="edge.store")
    open_store(path)
    fields = logged_fields(caplog, "store_loaded")
    assert {k: v for k, v in fields.items() if k != "load_ms"} == {
        "path": str(path), "persons": str(TIMED_PERSONS + 1), "rows": str(TIMED_PERSONS + 2),
        "encrypted": "False"}
    assert 0.0 < float(fields["load_ms"]) < 60_000.0


def test_a_store_may_keep_one_row_per_person_but_not_none(path, rng):
    with pytest.raises(ValueError) as refused:
        open_store(path, max_embeddings_per_person=0)
    assert str(refused.value) == "max_embeddings_per_person must be at least 1, got 0"
    store = open_store(path, max_embeddings_per_person=1)
    with store.edit():
        store.add_person("Ada", unit(rng, 2))
    assert len(store.rows("Ada")) == 1


def test_rows_already_of_unit_length_are_stored_bit_for_bit(path, rng):
    """Re-normalising them would change their last bits, and replicas of a store would drift apart."""
    almost = unit(rng, 3) * np.float32(1 + 5e-7)  # unit to within UNIT_NORM_TOLERANCE, not exactly
    assert not np.array_equal(almost, almost / np.linalg.norm(almost, axis=1, keepdims=True))
    assert np.array_equal(enrol(path, {"Ada": almost}).embeddings("Ada"), almost)
