"""The fleet's central side in PostgreSQL: connecting, migrating, and every change to people, templates, erasures
and the audit trail. Doors (sync.py), the CLI and the simulator all go through these functions.

Writes run inside the caller's transaction; the `stamp_version` trigger gives each changed person or tombstone the
next fleet version and wakes the doors with NOTIFY. Templates are `bytea` (128 little-endian float32): a door needs
the raw vectors for its own matrix anyway, so nothing is parsed or converted on the way (README, Fleet).
"""
from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from edge.config import FleetConfig
from edge.errors import ConfigError, FleetError, first_line
from edge.names import name_key
from edge.store import EMBEDDING_DIM

log = logging.getLogger("edge.fleet")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
TEMPLATE_DTYPE = np.dtype("<f4")
TEMPLATE_BYTES = EMBEDDING_DIM * TEMPLATE_DTYPE.itemsize
CENTRAL = "central"  # the `source` of templates and actions made at the centre, not at a door
NAME_CONSTRAINT = "people_name_key_key"
MS_PER_S = 1000


def migrations() -> list[tuple[int, Path]]:
    """(number, file) of every migration, oldest first: `NNN_what.sql`."""
    return sorted((int(path.name.split("_", 1)[0]), path) for path in MIGRATIONS_DIR.glob("[0-9]*_*.sql"))


SCHEMA_VERSION = migrations()[-1][0]


class NameTaken(Exception):
    """Another person already holds this name in the fleet; str() is the refusal."""


@dataclass(frozen=True)
class CentralPerson:
    id: str
    name: str
    note: str | None
    rows: np.ndarray  # (k, 128) float32


@dataclass(frozen=True)
class Changes:
    """Everything changed after a version: people as they are now, ids erased, and the version now reached."""

    people: list[CentralPerson]
    erased: list[str]
    version: int


# ---- connecting -------------------------------------------------------------------------------------------------

def read_dsn(cfg: FleetConfig) -> str:
    """The DSN from `fleet.dsn` or `fleet.dsn_file` (which must be private to this user: it holds a password)."""
    if cfg.dsn_file is None:
        if not cfg.dsn:
            raise ConfigError("fleet: set fleet.dsn (or fleet.dsn_file) to the fleet's PostgreSQL, e.g. "
                              "postgresql://door@server:5432/edge")
        return cfg.dsn
    try:
        mode = cfg.dsn_file.stat().st_mode
        text = cfg.dsn_file.read_text().strip()
    except OSError as err:
        raise ConfigError(f"fleet.dsn_file {cfg.dsn_file} cannot be read: {err.strerror or err}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"fleet.dsn_file {cfg.dsn_file} is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"it holds a password: chmod 600 {cfg.dsn_file}")
    if not text:
        raise ConfigError(f"fleet.dsn_file {cfg.dsn_file} is empty: put the PostgreSQL connection string in it")
    return text


def where(dsn: str) -> str:
    """The server a DSN names, without its password, for messages: user@host:port/dbname."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable DSN)"
    return (f"{parts.get('user', '')}{'@' if parts.get('user') else ''}{parts.get('host', 'localhost')}:"
            f"{parts.get('port', 5432)}/{parts.get('dbname', '')}")


def connect(dsn: str, cfg: FleetConfig, *, autocommit: bool = False) -> psycopg.Connection:
    """A connection with the fleet schema on its search path; a stalled link fails within the connect timeout."""
    timeout_s = max(1, round(cfg.connect_timeout_s))
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as err:
        raise FleetError(f"fleet.dsn is not a PostgreSQL connection string ({first_line(err)}); use e.g. "
                         "postgresql://door@server:5432/edge") from None
    try:
        return psycopg.connect(dsn, connect_timeout=timeout_s, options=f"-c search_path={cfg.schema_name}",
                               application_name=f"edge-door-{cfg.door_id}", keepalives=1, keepalives_idle=timeout_s,
                               keepalives_interval=1, keepalives_count=3, tcp_user_timeout=timeout_s * MS_PER_S,
                               autocommit=autocommit)
    except psycopg.OperationalError as err:
        raise FleetError(unreachable(dsn, err)) from None


def unreachable(dsn: str, err: Exception) -> str:
    """One line for a failed or lost connection: wrong password, no server, or the link went down."""
    reason = first_line(err).removeprefix("connection failed: ")
    lowered = reason.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return (f"fleet database {where(dsn)} refused the login ({reason.split('FATAL:')[-1].strip()}): check the "
                "user and password in fleet.dsn / fleet.dsn_file")
    if "does not exist" in lowered and "database" in lowered:
        return f"fleet database {where(dsn)} does not exist ({reason.split('FATAL:')[-1].strip()}): check fleet.dsn"
    return f"fleet database {where(dsn)} unreachable ({reason}); the door keeps deciding on its local store"


# ---- schema -----------------------------------------------------------------------------------------------------

def schema_version(conn: psycopg.Connection) -> int:
    """The migration the fleet schema is at; 0 when it has no fleet tables."""
    if conn.execute("SELECT to_regclass('fleet_meta')").fetchone()[0] is None:
        return 0
    row = conn.execute("SELECT value FROM fleet_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _refuse_newer(version: int, schema: str) -> None:
    if version > SCHEMA_VERSION:
        raise FleetError(f"fleet schema {schema} is at version {version}, newer than this edge release knows "
                         f"({SCHEMA_VERSION}): upgrade edge on this machine; nothing was changed")


def migrate(conn: psycopg.Connection, schema: str) -> tuple[int, int]:
    """Create or upgrade the fleet schema (safe to re-run, one migrator at a time); returns (before, after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"{schema}:migrate"])
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        before = schema_version(conn)
        _refuse_newer(before, schema)
        for number, path in migrations():
            if number > before:
                conn.execute(path.read_text())
                conn.execute("INSERT INTO fleet_meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE "
                             "SET value = EXCLUDED.value", [str(number)])
                log.info("fleet_migrated schema=%s version=%d file=%s", schema, number, path.name)
    return before, max(before, SCHEMA_VERSION)


def check_schema(conn: psycopg.Connection, schema: str) -> None:
    """Refuse a fleet this release cannot use: no tables yet, an older schema, or a newer one."""
    version = schema_version(conn)
    _refuse_newer(version, schema)
    if version == 0:
        raise FleetError(f"no fleet tables in schema {schema}: run `python -m edge fleet init` once")
    if version < SCHEMA_VERSION:
        raise FleetError(f"fleet schema {schema} is at version {version}, this release needs {SCHEMA_VERSION}: run "
                         "`python -m edge fleet init` to migrate it")


def claim_fingerprint(conn: psycopg.Connection, fingerprint: str) -> None:
    """The fleet's model is the first one to claim it; any other model is refused (templates never mix models)."""
    conn.execute("INSERT INTO fleet_meta VALUES ('fingerprint', %s) ON CONFLICT (key) DO NOTHING", [fingerprint])
    fleet = conn.execute("SELECT value FROM fleet_meta WHERE key = 'fingerprint'").fetchone()[0]
    if fleet != fingerprint:
        raise FleetError(f"the fleet's templates come from model {fleet}, this door runs {fingerprint}: refusing "
                         "them (no mixing of models); install the fleet's model here or use another fleet schema")


# ---- changes ----------------------------------------------------------------------------------------------------

def _template_bytes(rows: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(row, dtype=TEMPLATE_DTYPE).tobytes() for row in np.atleast_2d(rows)]


def _insert_templates(conn: psycopg.Connection, person_id: str, rows: np.ndarray, source: str) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO templates (person_id, position, embedding, source) VALUES (%s, %s, %s, %s)",
                        [(person_id, i, blob, source) for i, blob in enumerate(_template_bytes(rows))])


def _note_action(conn: psycopg.Connection, action: str, person_id: str | None, source: str,
                 detail: str | None = None) -> None:
    conn.execute("INSERT INTO admin_actions (door_id, action, person_id, detail) VALUES (%s, %s, %s, %s)",
                 [None if source == CENTRAL else source, action, person_id, detail])


def _name_taken(name: str) -> NameTaken:
    return NameTaken(f"the name {name!r} already belongs to another person in the fleet")


def enrol(conn: psycopg.Connection, *, person_id: str, name: str, note: str | None, rows: np.ndarray,
          source: str) -> str:
    """Add a person (id chosen by the caller, e.g. the door's local id). Returns 'enrolled', 'exists' (this id was
    pushed before) or 'erased' (this id was erased: never resurrected); NameTaken when the name is someone else's."""
    if conn.execute("SELECT 1 FROM erasures WHERE person_id = %s", [person_id]).fetchone():
        return "erased"
    if conn.execute("SELECT 1 FROM people WHERE id = %s", [person_id]).fetchone():
        return "exists"
    try:
        with conn.transaction():
            conn.execute("INSERT INTO people (id, name, name_key, note, origin_door) VALUES (%s, %s, %s, %s, %s)",
                         [person_id, name, name_key(name), note, None if source == CENTRAL else source])
    except psycopg.errors.UniqueViolation as err:
        if err.diag.constraint_name == NAME_CONSTRAINT:
            _note_action(conn, "enrol_refused", None, source, f"name {name!r} taken")
            raise _name_taken(name) from None
        raise
    _insert_templates(conn, person_id, rows, source)
    _note_action(conn, "enrol", person_id, source)
    return "enrolled"


def enrol_many(conn: psycopg.Connection, people: list[tuple[str, str, np.ndarray]], source: str = CENTRAL) -> None:
    """Bulk enrolment (id, name, rows) by COPY, for seeding a fleet; one transaction, one NOTIFY."""
    with conn.cursor() as cur:
        with cur.copy("COPY people (id, name, name_key, origin_door) FROM STDIN") as copy:
            for person_id, name, _ in people:
                copy.write_row((person_id, name, name_key(name), None if source == CENTRAL else source))
        with cur.copy("COPY templates (person_id, position, embedding, source) FROM STDIN") as copy:
            for person_id, _, rows in people:
                for i, blob in enumerate(_template_bytes(rows)):
                    copy.write_row((person_id, i, blob, source))
    _note_action(conn, "enrol_bulk", None, source, f"{len(people)} people")


def rename(conn: psycopg.Connection, person_id: str, name: str, source: str) -> bool:
    """Rename a person; False when they no longer exist (erased); NameTaken when the name is someone else's."""
    try:
        with conn.transaction():
            cursor = conn.execute("UPDATE people SET name = %s, name_key = %s WHERE id = %s",
                                  [name, name_key(name), person_id])
    except psycopg.errors.UniqueViolation as err:
        if err.diag.constraint_name == NAME_CONSTRAINT:
            _note_action(conn, "rename_refused", person_id, source, f"name {name!r} taken")
            raise _name_taken(name) from None
        raise
    if cursor.rowcount:
        _note_action(conn, "rename", person_id, source)
    return bool(cursor.rowcount)


def replace_templates(conn: psycopg.Connection, person_id: str, rows: np.ndarray, source: str) -> bool:
    """Make `rows` the person's templates (a door added some); False when the person no longer exists."""
    if not conn.execute("UPDATE people SET version = 0 WHERE id = %s", [person_id]).rowcount:  # trigger re-stamps
        return False
    conn.execute("DELETE FROM templates WHERE person_id = %s", [person_id])
    _insert_templates(conn, person_id, rows, source)
    _note_action(conn, "templates", person_id, source, f"{len(np.atleast_2d(rows))} templates")
    return True


def erase(conn: psycopg.Connection, person_id: str, source: str) -> bool:
    """Right to be forgotten, fleet-wide: drop the person and templates, blank their audit rows, leave a tombstone
    that every door applies. True when the person existed."""
    existed = bool(conn.execute("DELETE FROM people WHERE id = %s", [person_id]).rowcount)
    conn.execute("INSERT INTO erasures (person_id, by_door) VALUES (%s, %s) ON CONFLICT (person_id) DO NOTHING",
                 [person_id, None if source == CENTRAL else source])
    conn.execute("UPDATE audit SET person = NULL, person_id = NULL WHERE person_id = %s", [person_id])
    _note_action(conn, "erase", person_id, source)
    return existed


def find_person(conn: psycopg.Connection, ref: str) -> tuple[str, str]:
    """(id, name) of the person whose id is `ref`, else whose name equals it ignoring case."""
    row = conn.execute("SELECT id, name FROM people WHERE id = %s OR name_key = %s ORDER BY id = %s DESC LIMIT 1",
                       [ref, name_key(ref), ref]).fetchone()
    if row is None:
        raise FleetError(f"no person {ref!r} (id or name) in the fleet: list them with `python -m edge fleet status`")
    return row


def changes_since(conn: psycopg.Connection, version: int) -> Changes:
    """People changed and ids erased after `version`, read in one snapshot so nothing is seen half-done."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        people = conn.execute("SELECT id, name, note, version FROM people WHERE version > %s ORDER BY version",
                              [version]).fetchall()
        templates: dict[str, list[bytes]] = {}
        for person_id, blob in conn.execute(
                "SELECT t.person_id, t.embedding FROM templates t JOIN people p ON p.id = t.person_id "
                "WHERE p.version > %s ORDER BY t.person_id, t.position", [version]):
            templates.setdefault(person_id, []).append(blob)
        erased = conn.execute("SELECT person_id, version FROM erasures WHERE version > %s ORDER BY version",
                              [version]).fetchall()
    reached = max([version, *(row[3] for row in people), *(row[1] for row in erased)])
    return Changes(
        people=[CentralPerson(pid, name, note, np.frombuffer(b"".join(templates[pid]), TEMPLATE_DTYPE)
                              .reshape(-1, EMBEDDING_DIM)) for pid, name, note, _ in people if pid in templates],
        erased=[row[0] for row in erased], version=reached)


AUDIT_COLUMNS = ("local_seq", "t_unix", "event", "person_id", "person", "track", "frame", "distance_l2", "margin_l2",
                 "votes", "door_action")


def push_audit(conn: psycopg.Connection, door_id: str, rows: list[tuple]) -> int:
    """Append a door's audit rows (AUDIT_COLUMNS order); rows pushed before are skipped. Returns rows added."""
    if not rows:
        return 0
    before = conn.execute("SELECT count(*) FROM audit WHERE door_id = %s", [door_id]).fetchone()[0]
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO audit (door_id, {', '.join(AUDIT_COLUMNS)}) VALUES "
                        f"(%s, {', '.join(['%s'] * len(AUDIT_COLUMNS))}) ON CONFLICT (door_id, local_seq) DO NOTHING",
                        [(door_id, *row) for row in rows])
    return conn.execute("SELECT count(*) FROM audit WHERE door_id = %s", [door_id]).fetchone()[0] - before


def touch_door(conn: psycopg.Connection, door_id: str, fingerprint: str, applied_version: int, audit_seq: int) -> None:
    conn.execute("INSERT INTO doors (door_id, fingerprint, applied_version, audit_seq) VALUES (%s, %s, %s, %s) "
                 "ON CONFLICT (door_id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, last_seen = now(), "
                 "applied_version = EXCLUDED.applied_version, audit_seq = EXCLUDED.audit_seq",
                 [door_id, fingerprint, applied_version, audit_seq])


def status(conn: psycopg.Connection) -> dict:
    """The fleet at a glance: schema, model, counts, and every door's lag behind the latest version."""
    def scalar(query: str):
        return conn.execute(query).fetchone()[0]

    version = scalar("SELECT coalesce(max(v), 0) FROM (SELECT max(version) v FROM people UNION ALL "
                     "SELECT max(version) FROM erasures) AS latest")
    doors = [{"door_id": door, "fingerprint": fingerprint, "last_seen": seen.isoformat(timespec="seconds"),
              "applied_version": applied, "behind": version - applied, "audit_seq": audit_seq}
             for door, fingerprint, seen, applied, audit_seq in
             conn.execute("SELECT door_id, fingerprint, last_seen, applied_version, audit_seq FROM doors ORDER BY 1")]
    return {"schema_version": schema_version(conn),
            "fingerprint": scalar("SELECT max(value) FROM fleet_meta WHERE key = 'fingerprint'"),
            "version": version, "people": scalar("SELECT count(*) FROM people"),
            "templates": scalar("SELECT count(*) FROM templates"), "erasures": scalar("SELECT count(*) FROM erasures"),
            "audit_rows": scalar("SELECT count(*) FROM audit"), "doors": doors}
