"""The embedding store: enrolled persons with their unit 128-D embeddings in one file, matched 1:N in one product.

Guarantees and how they are kept:
- never lose or corrupt an enrolment: every save writes a temp file in the same folder, fsyncs it, renames it over
  the store and fsyncs the folder; a killed writer leaves the old file intact. Writers hold an exclusive flock on
  `<store>.lock` and reload the latest file before changing it, so two processes never drop each other's writes.
  Readers take no lock and never block. The previous file is kept as `<store>.bak` (one generation).
- never match embeddings of another model: the file is stamped with the caller's model fingerprint and refused
  under a different one.
- keep templates private: mode 0600; optional AES-256-GCM encryption at rest with a 32-byte key file; `remove()`
  also drops the person from `<store>.bak`. Freed disk blocks are not overwritten: use encryption where that matters.
- answer 1:N fast: one float32 matrix, rows grouped per person; each person is matched by one template, the
  re-normalised mean of their rows (chosen on LFW, README "Templates"), kept as a second matrix built on first use,
  so a query is one matrix product.

File format (little-endian):
    header     16 bytes: b"EDGESTOR", format version (u16), flags (u16, bit 0 = encrypted), 4 zero bytes
    plain      header, payload, SHA-256 of header + payload (detects truncation and corruption)
    encrypted  header, nonce (12 bytes), AES-256-GCM(payload) with the header as associated data (tag appended)
    payload    metadata length (u64), metadata JSON (space-padded so the matrix starts 16-byte aligned),
               embeddings as float32 (rows, 128), person i owning rows sum(counts[:i]) .. sum(counts[:i + 1])
The metadata is columnar ({"fingerprint", "dim", "ids", "names", "created_utc", "notes", "counts"}, and per row
"row_sources", "row_added_utc": where and when each embedding came from, as distinct values + an index per row)
so 100k persons load in a fraction of a second.
No pickle anywhere. A key file is 32 random bytes (see `generate_key`). Format 1 (no row columns) is read as
rows from "enrolment" dated at the person's creation, and written as format 2 on the next save.

A plain store opened with a key is read as is and encrypted on its next save (the migration path); its plaintext
`.bak` is then replaced by the encrypted file so no plaintext copy is left behind.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge.errors import StoreError
from edge.names import ID_HEX_DIGITS, MAX_NOTE_CHARS, clean_name, clean_text, name_key, shown
from edge.private import private_dir
from edge.types import Match

log = logging.getLogger(__name__)

EMBEDDING_DIM = 128
DEFAULT_MAX_EMBEDDINGS_PER_PERSON = 10
# Reported when there is no (second) person to compare with: twice the largest L2 distance between unit vectors (2),
# finite so it stays JSON-safe, and above every threshold so it can never be accepted.
ABSENT_DISTANCE_L2 = 4.0

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MIGRATED_ROW_SOURCE = "enrolment"  # rows of a format-1 store: their origin was not recorded
MAGIC = b"EDGESTOR"
HEADER = struct.Struct("<8sHH4x")
META_LENGTH = struct.Struct("<Q")
FLAG_ENCRYPTED = 1
MATRIX_ALIGN_BYTES = 16
CHECKSUM_BYTES = hashlib.sha256().digest_size
KEY_BYTES = 32
NONCE_BYTES = 12
GCM_TAG_BYTES = 16
FILE_MODE = 0o600
GROUP_OTHER_BITS = 0o077
TEMP_SUFFIX = ".tmp"
BACKUP_SUFFIX = ".bak"
LOCK_SUFFIX = ".lock"

ID_BYTES = ID_HEX_DIGITS // 2
# Below this length an embedding has no usable direction; refusing beats dividing by almost zero.
MIN_EMBEDDING_NORM = 1e-6
# Mean templates are built this many persons at a time (bounds the temporary copy of their rows).
TEMPLATE_CHUNK_PERSONS = 16384
# Dividing a float32 unit vector by its own norm again can move its last bits; rows this close to length 1 are kept.
UNIT_NORM_TOLERANCE = 1e-6
# The matrix buffer grows by this factor when persons are appended, so bulk enrolment stays linear.
GROWTH_FACTOR = 1.5


@dataclass(frozen=True)
class Person:
    """One enrolled person: random hex id, display name (unique ignoring case), creation time (ISO 8601, UTC)."""

    id: str
    name: str
    created_utc: str
    note: str | None
    embedding_count: int


@dataclass(frozen=True)
class Row:
    """One of a person's embeddings: its position among their rows (0 = oldest), where it came from, when (UTC)."""

    index: int
    source: str
    added_utc: str


class _Corrupt(Exception):
    """The file's bytes do not form a valid store; the message says what is wrong with them."""


class _Table:
    """Columnar contents: per-person metadata lists and all embeddings in one matrix, rows grouped per person."""

    def __init__(self, ids: list[str], names: list[str], created_utc: list[str], notes: list[str | None],
                 counts: list[int], matrix: np.ndarray, row_sources: list[str], row_added: list[str]) -> None:
        self.ids, self.names, self.created_utc, self.notes, self.counts = ids, names, created_utc, notes, counts
        self.row_sources, self.row_added = row_sources, row_added
        self._buffer = matrix  # may be a read-only view of the file's bytes; replaced before any in-place write
        self.rows = len(matrix)
        self._starts: np.ndarray | None = None
        self._templates: np.ndarray | None = None
        self._by_id: dict[str, int] | None = None
        self._by_name: dict[str, int] | None = None

    @classmethod
    def empty(cls) -> _Table:
        return cls([], [], [], [], [], np.empty((0, EMBEDDING_DIM), np.float32), [], [])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> np.ndarray:
        """All embeddings, C-contiguous float32 (rows, 128)."""
        return self._buffer[: self.rows]

    def starts(self) -> np.ndarray:
        """First row of every person (the reduceat offsets), cached until the next change."""
        if self._starts is None:
            counts = np.asarray(self.counts, dtype=np.int64)
            self._starts = np.cumsum(counts) - counts
        return self._starts

    def templates(self) -> np.ndarray:
        """One unit template per person, the re-normalised mean of their rows (persons, 128); cached until a change."""
        if self._templates is None:
            if self.rows == len(self):
                self._templates = self.matrix  # one row each: the rows are the templates
            else:
                self._templates = _mean_templates(self.matrix, self.starts(), np.asarray(self.counts))
        return self._templates

    def row_info(self, position: int) -> list[Row]:
        start = int(self.starts()[position])
        return [Row(i, self.row_sources[start + i], self.row_added[start + i]) for i in range(self.counts[position])]

    def person(self, position: int) -> Person:
        return Person(self.ids[position], self.names[position], self.created_utc[position], self.notes[position],
                      self.counts[position])

    def rows_of(self, position: int) -> np.ndarray:
        start = int(self.starts()[position])
        return self.matrix[start : start + self.counts[position]]

    def _index(self) -> tuple[dict[str, int], dict[str, int]]:
        """Positions by id and by case-folded name, built on first use (a kiosk that only matches never needs it)."""
        if self._by_id is None or self._by_name is None:
            self._by_id = {pid: i for i, pid in enumerate(self.ids)}
            self._by_name = {name_key(name): i for i, name in enumerate(self.names)}
        return self._by_id, self._by_name

    def locate(self, ref: str) -> int | None:
        """Position of the person whose id is `ref`, else whose name equals it ignoring case."""
        by_id, by_name = self._index()
        position = by_id.get(ref)
        return by_name.get(name_key(ref)) if position is None else position

    def position_of_name(self, name: str) -> int | None:
        return self._index()[1].get(name_key(name))

    def new_id(self) -> str:
        by_id = self._index()[0]
        while (person_id := secrets.token_hex(ID_BYTES)) in by_id:
            pass
        return person_id

    def append(self, person: Person, rows: np.ndarray, sources: list[str], added: str) -> None:
        by_id, by_name = self._index()
        by_id[person.id] = by_name[name_key(person.name)] = len(self.ids)
        self.ids.append(person.id)
        self.names.append(person.name)
        self.created_utc.append(person.created_utc)
        self.notes.append(person.note)
        self.counts.append(len(rows))
        self.row_sources += sources
        self.row_added += [added] * len(rows)
        needed = self.rows + len(rows)
        if not self._buffer.flags.writeable or needed > len(self._buffer):
            grown = np.empty((max(needed, int(len(self._buffer) * GROWTH_FACTOR)), EMBEDDING_DIM), np.float32)
            grown[: self.rows] = self.matrix
            self._buffer = grown
        self._buffer[self.rows : needed] = rows
        self.rows = needed
        self._starts = self._templates = None

    def set_rows(self, position: int, rows: np.ndarray | None, sources: list[str] = (), added: list[str] = ()) -> None:
        """Replace one person's embeddings with `rows` (and their sources and dates), or delete them when None."""
        start = int(self.starts()[position])
        end = start + self.counts[position]
        kept = [self.matrix[:start], self.matrix[end:]]
        if rows is not None:
            kept.insert(1, rows)
            self.counts[position] = len(rows)
        self.row_sources[start:end] = list(sources)
        self.row_added[start:end] = list(added)
        self._buffer = np.concatenate(kept)
        self.rows = len(self._buffer)
        self._starts = self._templates = None

    def row_columns(self, position: int) -> tuple[np.ndarray, list[str], list[str]]:
        """A person's rows, sources and dates (copies), oldest first."""
        start = int(self.starts()[position])
        end = start + self.counts[position]
        return self.matrix[start:end].copy(), self.row_sources[start:end], self.row_added[start:end]

    def delete(self, position: int) -> None:
        self.set_rows(position, None)
        for column in (self.ids, self.names, self.created_utc, self.notes, self.counts):
            del column[position]
        self._by_id = self._by_name = None

    def rename(self, position: int, name: str) -> None:
        by_name = self._index()[1]
        del by_name[name_key(self.names[position])]
        by_name[name_key(name)] = position
        self.names[position] = name


class Store:
    """Enrolled persons and their embeddings in one file; read without locks, changed only inside `edit()`."""

    def __init__(self, path: Path, *, fingerprint: str, key_path: Path | None, key: bytes | None,
                 max_embeddings_per_person: int) -> None:
        """Use `Store.open`; this only sets fields."""
        self.path = path
        self.fingerprint = fingerprint
        self.key_path = key_path
        self._key = key
        self.max_embeddings_per_person = max_embeddings_per_person
        self._table = _Table.empty()
        self._signature: tuple[int, int, int] | None = None
        self._encrypted_on_disk = False
        self._editing = False
        self._dirty = False
        self._erased = False

    @classmethod
    def open(cls, path: Path | str, *, fingerprint: str, key_path: Path | None = None,
             max_embeddings_per_person: int = DEFAULT_MAX_EMBEDDINGS_PER_PERSON) -> Store:
        """Load the store at `path` (a missing file is an empty store, created by the first save).

        `fingerprint` names the embedding model (e.g. "<onnx sha256>:<preprocessing version>"); a store enrolled
        under another one is refused. With `key_path` the store is decrypted on load and encrypted on save.
        """
        if not fingerprint:
            raise ValueError("fingerprint must name the embedding model, e.g. '<onnx sha256>:<preprocessing version>'")
        if max_embeddings_per_person < 1:
            raise ValueError(f"max_embeddings_per_person must be at least 1, got {max_embeddings_per_person}")
        key = None if key_path is None else _read_key(Path(key_path))
        store = cls(Path(path), fingerprint=fingerprint, key_path=None if key_path is None else Path(key_path),
                    key=key, max_embeddings_per_person=max_embeddings_per_person)
        store._load()
        return store

    # ---- reading ----------------------------------------------------------------------------------------------

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    @property
    def encrypted(self) -> bool:
        """Whether saves are encrypted (a key was given)."""
        return self._key is not None

    def __len__(self) -> int:
        return len(self._table)

    @property
    def embedding_count(self) -> int:
        return self._table.rows

    @property
    def persons(self) -> list[Person]:
        """Every person, in enrolment order."""
        table = self._table
        return [table.person(i) for i in range(len(table))]

    def find(self, person_ref: str) -> Person:
        """The person whose id is `person_ref`, else whose name equals it ignoring case; StoreError if none."""
        return self._table.person(self._position(person_ref))

    def embeddings(self, person_ref: str) -> np.ndarray:
        """A copy of one person's unit embeddings (k, 128), oldest first."""
        return self._table.rows_of(self._position(person_ref)).copy()

    def rows(self, person_ref: str) -> list[Row]:
        """Where and when each of a person's embeddings came from, oldest first (`people show`)."""
        return self._table.row_info(self._position(person_ref))

    def reload_if_changed(self) -> bool:
        """Re-read the file when another process replaced it (cheap stat: mtime, size, inode); True if reloaded."""
        if _stat_signature(self.path) == self._signature:
            return False
        self._load()
        return True

    # ---- matching ---------------------------------------------------------------------------------------------

    def match(self, queries: np.ndarray, *, threshold_l2: float, margin_l2: float) -> list[Match]:
        """1:N answer per query row: the best person when closer than `threshold_l2` and ahead by `margin_l2`.

        `candidate` (and `extra["candidate_id"]`) is the best person even when unknown, for logs. An empty store
        answers unknown at ABSENT_DISTANCE_L2 with margin 0; a single person's margin is ABSENT_DISTANCE_L2 - distance.
        """
        table = self._table
        unit = _unit_rows(queries)
        if len(table) == 0:
            return [Match(person=None, distance_l2=ABSENT_DISTANCE_L2, margin_l2=0.0) for _ in unit]
        best, best_l2, second_l2 = _two_nearest(table, unit)
        matches = []
        for position, distance, second in zip(best.tolist(), best_l2.tolist(), second_l2.tolist()):
            margin = second - distance
            name = table.names[position]
            accepted = distance < threshold_l2 and margin >= margin_l2
            matches.append(Match(person=name if accepted else None, distance_l2=distance, margin_l2=margin,
                                 candidate=name, extra={"candidate_id": table.ids[position]}))
        return matches

    def nearest(self, embedding: np.ndarray) -> tuple[Person | None, float]:
        """The person with the closest single row to one embedding and that L2 distance: the duplicate-enrolment
        check asks whether this face is enrolled anywhere, so any row counts, not only the template."""
        table = self._table
        if len(table) == 0:
            return None, ABSENT_DISTANCE_L2
        cosines = table.matrix @ _unit_rows(embedding)[0]
        row = int(cosines.argmax())
        person = int(np.searchsorted(table.starts(), row, side="right")) - 1
        return table.person(person), float(_l2_from_cosine(cosines[row]))

    # ---- changing ---------------------------------------------------------------------------------------------

    @contextmanager
    def edit(self) -> Iterator[Store]:
        """Lock, reload the latest file, let the block change the store, save atomically if the block succeeds.

        If the block raises, nothing is written and the store is reloaded from the unchanged file.
        """
        if self._editing:
            raise RuntimeError("Store.edit() is already active: make all changes inside one edit() block")
        with self._exclusive_lock():
            self.reload_if_changed()
            self._editing, self._dirty, self._erased = True, False, False
            try:
                yield self
                if self._dirty:
                    self._save()
            except BaseException:
                self._load()
                raise
            finally:
                self._editing = False

    def add_person(self, name: str, embeddings: np.ndarray, note: str | None = None,
                   sources: str | list[str] = "enrolment") -> Person:
        """Enrol a new person with 1..k embeddings (only the newest `max_embeddings_per_person` are kept);
        `sources` says where each came from (one text for all, or one per row), e.g. "photo obama.jpg"."""
        self._require_editing()
        name = clean_name(name)
        note = None if note is None else clean_text(note, "note", MAX_NOTE_CHARS)
        rows = _unit_rows(embeddings)
        sources = _row_sources(sources, len(rows))[-self.max_embeddings_per_person :]
        rows = rows[-self.max_embeddings_per_person :]
        table = self._table
        taken = table.position_of_name(name)
        if taken is not None:
            raise StoreError(f"{table.names[taken]!r} is already enrolled in {self.path}: choose another name, or "
                             "add the embeddings to that person")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        person = Person(table.new_id(), name, created, note, len(rows))
        table.append(person, rows, sources, created)
        self._dirty = True
        return person

    def add_embeddings(self, person_ref: str, embeddings: np.ndarray, sources: str | list[str] = "enrolment") -> Person:
        """Add embeddings to a person; the oldest are dropped beyond `max_embeddings_per_person`."""
        self._require_editing()
        position = self._position(person_ref)
        new = _unit_rows(embeddings)
        old_rows, old_sources, old_added = self._table.row_columns(position)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        keep = -self.max_embeddings_per_person
        self._table.set_rows(position, np.concatenate([old_rows, new])[keep:],
                             (old_sources + _row_sources(sources, len(new)))[keep:],
                             (old_added + [now] * len(new))[keep:])
        self._dirty = True
        return self._table.person(position)

    def forget_row(self, person_ref: str, index: int) -> Row:
        """Erase one of a person's embeddings (index as in `rows()`), also from the backup on save; a person's
        last row cannot go (remove the person instead)."""
        self._require_editing()
        position = self._position(person_ref)
        rows, sources, added = self._table.row_columns(position)
        if not 0 <= index < len(rows):
            raise StoreError(f"{shown(self._table.names[position])} has rows 0 to {len(rows) - 1}, not {index}: see "
                             "`python -m edge people show`")
        if len(rows) == 1:
            raise StoreError(f"row {index} is {shown(self._table.names[position])}'s only one: remove the person instead "
                             "(`python -m edge people remove`)")
        forgotten = Row(index, sources[index], added[index])
        keep = [i for i in range(len(rows)) if i != index]
        self._table.set_rows(position, rows[keep], [sources[i] for i in keep], [added[i] for i in keep])
        self._dirty = self._erased = True
        return forgotten

    def rename(self, person_ref: str, new_name: str) -> Person:
        """Give a person another display name (a change of case only is allowed)."""
        self._require_editing()
        position = self._position(person_ref)
        new_name = clean_name(new_name)
        taken = self._table.position_of_name(new_name)
        if taken not in (None, position):
            raise StoreError(f"cannot rename to {new_name!r}: {self._table.names[taken]!r} is already enrolled "
                             f"in {self.path}")
        self._table.rename(position, new_name)
        self._dirty = True
        return self._table.person(position)

    def remove(self, person_ref: str) -> Person:
        """Erase a person and their embeddings (from the store and from its backup, on save)."""
        self._require_editing()
        position = self._position(person_ref)
        person = self._table.person(position)
        self._table.delete(position)
        self._dirty = self._erased = True
        return person

    # ---- internals --------------------------------------------------------------------------------------------

    def _position(self, person_ref: str) -> int:
        position = self._table.locate(person_ref)
        if position is None:
            raise StoreError(f"no person {shown(person_ref)} (id or name) in {self.path}: list them with "
                             "`python -m edge people list`")
        return position

    def _require_editing(self) -> None:
        if not self._editing:
            raise RuntimeError("change the store inside `with store.edit():` so the change is locked and saved")

    def _load(self) -> None:
        """Read the file (or start empty when there is none) and swap the contents in one assignment."""
        try:
            with open(self.path, "rb") as file:
                signature = _signature(os.fstat(file.fileno()))
                data = file.read()
        except FileNotFoundError:
            self._table, self._signature, self._encrypted_on_disk = _Table.empty(), None, False
            return
        except OSError as err:
            raise StoreError(f"cannot read store {self.path}: {err.strerror or err}; check the path and that "
                             "this user may read it") from err
        started = time.perf_counter()
        try:
            table, encrypted = self._decode(data)
        except _Corrupt as err:
            raise StoreError(f"store {self.path} is corrupt ({err}); restore it from backup {self.backup_path} "
                             "or re-enrol") from None
        self._table, self._signature, self._encrypted_on_disk = table, signature, encrypted
        log.debug("store_loaded path=%s persons=%d rows=%d encrypted=%s load_ms=%.1f", self.path, len(table),
                  table.rows, encrypted, (time.perf_counter() - started) * 1e3)

    def _decode(self, data: bytes) -> tuple[_Table, bool]:
        """Check and unpack a file's bytes into a table; also says whether it was encrypted."""
        if len(data) < HEADER.size:
            raise _Corrupt(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, flags = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise _Corrupt("it does not start like an edge store")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"store {self.path} has format version {version}, this program reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}: use the edge release that wrote it")
        if flags & ~FLAG_ENCRYPTED:
            raise _Corrupt(f"unknown flags {flags:#x}")
        encrypted = bool(flags & FLAG_ENCRYPTED)
        payload = self._decrypt(data) if encrypted else _verified_plain_payload(data)
        meta, matrix = _split_payload(payload)
        stored = meta.get("fingerprint")
        if stored != self.fingerprint:
            raise StoreError(
                f"store {self.path} was enrolled with another model (store: {stored}, running: {self.fingerprint}); "
                f"re-enrol: move it aside (mv {self.path} {self.path}.old) and run "
                "`python -m edge enroll --from-dir PHOTOS_DIR`")
        return _table_from(meta, matrix, version), encrypted

    def _decrypt(self, data: bytes) -> memoryview:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if self._key is None:
            raise StoreError(f"store {self.path} is encrypted: pass its key file (key_path) to open it")
        if len(data) < HEADER.size + NONCE_BYTES + GCM_TAG_BYTES:
            raise _Corrupt(f"{len(data)} bytes, too short for an encrypted store")
        view = memoryview(data)
        nonce = view[HEADER.size : HEADER.size + NONCE_BYTES]
        try:
            return memoryview(AESGCM(self._key).decrypt(nonce, view[HEADER.size + NONCE_BYTES :], view[: HEADER.size]))
        except InvalidTag:
            raise StoreError(f"cannot decrypt store {self.path} with key {self.key_path}: wrong key or the file was "
                             f"modified; use the key it was saved with, or restore {self.backup_path}") from None

    def _encode(self) -> list[bytes | memoryview]:
        """The file's bytes as chunks (the matrix is not copied for plain stores)."""
        table = self._table
        meta = json.dumps({"fingerprint": self.fingerprint, "dim": EMBEDDING_DIM, "ids": table.ids,
                           "names": table.names, "created_utc": table.created_utc, "notes": table.notes,
                           "counts": table.counts, "row_sources": _packed(table.row_sources),
                           "row_added_utc": _packed(table.row_added)}, separators=(",", ":")).encode()
        meta += b" " * (-(META_LENGTH.size + len(meta)) % MATRIX_ALIGN_BYTES)
        matrix = memoryview(np.ascontiguousarray(table.matrix, dtype="<f4").reshape(-1).view(np.uint8))  # 0 rows too
        body = [META_LENGTH.pack(len(meta)), meta, matrix]
        if self._key is None:
            header = HEADER.pack(MAGIC, FORMAT_VERSION, 0)
            digest = hashlib.sha256(header)
            for chunk in body:
                digest.update(chunk)
            return [header, *body, digest.digest()]
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        header = HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_ENCRYPTED)
        nonce = os.urandom(NONCE_BYTES)
        return [header, nonce, AESGCM(self._key).encrypt(nonce, b"".join(body), header)]

    def _save(self) -> None:
        """Write the store atomically; `.bak` keeps the previous file unless that would keep erased templates."""
        started = time.perf_counter()
        chunks = self._encode()
        leaves_plaintext = self.encrypted and not self._encrypted_on_disk
        try:
            _remove_stale_temps(self.path)
            _write_atomically(self.path, chunks, backup=self.backup_path,
                              backup_previous=not (self._erased or leaves_plaintext))
            self._signature = _stat_signature(self.path)
        except OSError as err:
            raise StoreError(f"cannot write store {self.path}: {err.strerror or err}; check that its folder "
                             "exists, is writable by this user and has free space") from err
        self._encrypted_on_disk = self.encrypted
        log.info("store_saved path=%s persons=%d rows=%d encrypted=%s save_ms=%.1f", self.path, len(self._table),
                 self._table.rows, self.encrypted, (time.perf_counter() - started) * 1e3)

    @contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        """Hold an exclusive flock on `<store>.lock` (kept, never deleted: deleting lock files races)."""
        lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)
        try:
            private_dir(self.path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise StoreError(f"cannot lock store {self.path} ({lock_path}): {err.strerror or err}; check that its "
                             "folder exists and is writable by this user") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("store_lock_wait path=%s", lock_path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def generate_key(path: Path | str) -> Path:
    """Write a new random 32-byte key file (mode 0600); refuses to overwrite one, since its stores need it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        raise StoreError(f"key file {path} already exists; refusing to overwrite it, stores encrypted with it "
                         "would become unreadable") from None
    except OSError as err:
        raise StoreError(f"cannot create key file {path}: {err.strerror or err}") from err
    with os.fdopen(fd, "wb") as file:
        file.write(secrets.token_bytes(KEY_BYTES))
        file.flush()
        os.fsync(file.fileno())
    _fsync_dir(path.parent)
    return path


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as err:
        raise StoreError(f"cannot read key file {path}: {err.strerror or err}; create one with "
                         "edge.store.generate_key or fix the path") from err
    if len(key) != KEY_BYTES:
        raise StoreError(f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES} random bytes: "
                         "create one with edge.store.generate_key")
    mode = path.stat().st_mode & 0o777
    if mode & GROUP_OTHER_BITS:  # refused, as ssh refuses a private key that others may read, not merely warned
        raise StoreError(f"key file {path} has mode {mode:04o}: group or others may use it; make it private with "
                         f"`chmod 600 {path}`")
    return key


def _verified_plain_payload(data: bytes) -> memoryview:
    if len(data) < HEADER.size + CHECKSUM_BYTES:
        raise _Corrupt(f"{len(data)} bytes, too short for a store")
    view = memoryview(data)
    if hashlib.sha256(view[:-CHECKSUM_BYTES]).digest() != view[-CHECKSUM_BYTES:]:
        raise _Corrupt("checksum mismatch: the file is truncated or was modified")
    return view[HEADER.size : -CHECKSUM_BYTES]


def _split_payload(payload: memoryview) -> tuple[dict, memoryview]:
    """Metadata dict and the raw matrix bytes of a payload."""
    if len(payload) < META_LENGTH.size:
        raise _Corrupt("payload shorter than its length field")
    (meta_bytes,) = META_LENGTH.unpack_from(payload)
    matrix_start = META_LENGTH.size + meta_bytes
    if matrix_start > len(payload):
        raise _Corrupt("metadata runs past the end of the file")
    try:
        meta = json.loads(bytes(payload[META_LENGTH.size : matrix_start]))
    except ValueError as err:
        raise _Corrupt(f"unreadable metadata: {err}") from None
    if not isinstance(meta, dict):
        raise _Corrupt("metadata is not a JSON object")
    return meta, payload[matrix_start:]


def _table_from(meta: dict, matrix_bytes: memoryview, version: int = FORMAT_VERSION) -> _Table:
    """Check the columnar metadata against the matrix and wrap both (the matrix stays a view of the bytes).

    Format 1 has no row columns: its rows become MIGRATED_ROW_SOURCE, dated at their person's creation."""
    try:
        columns = [meta[key] for key in ("ids", "names", "created_utc", "notes", "counts")]
        dim = meta["dim"]
    except KeyError as err:
        raise _Corrupt(f"metadata lacks {err}") from None
    if not all(isinstance(column, list) for column in columns) or len({len(c) for c in columns}) != 1:
        raise _Corrupt("metadata columns are not lists of one length")
    if dim != EMBEDDING_DIM:
        raise _Corrupt(f"embeddings have {dim} dimensions, expected {EMBEDDING_DIM}")
    try:
        counts = np.asarray(columns[-1], dtype=np.int64)
    except (TypeError, ValueError):
        raise _Corrupt("embedding counts are not integers") from None
    expected_bytes = int(counts.sum()) * EMBEDDING_DIM * np.dtype("<f4").itemsize
    if (counts.size and counts.min() < 1) or expected_bytes != len(matrix_bytes):
        raise _Corrupt(f"{len(matrix_bytes)} bytes of embeddings, the metadata describes {expected_bytes}")
    matrix = np.frombuffer(matrix_bytes, dtype="<f4").reshape(-1, EMBEDDING_DIM).astype(np.float32, copy=False)
    if version == 1:
        sources = [MIGRATED_ROW_SOURCE] * len(matrix)
        added = [created for created, count in zip(columns[2], counts.tolist()) for _ in range(count)]
    else:
        sources, added = _unpacked(meta.get("row_sources")), _unpacked(meta.get("row_added_utc"))
        if not len(sources) == len(added) == len(matrix):
            raise _Corrupt("row sources and dates do not match the embeddings")
    return _Table(*columns[:-1], counts.tolist(), matrix, sources, added)


def _mean_templates(matrix: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Unit mean of each person's rows. Persons are summed in groups of equal row count (a gather and a sum per
    group, in chunks): np.add.reduceat over 100k segments of rows is several times slower."""
    templates = np.empty((len(starts), EMBEDDING_DIM), np.float32)
    for count in np.unique(counts):
        persons = np.flatnonzero(counts == count)
        for chunk in np.array_split(persons, max(1, len(persons) // TEMPLATE_CHUNK_PERSONS)):
            rows = starts[chunk][:, None] + np.arange(count)
            templates[chunk] = matrix[rows].sum(axis=1)
    # rows cancelling out (never seen from one face) leave a zero template: it then matches nothing instead of NaN
    return templates / np.maximum(np.linalg.norm(templates, axis=1, keepdims=True), MIN_EMBEDDING_NORM)


def _packed(column: list[str]) -> dict:
    """A per-row text column as its distinct values and one index per row (100k people × several rows load fast)."""
    values = list(dict.fromkeys(column))
    position = {value: i for i, value in enumerate(values)}
    return {"values": values, "index": [position[value] for value in column]}


def _unpacked(packed) -> list[str]:
    try:
        values, index = packed["values"], packed["index"]
        return [values[i] for i in index]
    except (TypeError, KeyError, IndexError):
        raise _Corrupt("row sources or dates are malformed") from None


def _two_nearest(table: _Table, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: best person's position, its L2 distance, and the second-best person's distance.

    One product of the person templates with all queries; for unit vectors d² = 2 − 2·cos, so the nearest person
    has the largest cosine. Two argmax passes find best and second best (cheaper than a partition for k = 2).
    """
    cosines = table.templates() @ unit.T  # (persons, queries)
    columns = np.arange(cosines.shape[1])
    best = cosines.argmax(axis=0)
    best_l2 = _l2_from_cosine(cosines[best, columns])
    if len(table) == 1:
        return best, best_l2, np.full_like(best_l2, ABSENT_DISTANCE_L2)
    cosines[best, columns] = -np.inf  # `cosines` is a temporary of this call
    return best, best_l2, _l2_from_cosine(cosines.max(axis=0))


def _l2_from_cosine(cosine: np.ndarray) -> np.ndarray:
    """L2 distance between unit vectors from their cosine, clipped at 0 against float32 rounding."""
    return np.sqrt(np.maximum(2.0 - 2.0 * cosine.astype(np.float64), 0.0))


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Embeddings as C-contiguous float32 (k, 128) rows of length 1; (128,) is taken as one row."""
    rows = np.asarray(embeddings, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"embeddings must have shape (k, {EMBEDDING_DIM}) with k >= 1, got {np.shape(embeddings)}")
    if not np.isfinite(rows).all():
        raise ValueError("embeddings contain NaN or infinity: the embedder produced invalid output")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms < MIN_EMBEDDING_NORM).any():
        raise ValueError("an embedding has length ~0 and no direction: the embedder produced invalid output")
    if (np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE).all():  # already unit: kept bit for bit (replicas stay identical)
        return np.ascontiguousarray(rows, dtype=np.float32)
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def _row_sources(sources: str | list[str], count: int) -> list[str]:
    """One cleaned source text per row: a single text is used for every row."""
    listed = [sources] * count if isinstance(sources, str) else list(sources)
    if len(listed) != count:
        raise ValueError(f"{len(listed)} sources for {count} embeddings")
    return [clean_text(source, "row source", MAX_NOTE_CHARS) for source in listed]


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the file, None when it does not exist."""
    try:
        return _signature(os.stat(path))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreError(f"cannot read store {path}: {err.strerror or err}; check the path and that this user "
                         "may read it") from err


def _write_atomically(path: Path, chunks: list[bytes | memoryview], *, backup: Path, backup_previous: bool) -> None:
    """Temp file (0600) + fsync, `backup` hard-linked, rename over `path`, fsync the folder.

    `backup` becomes the previous file when `backup_previous`, else the new one (dropping the old contents).
    The temp file is created by mkstemp, i.e. os.open(O_CREAT | O_EXCL, 0o600).
    """
    previous = _stat_or_none(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            if previous is not None and os.geteuid() == 0 and previous.st_uid != 0:
                # keep the service user's ownership when an admin edits with sudo
                os.fchown(file.fileno(), previous.st_uid, previous.st_gid)
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        if previous is not None or not backup_previous:
            _link_replace(path if backup_previous else temp, backup)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _link_replace(source: Path, target: Path) -> None:
    """Make `target` another name of `source` atomically (a copy on filesystems without hard links)."""
    if target.exists() and os.path.samefile(source, target):
        # Already one file (a writer was killed between linking the backup and renaming the new store). rename()
        # between two names of one file does nothing, so going on would leave the staging name behind.
        return
    staging = target.with_name(f".{target.name}.{secrets.token_hex(ID_BYTES)}{TEMP_SUFFIX}")
    try:
        os.link(source, staging)
    except OSError:
        with open(source, "rb") as src, open(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE),
                                             "wb") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(staging, target)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files left by killed writers; only safe while holding the store lock."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):  # store and backup temps
        stale.unlink(missing_ok=True)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _fsync_dir(directory: Path) -> None:
    """Make renames and new names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
