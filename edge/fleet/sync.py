"""A door as an offline-first replica of the fleet: push what changed here, pull what changed centrally, push the
decision log, in a thread beside the door loop that never waits for it.

The door's own store stays the only thing the door loop reads, so a cut or a slow database changes nothing there.
What changed locally (enrolment by button, CLI or web page; rename; removal; added templates) is found by comparing
the store with the replica state — a small SQLite file holding, per fleet person, the local id, name and template
digest last agreed with the centre, plus the version pulled and the last audit row pushed (the outbox cursor).
Every step is idempotent, so a link that drops half-way through is simply retried: no duplicates, no gaps.
"""
from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg

from edge.audit import AuditLog
from edge.config import FleetConfig
from edge.errors import EdgeError, FleetError, StoreError, first_line
from edge.fleet import central
from edge.store import Store

log = logging.getLogger("edge.fleet")

STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS replica (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (
    central_id TEXT PRIMARY KEY,
    local_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    digest TEXT NOT NULL
);
"""
AUDIT_BATCH_ROWS = 1000
LOCAL_CHECK_S = 0.5      # how often the agent looks for local changes (store file, new audit rows) between NOTIFYs
RETRY_MIN_S = 0.5        # first reconnect delay after the link drops; doubles up to the sync interval
REFUSED_RETRY_S = 60.0   # a refusal (other model, newer schema) is re-checked this rarely; the door stays local
STOP_WAIT_S = 10.0
# After an erasure the door loop may log the person once more before it reloads its store (edge.kiosk.STORE_CHECK_S):
# their local id is kept in memory this long so such rows are blanked too, here and centrally.
ERASED_GRACE_S = 10.0


def digest(rows: np.ndarray) -> str:
    """Identity of a person's templates (the exact float32 bytes)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes()).hexdigest()


@dataclass
class SyncReport:
    """What one sync did, for logs, the CLI and the simulator."""

    pushed: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)       # central ids now usable at this door
    updated: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    audit_pushed: int = 0
    version: int = 0

    def count(self, what: str) -> None:
        self.pushed[what] = self.pushed.get(what, 0) + 1

    def fields(self) -> dict:
        return {**{f"pushed_{k}": v for k, v in sorted(self.pushed.items())}, "refused": len(self.refused),
                "added": len(self.added), "updated": len(self.updated), "erased": len(self.erased),
                "audit_pushed": self.audit_pushed, "version": self.version}


class ReplicaState:
    """The door's side of the agreement with the centre (SQLite next to the store)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.executescript(STATE_SCHEMA)
        path.chmod(0o600)

    def get(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM replica WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def put(self, key: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO replica VALUES (?, ?)", (key, str(value)))

    def people(self) -> dict[str, tuple[str, str, str]]:
        """central id → (local id, name, digest)."""
        return {row[0]: row[1:] for row in self.db.execute("SELECT central_id, local_id, name, digest FROM people")}

    def agree(self, central_id: str, local_id: str, name: str, rows_digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO people VALUES (?, ?, ?, ?)", (central_id, local_id, name, rows_digest))

    def forget(self, central_id: str) -> None:
        self.db.execute("DELETE FROM people WHERE central_id = ?", (central_id,))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Many writes, one commit (one fsync instead of one per person)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class Replica:
    """One door's replica: `sync(conn)` runs one push → pull → audit round over an open connection."""

    def __init__(self, cfg: FleetConfig, *, store: Store, audit_path: Path | None) -> None:
        self.cfg = cfg
        self.door_id = cfg.door_id
        self.store = store
        self.audit_path = None if audit_path is None else Path(audit_path)
        self.state = ReplicaState(Path(cfg.state_path))
        self._store_seen: tuple | None = None  # the store file's signature after the last comparison
        self._full_check_at = float("-inf")
        # local id → (central id, name, monotonic time it is dropped) of people erased a moment ago
        self._erased: dict[str, tuple[str, str, float]] = {}

    def close(self) -> None:
        self.state.close()

    # ---- one round ----------------------------------------------------------------------------------------------

    def sync(self, conn: psycopg.Connection) -> SyncReport:
        """Check the fleet, then push local changes, pull central ones, push new audit rows; `conn` is autocommit."""
        report = SyncReport()
        with conn.transaction():
            central.check_schema(conn, self.cfg.schema_name)
            central.claim_fingerprint(conn, self.store.fingerprint)
        self._push_people(conn, report)
        self._pull(conn, report)
        self._push_audit(conn, report)
        report.version = self.state.get("version")
        with conn.transaction():
            central.touch_door(conn, self.door_id, self.store.fingerprint, report.version, self.state.get("audit_seq"))
        return report

    def local_changes_pending(self) -> bool:
        """Cheap check between NOTIFYs: did the store file change, or were decisions logged since the last push?"""
        return self._store_signature() != self._store_seen or self._last_audit_id() > self.state.get("audit_seq")

    # ---- push: local enrolments, renames, template additions and removals --------------------------------------

    def _push_people(self, conn: psycopg.Connection, report: SyncReport) -> None:
        """Compare the store with what was agreed and send the differences; skipped while the store file is as
        this replica last left it, except once per sync interval (a change racing our own save is caught then)."""
        now = time.monotonic()
        if self._store_signature() == self._store_seen and now - self._full_check_at < self.cfg.sync_interval_s:
            return
        self._full_check_at = now
        with self.state.transaction():
            self._push_differences(conn, report)
        self._store_seen = self._store_signature()

    def _push_differences(self, conn: psycopg.Connection, report: SyncReport) -> None:
        """Each central change commits on its own; the agreements recorded here commit together afterwards (a crash
        in between only makes the next round send the same, idempotent changes again)."""
        self.store.reload_if_changed()
        agreed = self.state.people()
        local = {person.id: person for person in self.store.persons}
        by_local = {local_id: central_id for central_id, (local_id, _, _) in agreed.items()}
        refused: list[str] = []  # local ids the centre will not take: their names belong to someone else
        for central_id, (local_id, name, rows_digest) in agreed.items():
            person = local.get(local_id)
            if person is None:  # removed here: erase everywhere
                with conn.transaction():
                    central.erase(conn, central_id, self.door_id)
                self.state.forget(central_id)
                report.count("erased")
                continue
            if person.name != name:
                try:
                    with conn.transaction():
                        if central.rename(conn, central_id, person.name, self.door_id):
                            report.count("renamed")
                except central.NameTaken as err:
                    self._refuse(report, f"rename of {name!r} to {person.name!r} refused: {err}")
                    self._rename_back(person.id, name)
                    continue
            rows = self.store.embeddings(local_id)
            rows_digest_now = digest(rows)
            if rows_digest_now != rows_digest:
                with conn.transaction():
                    if central.replace_templates(conn, central_id, rows, self.door_id):
                        report.count("templates")
            if (person.name, rows_digest_now) != (name, rows_digest):
                self.state.agree(central_id, local_id, person.name, rows_digest_now)
        for local_id, person in local.items():
            if local_id in by_local:
                continue
            rows = self.store.embeddings(local_id)
            try:
                with conn.transaction():
                    outcome = central.enrol(conn, person_id=local_id, name=person.name, note=person.note, rows=rows,
                                            source=self.door_id)
            except central.NameTaken as err:
                self._refuse(report, f"enrolment of {person.name!r} refused: {err}; removed at this door")
                refused.append(local_id)
                continue
            if outcome == "erased":
                refused.append(local_id)
                continue
            self.state.agree(local_id, local_id, person.name, digest(rows))
            report.count("enrolled")
        if refused:
            self._remove_local(refused)

    def _refuse(self, report: SyncReport, line: str) -> None:
        report.refused.append(line)
        log.warning("fleet_refused door=%s reason=%s", self.door_id, line)

    def _rename_back(self, local_id: str, name: str) -> None:
        with self.store.edit():
            self.store.rename(local_id, name)

    def _remove_local(self, local_ids: list[str]) -> None:
        with self.store.edit():
            removed = [self.store.remove(local_id) for local_id in local_ids]
        self._forget_in_audit([(person.id, person.name) for person in removed])

    # ---- pull ---------------------------------------------------------------------------------------------------

    def _pull(self, conn: psycopg.Connection, report: SyncReport) -> None:
        changes = central.changes_since(conn, self.state.get("version"))
        with self.state.transaction():
            if changes.people or changes.erased:
                self._apply(changes, report)
            self.state.put("version", changes.version)

    def _apply(self, changes: central.Changes, report: SyncReport) -> None:
        """Make the local store match the centre for the changed people, in one atomic store edit (the log entries
        of erased people are blanked by the audit push that follows)."""
        agreed = self.state.people()
        agreements: list[tuple[str, str, str, str]] = []
        with self.store.edit():
            for central_id in changes.erased:
                if central_id in agreed:
                    local_id = agreed.pop(central_id)[0]
                    if self._exists(local_id):
                        name = self.store.remove(local_id).name
                        self._erased[local_id] = (central_id, name, time.monotonic() + ERASED_GRACE_S)
                    report.erased.append(central_id)
            central_of = {local_id: central_id for central_id, (local_id, _, _) in agreed.items()}
            # someone removed here after this round compared the store stays removed: the next full comparison
            # (within a sync interval) erases them everywhere
            people = [person for person in changes.people
                      if person.id not in agreed or self._exists(agreed[person.id][0])]
            for person in people:
                self._make_way(person, central_of, report)
            for person in people:
                known = agreed.get(person.id)
                if known is not None:
                    local_id = known[0]
                    changed = self.store.find(local_id).name != person.name
                    if changed:
                        self.store.rename(local_id, person.name)
                    if digest(self.store.embeddings(local_id)) != digest(person.rows):
                        changed = True
                        self.store.remove(local_id)
                        local_id = self.store.add_person(person.name, person.rows, note=person.note).id
                    if changed:
                        report.updated.append(person.id)
                else:
                    local_id = self.store.add_person(person.name, person.rows, note=person.note).id
                    report.added.append(person.id)
                agreements.append((person.id, local_id, person.name, digest(self.store.embeddings(local_id))))
        for central_id in changes.erased:
            self.state.forget(central_id)
        for agreement in agreements:
            self.state.agree(*agreement)
        self._store_seen = self._store_signature()

    def _exists(self, local_id: str) -> bool:
        try:
            self.store.find(local_id)
        except StoreError:
            return False
        return True

    def _make_way(self, person: central.CentralPerson, central_of: dict[str, str], report: SyncReport) -> None:
        """Free `person.name` locally: a fleet person holding it is being renamed in this batch (moved aside for
        now); a local enrolment the centre has not taken yet loses the name (the centre is the truth)."""
        try:
            holder = self.store.find(person.name)
        except StoreError:
            return
        holder_central = central_of.get(holder.id)
        if holder_central == person.id:
            return
        if holder_central is None:
            self._refuse(report, f"local enrolment of {holder.name!r} dropped: the fleet gave the name to another "
                                 "person")
            self.store.remove(holder.id)
        else:
            self.store.rename(holder.id, f"{holder.name} (renaming {holder_central})"[:64])

    def _forget_in_audit(self, people: list[tuple[str, str]]) -> None:
        """Blank the log entries of these (local id, name) people at this door."""
        if not people or self.audit_path is None or not self.audit_path.exists():
            return
        audit = AuditLog(self.audit_path)
        try:
            for local_id, name in people:
                audit.forget_person(local_id, legacy_name=name)
        finally:
            audit.close()

    # ---- audit outbox -------------------------------------------------------------------------------------------

    def _audit_db(self) -> sqlite3.Connection | None:
        if self.audit_path is None or not self.audit_path.exists():
            return None
        return sqlite3.connect(f"file:{self.audit_path}?mode=ro", uri=True, timeout=STOP_WAIT_S)

    def _last_audit_id(self) -> int:
        db = self._audit_db()
        if db is None:
            return 0
        try:
            return db.execute("SELECT coalesce(max(id), 0) FROM decisions").fetchone()[0]
        except sqlite3.OperationalError:  # the door loop has not created the table yet
            return 0
        finally:
            db.close()

    def _push_audit(self, conn: psycopg.Connection, report: SyncReport) -> None:
        """Push decisions after the cursor in id order; the cursor moves only after the centre committed them."""
        erased = self._erased
        self._forget_in_audit([(local_id, name) for local_id, (_, name, _) in erased.items()])
        now = time.monotonic()  # dropped only after being forgotten at least once, however slow this round was
        self._erased = {local_id: kept for local_id, kept in erased.items() if kept[2] > now}
        db = self._audit_db()
        if db is None:
            return
        agreed = self.state.people()
        central_ids = {local_id: central_id for local_id, (central_id, _, _) in erased.items()}
        central_ids.update((local_id, central_id) for central_id, (local_id, _, _) in agreed.items())
        by_name = {name: central_id for central_id, (_, name, _) in agreed.items()}  # logs older than person ids
        try:
            has_ids = "person_id" in {row[1] for row in db.execute("PRAGMA table_info(decisions)")}
            while True:
                cursor = self.state.get("audit_seq")
                rows = db.execute("SELECT id, t_unix, event, person, track, frame, distance_l2, margin_l2, votes, "
                                  f"door_action, {'person_id' if has_ids else 'NULL'} FROM decisions WHERE id > ? "
                                  "ORDER BY id LIMIT ?", (cursor, AUDIT_BATCH_ROWS)).fetchall()
                if not rows:
                    return
                batch = [(seq, t, event, central_ids.get(local_id) if local_id else by_name.get(person), person, *rest)
                         for seq, t, event, person, *rest, local_id in rows]
                with conn.transaction():
                    report.audit_pushed += central.push_audit(conn, self.door_id, batch)
                self.state.put("audit_seq", rows[-1][0])
        except sqlite3.OperationalError:  # no decisions table yet
            return
        finally:
            db.close()

    def _store_signature(self) -> tuple | None:
        try:
            stat = self.store.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino


class FleetAgent:
    """The sync thread of a door: LISTEN for changes, sync on NOTIFY, on local changes and every sync interval;
    when the link is down it retries with backoff while the door goes on deciding from its local store."""

    def __init__(self, cfg: FleetConfig, *, dsn: str, store: Store, audit_path: Path | None,
                 on_synced=None) -> None:
        self.cfg, self.dsn = cfg, dsn
        self.replica = Replica(cfg, store=store, audit_path=audit_path)
        self.on_synced = on_synced or (lambda report: None)
        self.online = False
        self.last_error: str | None = None
        self.syncs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fleet-{cfg.door_id}", daemon=True)
        self._work: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None

    def start(self) -> FleetAgent:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_WAIT_S)
        self._disconnect()
        self.replica.close()

    def _connect(self) -> None:
        self._work = central.connect(self.dsn, self.cfg, autocommit=True)
        self._listen = central.connect(self.dsn, self.cfg, autocommit=True)
        self._listen.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"{self.cfg.schema_name}_changes")))

    def _disconnect(self) -> None:
        for conn in (self._work, self._listen):
            if conn is not None:
                conn.close()
        self._work = self._listen = None

    def _run(self) -> None:
        retry_s = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                if self._work is None:
                    self._connect()
                report = self.replica.sync(self._work)
                self.syncs += 1
                if not self.online or self.last_error:
                    log.info("fleet_online door=%s version=%d", self.cfg.door_id, report.version)
                self.online, self.last_error, retry_s = True, None, RETRY_MIN_S
                if report.added or report.erased or report.updated or report.pushed or report.audit_pushed:
                    log.info("fleet_synced door=%s %s", self.cfg.door_id,
                             " ".join(f"{k}={v}" for k, v in report.fields().items()))
                self.on_synced(report)
                self._wait_for_change()
            except FleetError as err:
                self._went_offline(str(err))
                retry_s = self._pause(retry_s, refused=not str(err).startswith("fleet database"))
            except (psycopg.Error, OSError) as err:
                self._went_offline(central.unreachable(self.dsn, err))
                retry_s = self._pause(retry_s, refused=False)
            except StoreError as err:
                self._went_offline(f"local store: {err}")
                retry_s = self._pause(retry_s, refused=False)

    def _went_offline(self, line: str) -> None:
        if line != self.last_error:
            log.warning("fleet_offline door=%s reason=%s", self.cfg.door_id, first_line(line))
        self.online, self.last_error = False, line
        self._disconnect()

    def _pause(self, retry_s: float, *, refused: bool) -> float:
        self._stop.wait(REFUSED_RETRY_S if refused else retry_s)
        return min(retry_s * 2, self.cfg.sync_interval_s)

    def _wait_for_change(self) -> None:
        """Until a NOTIFY arrives, local changes appear, the sync interval passes or stop() is called."""
        deadline = time.monotonic() + self.cfg.sync_interval_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if any(True for _ in self._listen.notifies(timeout=LOCAL_CHECK_S, stop_after=1)):
                for _ in self._listen.notifies(timeout=0):  # drain: one sync covers them all
                    pass
                return
            if self.replica.local_changes_pending():
                return


def start_agent(config, *, store_path: Path, audit_path: Path | None, fingerprint: str) -> FleetAgent | None:
    """The door service's sync thread, or None when no fleet is configured (or its DSN is unusable: then one line
    says why and the door runs on its local store alone)."""
    cfg = config.fleet
    if cfg.dsn is None and cfg.dsn_file is None:
        return None
    try:
        dsn = central.read_dsn(cfg)
    except EdgeError as err:
        log.warning("fleet_disabled door=%s reason=%s", cfg.door_id, err)
        return None
    store = Store.open(store_path, fingerprint=fingerprint, key_path=config.store.key_file,
                       max_embeddings_per_person=config.enroll.max_embeddings_per_person)
    return FleetAgent(cfg, dsn=dsn, store=store, audit_path=audit_path).start()
