"""The fleet sync's promises (edge/fleet/sync.py), pinned in this process against the real PostgreSQL: what one round
pushes, pulls and leaves in the door's log, what the replica state keeps, and what the thread beside the door loop
does when the link is up, cut, refused or the local store is broken. tests/test_fleet.py shows the whole fleet
working (partly through child processes); these pin each promise where sync.py makes it, so that a changed line
fails a test here.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from test_fleet import FINGERPRINT, door, fleet, people, pg_dsn, sync  # noqa: F401  (fleet, pg_dsn: fixtures)
from test_kiosk import embedding_of

from edge.audit import AuditLog
from edge.config import Config, FleetConfig
from edge.decide import Decision
from edge.errors import FleetError
from edge.fleet import central
from edge.fleet.sim import FaultProxy, host_port
from edge.fleet.sync import AUDIT_BATCH_ROWS, FleetAgent, Replica, SyncReport, digest, start_agent
from edge.store import Store, generate_key

ALICE, BOB, CAROL, DAVE, GHOST = "a11ce0000000", "b0b000000000", "ca7010000000", "da7e00000000", "9405700000ee"
AGENT_WAIT_S = 5.0       # what should happen within a second or two; a mutant that never gets there fails here
NOTIFY_LATENCY_S = 0.9   # a NOTIFY wakes the agent at once: well under a second even on a busy machine
QUIET_S = 1.0            # two local checks (LOCAL_CHECK_S) with nothing to do: no sync
STOP_S = 3.0             # stop() ends a wait of any length at once
PAUSED_S = 0.2           # well within the first retry pause (RETRY_MIN_S)


# ---- helpers ----------------------------------------------------------------------------------------------------

def decision(person: str | None, *, event: str = "unlock") -> Decision:
    """A decision whose numbers float32 keeps exactly (the centre stores distances as `real`)."""
    return Decision(event=event, person=person, track=7, frame=42, t_s=0.0, distance_l2=0.25, margin_l2=0.5, votes=3,
                    first_frame=40, box=(0, 0, 1, 1))


def rows_of(*codes: int) -> np.ndarray:
    return np.stack([embedding_of(code) for code in codes])


def enrol_centrally(admin, person_id: str, name: str, rows: np.ndarray, note: str | None = None) -> None:
    with admin.transaction():
        central.enrol(admin, person_id=person_id, name=name, note=note, rows=rows, source=central.CENTRAL)


def central_templates(admin, person_id: str) -> bytes:
    return b"".join(row[0] for row in admin.execute(
        "SELECT embedding FROM templates WHERE person_id = %s ORDER BY position", [person_id]))


def central_people(admin) -> list[tuple]:
    """(id, name) of the fleet's people by name in code point order (whatever the server's collation)."""
    return sorted(admin.execute("SELECT id, name FROM people").fetchall(), key=lambda row: row[1])


def actions(admin) -> list[tuple]:
    return sorted(admin.execute("SELECT action, door_id, person_id FROM admin_actions").fetchall())


def central_log(admin, door_id: str = "d1") -> list[tuple]:
    return admin.execute("SELECT local_seq, t_unix, event, person_id, person, track, frame, distance_l2, margin_l2, "
                         "votes, door_action FROM audit WHERE door_id = %s ORDER BY local_seq", [door_id]).fetchall()


def local_log(path: Path) -> list[tuple]:
    log = AuditLog(path)
    try:
        return [(row["person"], row["person_id"]) for row in log.rows()]
    finally:
        log.close()


def record(path: Path, *entries: tuple[str | None, str | None]) -> None:
    """Log (name, person id) decisions as the door loop does; (name, None) is a row from before rows carried ids."""
    log = AuditLog(path)
    for name, person_id in entries:
        log.record(decision(name, event="unlock" if name else "unknown"), door_action="pulse" if name else "none",
                   person_id=person_id)
    log.close()


def fleet_lines(caplog, event: str) -> list[str]:
    """The operator's key=value lines of one event, in order."""
    return [r.getMessage() for r in caplog.records if r.name == "edge.fleet" and r.getMessage().startswith(event + " ")]


def quiet(version: int) -> dict:
    """The fields of a round that changed nothing."""
    return {"refused": 0, "added": 0, "updated": 0, "erased": 0, "audit_pushed": 0, "version": version}


def only_here(door_cfg) -> str:
    """A door id no other test (or test process sharing the server) uses: the fleet schema's own name."""
    return door_cfg("x").schema_name


def sessions(pg_dsn: str, door_id: str, *, waiting: bool = False) -> int:
    """The door's open sessions at the server (only those waiting on a lock when `waiting`)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND (NOT %s OR "
                            "wait_event_type = 'Lock')", [f"edge-door-{door_id}", waiting]).fetchone()[0]


class Recorder:
    """The on_synced callback: every report, when it came and on which thread."""

    def __init__(self) -> None:
        self.reports: list[SyncReport] = []
        self.times: list[float] = []
        self.threads: set[tuple[str, bool]] = set()

    def __call__(self, report: SyncReport) -> None:
        thread = threading.current_thread()
        self.threads.add((thread.name, thread.daemon))
        self.times.append(time.monotonic())
        self.reports.append(report)

    def wait_for(self, predicate, *, after: int = 0, timeout_s: float = AGENT_WAIT_S) -> int:
        """Index of the first report after `after` that satisfies `predicate`."""
        found: list[int] = []

        def seen() -> bool:
            found[:] = [i for i in range(after, len(self.reports)) if predicate(self.reports[i])][:1]
            return bool(found)

        assert wait_until(seen, timeout_s), [r.fields() for r in self.reports[after:]]
        return found[0]


def agent_for(door_cfg, tmp_path: Path, door_id: str = "d1", *, dsn: str | None = None,
              **changes) -> tuple[FleetAgent, Recorder, Store]:
    """An agent (not started) for a door of the test's fleet, with its own store and a Recorder as on_synced."""
    cfg = door_cfg(door_id, **changes)
    store = Store.open(tmp_path / door_id / "store.edgestore", fingerprint=FINGERPRINT)
    recorder = Recorder()
    agent = FleetAgent(cfg, dsn=dsn or cfg.dsn, store=store, audit_path=tmp_path / door_id / "audit.sqlite",
                       on_synced=recorder)
    return agent, recorder, store


def replace(path: Path, data: bytes) -> None:
    """Write a file whole, as the store does (a reader never sees it half-written)."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)


def stopped_in_time(agent: FleetAgent) -> bool:
    started = time.monotonic()
    agent.stop()
    return time.monotonic() - started < STOP_S


# ---- what one round reports -------------------------------------------------------------------------------------

def test_sync_report_fields_are_the_keys_fleet_sync_json_prints_in_order():
    report = SyncReport(refused=["r"] * 3, added=["a"] * 4, updated=["u"] * 5, erased=["e"] * 6, audit_pushed=7,
                        version=8)
    for what in ("templates", "enrolled", "renamed", "enrolled"):
        report.count(what)
    assert list(report.fields().items()) == [
        ("pushed_enrolled", 2), ("pushed_renamed", 1), ("pushed_templates", 1), ("refused", 3), ("added", 4),
        ("updated", 5), ("erased", 6), ("audit_pushed", 7), ("version", 8)]
    assert SyncReport().fields() == quiet(0)


def test_a_digest_is_the_sha256_of_the_exact_little_endian_float32_bytes():
    rows = rows_of(1, 2)
    assert digest(rows) == hashlib.sha256(rows.astype("<f4").tobytes()).hexdigest()
    assert digest(rows.astype(np.float64)) == digest(rows)
    assert digest(rows[:1]) != digest(rows)


def test_the_replica_state_is_private_made_with_its_folders_and_survives_a_restart(fleet, tmp_path):
    door_cfg, admin = fleet
    cfg = door_cfg("d1").model_copy(update={"state_path": tmp_path / "state" / "deep" / "fleet.sqlite"})
    store = Store.open(tmp_path / "d1" / "store.edgestore", fingerprint=FINGERPRINT)
    audit_path = tmp_path / "d1" / "audit.sqlite"
    replica = Replica(cfg, store=store, audit_path=audit_path)
    with store.edit():
        alice = store.add_person("alice", embedding_of(1))
    enrol_centrally(admin, BOB, "bob", embedding_of(2))
    record(audit_path, (None, None))
    first = sync(replica, cfg)
    assert (first.pushed, first.added, first.audit_pushed) == ({"enrolled": 1}, [BOB], 1)
    assert cfg.state_path.stat().st_mode & 0o777 == 0o600
    agreed = replica.state.people()
    assert set(agreed) == {alice.id, BOB}
    replica.close()

    again = Replica(cfg, store=store, audit_path=audit_path)
    assert again.state.people() == agreed
    assert (again.state.get("version"), again.state.get("audit_seq")) == (first.version, 1)
    assert again.state.get("no such key", 7) == 7
    assert sync(again, cfg).fields() == quiet(first.version)  # nothing sent or taken twice
    again.close()


def test_each_round_records_the_doors_model_version_and_log_cursor_centrally(fleet, tmp_path):
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        store.add_person("alice", embedding_of(1))
    enrol_centrally(admin, BOB, "bob", embedding_of(2))
    record(tmp_path / "d1" / "audit.sqlite", (None, None), (None, None))
    report = sync(replica, door_cfg("d1"))
    latest = admin.execute("SELECT max(version) FROM people").fetchone()[0]
    assert report.version == latest > 0
    assert admin.execute("SELECT door_id, fingerprint, applied_version, audit_seq FROM doors").fetchall() == [
        ("d1", FINGERPRINT, latest, 2)]


def test_a_round_refuses_a_fleet_schema_this_release_cannot_use_and_names_it(fleet, tmp_path):
    door_cfg, admin = fleet
    schema = door_cfg("d1").schema_name
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        store.add_person("alice", embedding_of(1))
    admin.execute("UPDATE fleet_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(FleetError, match=f"^fleet schema {schema} is at version 999, newer than this edge release"):
        sync(replica, door_cfg("d1"))
    assert central_people(admin) == [] and [p.name for p in store.persons] == ["alice"]


# ---- push: what changed at this door ------------------------------------------------------------------------------

def test_local_enrolments_reach_the_centre_with_id_name_note_and_exact_templates(fleet, tmp_path):
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        alice = store.add_person("alice", rows_of(1, 11), note="front desk")
        bob = store.add_person("bob", embedding_of(2))
    report = sync(replica, door_cfg("d1"))
    assert (report.pushed, report.refused, report.added, report.updated) == ({"enrolled": 2}, [], [], [])
    assert admin.execute("SELECT id, name, note, origin_door FROM people ORDER BY name").fetchall() == [
        (alice.id, "alice", "front desk", "d1"), (bob.id, "bob", None, "d1")]
    assert central_templates(admin, alice.id) == store.embeddings(alice.id).astype("<f4").tobytes()
    assert replica.state.people() == {alice.id: (alice.id, "alice", digest(store.embeddings(alice.id))),
                                      bob.id: (bob.id, "bob", digest(store.embeddings(bob.id)))}
    assert actions(admin) == sorted([("enrol", "d1", alice.id), ("enrol", "d1", bob.id)])
    assert sync(replica, door_cfg("d1")).pushed == {}
    assert len(actions(admin)) == 2


def test_local_removals_renames_and_added_templates_are_all_pushed_in_one_round(fleet, tmp_path):
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        alice = store.add_person("alice", embedding_of(1))
        bob = store.add_person("bob", embedding_of(2))
        carol = store.add_person("carol", embedding_of(3))
    sync(replica, door_cfg("d1"))
    with store.edit():
        store.remove("alice")  # the first agreed person: the others are still looked at
        store.rename("bob", "Robert")
        store.add_embeddings("carol", embedding_of(33))
        dave = store.add_person("dave", embedding_of(4))  # new, after people already agreed
    report = sync(replica, door_cfg("d1"))
    assert report.pushed == {"erased": 1, "renamed": 1, "templates": 1, "enrolled": 1}
    assert report.erased == []  # this door's own removal is not reported back as one from the fleet
    assert central_people(admin) == [(bob.id, "Robert"), (carol.id, "carol"), (dave.id, "dave")]
    assert central_templates(admin, carol.id) == store.embeddings(carol.id).astype("<f4").tobytes()
    assert admin.execute("SELECT person_id, by_door FROM erasures").fetchall() == [(alice.id, "d1")]
    assert [a for a in actions(admin) if a[0] != "enrol"] == [
        ("erase", "d1", alice.id), ("rename", "d1", bob.id), ("templates", "d1", carol.id)]
    assert replica.state.people() == {person.id: (person.id, person.name, digest(store.embeddings(person.id)))
                                      for person in store.persons}
    assert sorted(p.name for p in store.persons) == ["Robert", "carol", "dave"]
    assert sync(replica, door_cfg("d1")).pushed == {}


def test_a_refused_rename_is_put_back_locally(fleet, tmp_path, caplog):
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        alice = store.add_person("alice", embedding_of(1))
        store.add_person("bob", embedding_of(2))
    sync(replica, door_cfg("d1"))
    enrol_centrally(admin, CAROL, "carol", embedding_of(3))
    with store.edit():
        store.rename("alice", "Carol")  # taken in the fleet meanwhile (names are unique ignoring case)
        store.add_embeddings("bob", embedding_of(22))  # the next person is still pushed
    caplog.set_level(logging.INFO, logger="edge.fleet")
    report = sync(replica, door_cfg("d1"))
    line = "rename of 'alice' to 'Carol' refused: the name 'Carol' already belongs to another person in the fleet"
    assert report.refused == [line] and report.pushed == {"templates": 1} and report.added == [CAROL]
    assert fleet_lines(caplog, "fleet_refused") == [f"fleet_refused door=d1 reason={line}"]
    assert store.find(alice.id).name == "alice" and sorted(people(store)) == ["alice", "bob", "carol"]
    assert central_people(admin) == [(alice.id, "alice"), (store.find("bob").id, "bob"), (CAROL, "carol")]
    again = sync(replica, door_cfg("d1"))
    assert (again.pushed, again.refused) == ({}, [])
    assert store.find(alice.id).name == "alice"


def test_an_enrolment_refused_for_its_name_is_removed_here_with_its_log_entries(fleet, tmp_path, caplog):
    door_cfg, admin = fleet
    enrol_centrally(admin, CAROL, "Carol", embedding_of(3))
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        carol_here = store.add_person("carol", embedding_of(4))  # another face under a name the fleet has given
        dave = store.add_person("dave", embedding_of(5))
    audit_path = tmp_path / "d1" / "audit.sqlite"
    record(audit_path, ("carol", carol_here.id), ("dave", dave.id))
    caplog.set_level(logging.INFO, logger="edge.fleet")
    report = sync(replica, door_cfg("d1"))
    line = ("enrolment of 'carol' refused: the name 'carol' already belongs to another person in the fleet; removed "
            "at this door")
    assert (report.refused, report.pushed, report.added) == ([line], {"enrolled": 1}, [CAROL])
    assert fleet_lines(caplog, "fleet_refused") == [f"fleet_refused door=d1 reason={line}"]
    assert np.allclose(people(store)["Carol"], embedding_of(3)) and sorted(people(store)) == ["Carol", "dave"]
    assert local_log(audit_path) == [(None, None), ("dave", dave.id)]
    assert [row[3:5] for row in central_log(admin)] == [(None, None), (dave.id, "dave")]


def test_a_door_never_brings_back_someone_erased_in_the_fleet(fleet, tmp_path):
    """E.g. a door restored from an old backup: its copy of an erased person is removed here, log entries too."""
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        eve = store.add_person("eve", embedding_of(6))
        frank = store.add_person("frank", embedding_of(7))
    with admin.transaction():
        central.erase(admin, eve.id, central.CENTRAL)
    audit_path = tmp_path / "d1" / "audit.sqlite"
    record(audit_path, ("eve", eve.id), ("eve", None), ("frank", frank.id))
    report = sync(replica, door_cfg("d1"))
    assert (report.pushed, report.refused, report.erased) == ({"enrolled": 1}, [], [])
    assert [p.name for p in store.persons] == ["frank"]
    assert central_people(admin) == [(frank.id, "frank")]
    assert local_log(audit_path) == [(None, None), (None, None), ("frank", frank.id)]


def test_an_unchanged_store_is_compared_again_only_once_per_sync_interval(fleet, tmp_path):
    """An agreement dropped behind the replica's back stands for a change the store file's signature cannot show
    (one racing the replica's own save): it is found by the full comparison due once per sync interval."""
    door_cfg, admin = fleet
    replica, store = door(door_cfg, tmp_path, "d1", sync_interval_s=60.0)
    with store.edit():
        alice = store.add_person("alice", embedding_of(1))
    assert sync(replica, door_cfg("d1")).pushed == {"enrolled": 1}
    with store.edit():
        store.rename("alice", "alice")  # a save with nothing for the fleet in it: compared, nothing to send
    assert sync(replica, door_cfg("d1")).pushed == {}
    replica.state.forget(alice.id)
    assert sync(replica, door_cfg("d1")).pushed == {}  # the file as last compared, within the interval: skipped
    with store.edit():
        store.add_person("bob", embedding_of(2))
    assert sync(replica, door_cfg("d1")).pushed == {"enrolled": 2}  # a changed file is compared in full at once
    assert replica.state.people() == {person.id: (person.id, person.name, digest(store.embeddings(person.id)))
                                      for person in store.persons}  # alice agreed again, though not pulled again
    assert sync(replica, door_cfg("d1")).pushed == {}

    short, store_2 = door(door_cfg, tmp_path, "d2", sync_interval_s=0.5)
    with store_2.edit():
        carol = store_2.add_person("carol", embedding_of(3))
    sync(short, door_cfg("d2"))
    short.state.forget(carol.id)
    time.sleep(0.5)
    assert sync(short, door_cfg("d2")).pushed == {"enrolled": 1}


def test_only_store_edits_and_new_decisions_count_as_local_changes(fleet, tmp_path):
    door_cfg, _ = fleet
    replica, store = door(door_cfg, tmp_path, "d1")
    assert not replica.local_changes_pending()  # no store file, no log yet
    sqlite3.connect(tmp_path / "d1" / "audit.sqlite").close()
    assert not replica.local_changes_pending()  # the door loop has opened its log but not made its table yet
    with store.edit():
        store.add_person("alice", embedding_of(1))
    assert replica.local_changes_pending()
    sync(replica, door_cfg("d1"))
    assert not replica.local_changes_pending()
    record(tmp_path / "d1" / "audit.sqlite", (None, None))
    assert replica.local_changes_pending()
    sync(replica, door_cfg("d1"))
    assert not replica.local_changes_pending()


# ---- pull: what changed in the fleet -------------------------------------------------------------------------------

def test_central_enrolments_arrive_with_name_note_and_templates(fleet, tmp_path):
    door_cfg, admin = fleet
    rows = rows_of(1, 11, 21)
    enrol_centrally(admin, ALICE, "alice", rows, note="visitor")
    replica, store = door(door_cfg, tmp_path, "d1")
    report = sync(replica, door_cfg("d1"))
    local = store.find("alice")
    assert (report.added, report.updated, report.pushed) == ([ALICE], [], {})
    assert report.version == admin.execute("SELECT version FROM people").fetchone()[0]
    assert (local.name, local.note) == ("alice", "visitor") and local.id != ALICE
    assert np.allclose(store.embeddings(local.id), rows, atol=1e-6)
    assert replica.state.people() == {ALICE: (local.id, "alice", digest(store.embeddings(local.id)))}
    assert not replica.local_changes_pending()  # the door's own edit is not taken for a local change
    assert sync(replica, door_cfg("d1")).fields() == quiet(report.version)


def test_central_renames_and_new_templates_update_the_door_and_nothing_else(fleet, tmp_path):
    door_cfg, admin = fleet
    for person_id, name, code in ((ALICE, "alice", 1), (BOB, "bob", 2), (CAROL, "carol", 3), (DAVE, "dave", 4)):
        enrol_centrally(admin, person_id, name, embedding_of(code), note=f"{name}'s note")
    replica, store = door(door_cfg, tmp_path, "d1")
    sync(replica, door_cfg("d1"))
    before = {p.name: p.id for p in store.persons}
    with admin.transaction():
        central.rename(admin, ALICE, "Alicia", central.CENTRAL)
        central.replace_templates(admin, BOB, rows_of(2, 12), central.CENTRAL)
        central.replace_templates(admin, CAROL, embedding_of(3), central.CENTRAL)  # stamped anew, unchanged
        central.rename(admin, DAVE, "David", central.CENTRAL)
        central.replace_templates(admin, DAVE, embedding_of(14), central.CENTRAL)
    report = sync(replica, door_cfg("d1"))
    assert sorted(report.updated) == sorted([ALICE, BOB, DAVE]) and (report.added, report.pushed) == ([], {})
    assert store.find(before["alice"]).name == "Alicia"  # a rename keeps the local id
    assert store.find("carol").id == before["carol"]
    assert np.allclose(store.embeddings("bob"), rows_of(2, 12), atol=1e-6)
    assert [p.note for p in store.persons if p.name in ("bob", "David")] == ["bob's note", "dave's note"]
    assert np.allclose(store.embeddings("David"), embedding_of(14)[None, :], atol=1e-6)
    local = {p.name: p.id for p in store.persons}
    assert replica.state.people() == {central_id: (local[name], name, digest(store.embeddings(local[name])))
                                      for central_id, name in ((ALICE, "Alicia"), (BOB, "bob"), (CAROL, "carol"),
                                                               (DAVE, "David"))}
    assert sync(replica, door_cfg("d1")).fields() == quiet(report.version)


def test_names_swapped_in_the_fleet_are_applied_without_a_clash(fleet, tmp_path):
    door_cfg, admin = fleet
    anne, bernadette = "Anne-Marie " + "a" * 47, "Bernadette " + "b" * 47  # long: the names set aside are cut to 64
    enrol_centrally(admin, ALICE, anne, embedding_of(1))
    enrol_centrally(admin, BOB, bernadette, embedding_of(2))
    replica, store = door(door_cfg, tmp_path, "d1")
    sync(replica, door_cfg("d1"))
    anne_id, bernadette_id = store.find(anne).id, store.find(bernadette).id
    with admin.transaction():
        central.rename(admin, ALICE, "swap", central.CENTRAL)
        central.rename(admin, BOB, anne, central.CENTRAL)
        central.rename(admin, ALICE, bernadette, central.CENTRAL)
    report = sync(replica, door_cfg("d1"))
    assert sorted(report.updated) == [ALICE, BOB] and report.refused == []
    assert (store.find(anne_id).name, store.find(bernadette_id).name) == (bernadette, anne)
    assert len(store.persons) == 2
    assert sync(replica, door_cfg("d1")).pushed == {}


def synced_door(door_cfg, tmp_path: Path, names: list[str], **changes):
    """A door of the test's own (door id: the schema's name), its people `names` enrolled here and synced once:
    (config, replica, store, the people)."""
    door_id = only_here(door_cfg)
    cfg = door_cfg(door_id, **changes)
    replica, store = door(door_cfg, tmp_path, door_id, **changes)
    with store.edit():
        persons = [store.add_person(name, embedding_of(i + 1)) for i, name in enumerate(names)]
    sync(replica, cfg)
    return cfg, replica, store, persons


def racing_round(replica: Replica, store: Store, cfg, admin, pg_dsn: str, central_change, local_change) -> SyncReport:
    """One round made to race: alice's rename here gives it something to push; it then waits behind
    `central_change`, still uncommitted, while the kiosk's own handle on the store makes `local_change`."""
    with store.edit():
        store.rename("alice", "alicia")
    kiosk_store = Store.open(store.path, fingerprint=FINGERPRINT)
    reports: list[SyncReport] = []
    round_ = threading.Thread(target=lambda: reports.append(sync(replica, cfg)))
    with admin.transaction():
        central_change()
        round_.start()
        assert wait_until(lambda: sessions(pg_dsn, cfg.door_id, waiting=True) == 1, AGENT_WAIT_S)
        with kiosk_store.edit():
            local_change(kiosk_store)
    round_.join(AGENT_WAIT_S)
    (report,) = reports
    return report


def test_a_local_enrolment_racing_a_sync_loses_its_name_to_the_fleet(fleet, tmp_path, pg_dsn, caplog):
    """A name enrolled here after the round read the store, given centrally meanwhile: the centre is the truth."""
    door_cfg, admin = fleet
    cfg, replica, store, (alice,) = synced_door(door_cfg, tmp_path, ["alice"])
    door_id = cfg.door_id
    caplog.set_level(logging.INFO, logger="edge.fleet")

    def central_change():
        central.enrol(admin, person_id=DAVE, name="dave", note=None, rows=embedding_of(7), source=central.CENTRAL)

    report = racing_round(replica, store, cfg, admin, pg_dsn, central_change,
                          lambda kiosk_store: kiosk_store.add_person("dave", embedding_of(8)))
    line = "local enrolment of 'dave' dropped: the fleet gave the name to another person"
    assert (report.refused, report.pushed, report.added, report.updated) == ([line], {"renamed": 1}, [DAVE], [])
    assert fleet_lines(caplog, "fleet_refused") == [f"fleet_refused door={door_id} reason={line}"]
    assert np.allclose(people(store)["dave"], embedding_of(7)) and sorted(people(store)) == ["alicia", "dave"]
    assert replica.state.people()[alice.id][1] == "alicia"
    assert sync(replica, cfg).pushed == {}


def test_a_removal_here_racing_a_central_change_is_not_undone(fleet, tmp_path, pg_dsn):
    """Removing someone at the door revokes their access and asks the fleet to forget them: a central change to
    them pulled in the same round must not bring them back; the next round erases them everywhere. (A local rename
    racing a central one yields to it: the centre is the truth.)"""
    door_cfg, admin = fleet
    cfg, replica, store, (_, bob, carol) = synced_door(door_cfg, tmp_path, ["alice", "bob", "carol"],
                                                        sync_interval_s=0.5)
    door_id = cfg.door_id

    def central_change():
        central.rename(admin, bob.id, "Bobby", central.CENTRAL)
        central.rename(admin, carol.id, "Caroline", central.CENTRAL)

    def local_change(kiosk_store):
        kiosk_store.remove("bob")
        kiosk_store.rename("carol", "Carrie")

    report = racing_round(replica, store, cfg, admin, pg_dsn, central_change, local_change)
    assert (report.pushed, report.added, report.updated) == ({"renamed": 1}, [], [carol.id])
    assert sorted(people(store)) == ["Caroline", "alicia"] and store.find("Caroline").id == carol.id
    time.sleep(cfg.sync_interval_s)  # the removal raced this round's own look at the store: the next full one sees it
    assert sync(replica, cfg).pushed == {"erased": 1}
    assert central_people(admin) == [(carol.id, "Caroline"), (store.find("alicia").id, "alicia")]
    assert admin.execute("SELECT person_id, by_door FROM erasures").fetchall() == [(bob.id, door_id)]


def test_what_was_pushed_before_a_round_broke_off_is_not_sent_again(fleet, tmp_path, pg_dsn):
    """Each central change commits on its own and its agreement is kept at once: a link lost later in the round
    (here while the pull waits behind a lock) leaves nothing to send twice."""
    door_cfg, admin = fleet
    cfg, replica, store, (alice,) = synced_door(door_cfg, tmp_path, ["alice"])
    door_id = cfg.door_id
    with store.edit():
        store.rename("alice", "Alicia")
    errors: list[Exception] = []

    def round_() -> None:
        try:
            sync(replica, cfg)
        except psycopg.OperationalError as err:
            errors.append(err)

    thread = threading.Thread(target=round_)
    with admin.transaction():
        admin.execute("LOCK TABLE templates IN ACCESS EXCLUSIVE MODE")  # the pull reads templates, a rename does not
        thread.start()
        assert wait_until(lambda: sessions(pg_dsn, door_id, waiting=True) == 1, AGENT_WAIT_S)
        with psycopg.connect(pg_dsn, autocommit=True) as dba:
            dba.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                        [f"edge-door-{door_id}"])
        thread.join(AGENT_WAIT_S)
    assert len(errors) == 1
    assert replica.state.people()[alice.id][1] == "Alicia"
    assert sync(replica, cfg).pushed == {}
    assert [a for a in actions(admin) if a[0] == "rename"] == [("rename", door_id, alice.id)]


def test_a_central_erasure_removes_the_person_here_and_blanks_their_log(fleet, tmp_path):
    door_cfg, admin = fleet
    enrol_centrally(admin, ALICE, "alice", embedding_of(1))
    enrol_centrally(admin, BOB, "bob", embedding_of(2))
    replica, store = door(door_cfg, tmp_path, "d1")
    sync(replica, door_cfg("d1"))
    alice_here, bob_here = store.find("alice").id, store.find("bob").id
    audit_path = tmp_path / "d1" / "audit.sqlite"
    record(audit_path, ("alice", alice_here), ("alice", None), ("bob", bob_here))
    with admin.transaction():
        central.erase(admin, ALICE, central.CENTRAL)
        central.enrol(admin, person_id=GHOST, name="ghost", note=None, rows=embedding_of(9), source=central.CENTRAL)
        central.erase(admin, GHOST, central.CENTRAL)  # never reached this door: nothing to report
    report = sync(replica, door_cfg("d1"))
    assert (report.erased, report.added, report.pushed, report.audit_pushed) == ([ALICE], [], {}, 3)
    assert [p.name for p in store.persons] == ["bob"] and set(replica.state.people()) == {BOB}
    assert local_log(audit_path) == [(None, None), (None, None), ("bob", bob_here)]
    assert [row[3:5] for row in central_log(admin)] == [(None, None), (None, None), (BOB, "bob")]

    record(audit_path, ("alice", alice_here))  # the door loop logs her once more before it reloads its store
    again = sync(replica, door_cfg("d1"))
    assert (again.pushed, again.erased, again.audit_pushed) == ({}, [], 1)
    assert local_log(audit_path)[-1] == (None, None)
    assert central_log(admin)[-1][3:5] == (None, None)


# ---- the decision log outbox ---------------------------------------------------------------------------------------

def test_decisions_are_pushed_in_order_with_every_column_and_the_fleet_id_of_the_person(fleet, tmp_path):
    door_cfg, admin = fleet
    enrol_centrally(admin, ALICE, "alice", embedding_of(1))
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        bob = store.add_person("bob", embedding_of(2))
    sync(replica, door_cfg("d1"))
    alice_here = store.find("alice").id
    audit = AuditLog(tmp_path / "d1" / "audit.sqlite")
    audit.record(decision("alice"), door_action="pulse", person_id=alice_here, t_unix=1000.5)
    audit.record(decision("bob"), door_action="pulse", person_id=bob.id, t_unix=1001.0)
    audit.record(decision(None, event="unknown"), door_action="none", t_unix=1002.0)
    audit.record(decision("alice"), door_action="pulse", t_unix=1003.0)  # from before rows carried ids
    audit.close()
    with admin.transaction():
        central.rename(admin, ALICE, "Alicia", central.CENTRAL)  # names in the log go stale, ids do not
    report = sync(replica, door_cfg("d1"))
    assert report.audit_pushed == 4 and replica.state.get("audit_seq") == 4
    assert central_log(admin) == [
        (1, 1000.5, "unlock", ALICE, "alice", 7, 42, 0.25, 0.5, 3, "pulse"),
        (2, 1001.0, "unlock", bob.id, "bob", 7, 42, 0.25, 0.5, 3, "pulse"),
        (3, 1002.0, "unknown", None, None, 7, 42, 0.25, 0.5, 3, "none"),
        (4, 1003.0, "unlock", None, "alice", 7, 42, 0.25, 0.5, 3, "pulse")]
    assert not replica.local_changes_pending()
    assert sync(replica, door_cfg("d1")).audit_pushed == 0


def test_a_log_from_before_person_ids_is_pushed_with_ids_found_by_name(fleet, tmp_path):
    door_cfg, admin = fleet
    enrol_centrally(admin, ALICE, "alice", embedding_of(1))
    replica, _ = door(door_cfg, tmp_path, "d1")
    sync(replica, door_cfg("d1"))
    db = sqlite3.connect(tmp_path / "d1" / "audit.sqlite")
    db.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, t_unix REAL NOT NULL, event TEXT NOT NULL, person "
               "TEXT, track INTEGER, frame INTEGER, distance_l2 REAL, margin_l2 REAL, votes INTEGER, door_action TEXT, "
               "snapshot TEXT)")
    db.executemany("INSERT INTO decisions (t_unix, event, person, door_action) VALUES (?, ?, ?, ?)",
                   [(1.0, "unlock", "alice", "pulse"), (2.0, "unknown", None, "none")])
    db.commit()
    db.close()
    assert sync(replica, door_cfg("d1")).audit_pushed == 2
    assert [row[2:5] for row in central_log(admin)] == [("unlock", ALICE, "alice"), ("unknown", None, None)]


def test_a_backlog_longer_than_one_batch_is_pushed_whole_and_once(fleet, tmp_path):
    door_cfg, admin = fleet
    replica, _ = door(door_cfg, tmp_path, "d1")
    audit_path = tmp_path / "d1" / "audit.sqlite"
    record(audit_path, (None, None))
    total = 2 * AUDIT_BATCH_ROWS + 1
    db = sqlite3.connect(audit_path)
    db.executemany("INSERT INTO decisions (t_unix, event, door_action) VALUES (?, 'unknown', 'none')",
                   [(float(i),) for i in range(1, total)])
    db.commit()
    db.close()
    report = sync(replica, door_cfg("d1"))
    assert report.audit_pushed == total and replica.state.get("audit_seq") == total
    assert admin.execute("SELECT count(*), min(local_seq), max(local_seq) FROM audit").fetchone() == (total, 1, total)
    assert sync(replica, door_cfg("d1")).audit_pushed == 0


def test_a_missing_log_is_skipped_and_never_created(fleet, tmp_path):
    door_cfg, admin = fleet
    enrol_centrally(admin, ALICE, "alice", embedding_of(1))
    replica, store = door(door_cfg, tmp_path, "d1")
    alone = Replica(door_cfg("d2"), store=Store.open(tmp_path / "d2.edgestore", fingerprint=FINGERPRINT),
                    audit_path=None)
    audit_path = tmp_path / "d1" / "audit.sqlite"
    for replica_, door_id in ((replica, "d1"), (alone, "d2")):
        assert sync(replica_, door_cfg(door_id)).added == [ALICE]
    with admin.transaction():
        central.erase(admin, ALICE, central.CENTRAL)
    for replica_, door_id in ((replica, "d1"), (alone, "d2")):
        report = sync(replica_, door_cfg(door_id))
        assert (report.erased, report.audit_pushed) == ([ALICE], 0)
        assert not replica_.local_changes_pending()
    assert not audit_path.exists()
    alone.close()


# ---- the agent: a thread beside the door loop ------------------------------------------------------------------------

def test_the_agent_syncs_on_notify_and_on_local_changes_and_logs_each_change_in_one_line(fleet, tmp_path, caplog):
    door_cfg, admin = fleet
    agent, recorder, store = agent_for(door_cfg, tmp_path, sync_interval_s=30.0)  # long: only a change wakes it
    with store.edit():
        store.add_person("alice", embedding_of(1))
    assert agent.online is False and agent.last_error is None and agent.syncs == 0  # until it has run
    caplog.set_level(logging.INFO, logger="edge.fleet")
    latencies = []
    agent.start()
    try:
        recorder.wait_for(lambda r: r.pushed)
        assert agent.online is True and agent.last_error is None
        assert recorder.threads == {("fleet-d1", True)}  # named for the door, never keeps the service alive
        for change, seen in (
                (lambda: central.enrol(admin, person_id=BOB, name="bob", note=None, rows=embedding_of(2),
                                       source=central.CENTRAL), lambda r: r.added),
                (lambda: central.rename(admin, BOB, "Robert", central.CENTRAL), lambda r: r.updated),
                (lambda: central.erase(admin, BOB, central.CENTRAL), lambda r: r.erased)):
            after = len(recorder.reports)
            with admin.transaction():
                change()
            committed = time.monotonic()
            latencies.append(recorder.times[recorder.wait_for(seen, after=after)] - committed)
        record(tmp_path / "d1" / "audit.sqlite", (None, None))  # a local change: found between NOTIFYs
        recorder.wait_for(lambda r: r.audit_pushed)
        settled = len(recorder.reports)
        time.sleep(QUIET_S)
        assert len(recorder.reports) <= settled + 1  # nothing to do: no round (at most one late NOTIFY)
    finally:
        assert stopped_in_time(agent)
    assert min(latencies) < NOTIFY_LATENCY_S, latencies
    assert agent.syncs == len(recorder.reports)
    tail = "audit_pushed={} version={}"
    assert fleet_lines(caplog, "fleet_synced") == [
        "fleet_synced door=d1 pushed_enrolled=1 refused=0 added=0 updated=0 erased=0 " + tail.format(0, 1),
        "fleet_synced door=d1 refused=0 added=1 updated=0 erased=0 " + tail.format(0, 2),
        "fleet_synced door=d1 refused=0 added=0 updated=1 erased=0 " + tail.format(0, 3),
        "fleet_synced door=d1 refused=0 added=0 updated=0 erased=1 " + tail.format(0, 4),
        "fleet_synced door=d1 refused=0 added=0 updated=0 erased=0 " + tail.format(1, 4)]
    assert fleet_lines(caplog, "fleet_online") == ["fleet_online door=d1 version=1"]


def test_stop_ends_the_thread_closes_its_sessions_and_the_replica_state(fleet, tmp_path, pg_dsn):
    door_cfg, _ = fleet
    door_id = only_here(door_cfg)
    agent, recorder, _ = agent_for(door_cfg, tmp_path, door_id, sync_interval_s=30.0)
    agent.start()
    try:
        recorder.wait_for(lambda r: True)
        assert sessions(pg_dsn, door_id) == 2  # one for the work, one listening
    finally:
        assert stopped_in_time(agent)
    assert not any(t.name == f"fleet-{door_id}" for t in threading.enumerate())
    assert wait_until(lambda: sessions(pg_dsn, door_id) == 0, AGENT_WAIT_S)
    with pytest.raises(sqlite3.ProgrammingError):
        agent.replica.state.get("version")


def test_a_cut_link_is_logged_once_per_reason_and_the_agent_reconnects_by_itself(fleet, tmp_path, caplog):
    door_cfg, admin = fleet
    proxy = FaultProxy(*host_port(door_cfg("x").dsn))
    agent, recorder, _ = agent_for(door_cfg, tmp_path, dsn=proxy.dsn_for(door_cfg("x").dsn), sync_interval_s=30.0)
    caplog.set_level(logging.INFO, logger="edge.fleet")
    agent.start()
    try:
        recorder.wait_for(lambda r: True)
        proxy.cut()  # the open links drop (a psycopg error), then reconnecting fails (a FleetError)
        assert wait_until(lambda: len(fleet_lines(caplog, "fleet_offline")) == 2, AGENT_WAIT_S)
        assert agent.online is False and "unreachable" in agent.last_error
        enrol_centrally(admin, BOB, "bob", embedding_of(2))
        after = len(recorder.reports)
        proxy.heal()
        recorder.wait_for(lambda r: r.added == [BOB], after=after)
        assert agent.online is True and agent.last_error is None
    finally:
        assert stopped_in_time(agent)
        proxy.close()
    where = central.where(proxy.dsn_for(door_cfg("x").dsn))
    offline = fleet_lines(caplog, "fleet_offline")
    assert len(set(offline)) == 2
    for line in offline:  # each with the driver's own words for what happened
        assert line.startswith(f"fleet_offline door=d1 reason=fleet database {where} unreachable (")
        assert line.endswith("server closed the connection unexpectedly); the door keeps deciding on its local store")
    assert fleet_lines(caplog, "fleet_online") == ["fleet_online door=d1 version=0", "fleet_online door=d1 version=1"]


class Tap:
    """A TCP hop in front of PostgreSQL that notes when each connection came (the door's retry schedule); without
    a target it hangs up on every connection, like a server that drops every link."""

    def __init__(self, target_dsn: str | None = None) -> None:
        self.target = None if target_dsn is None else host_port(target_dsn)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = make_conninfo(**{**conninfo_to_dict(target_dsn or "user=door dbname=test"), "host": "127.0.0.1",
                                    "port": str(self.listener.getsockname()[1]), "sslmode": "disable",
                                    "gssencmode": "disable"})  # one TCP connection per connection attempt
        self.times: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.times.append(time.monotonic())
            if self.target is None:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            for source, sink in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_reconnection_backs_off_from_half_a_second_doubling_up_to_the_sync_interval(tmp_path, caplog):
    server = Tap()
    cfg = FleetConfig(door_id="d1", state_path=tmp_path / "fleet.sqlite", sync_interval_s=1.5, connect_timeout_s=1)
    caplog.set_level(logging.INFO, logger="edge.fleet")
    agent = FleetAgent(cfg, dsn=server.dsn, store=Store.open(tmp_path / "s.edgestore", fingerprint=FINGERPRINT),
                       audit_path=None).start()
    try:
        assert wait_until(lambda: len(server.times) >= 4, 6.0)
    finally:
        assert stopped_in_time(agent)
        server.close()
    gaps = np.diff(server.times[:4])
    assert 0.45 <= gaps[0] < 0.9 and 0.95 <= gaps[1] < 1.4 and 1.45 <= gaps[2] < 1.9, gaps
    assert (agent.online, agent.syncs) == (False, 0)
    assert agent.last_error.startswith(f"fleet database door@{host_port(server.dsn)[0]}:")
    assert len(fleet_lines(caplog, "fleet_offline")) == 1  # one line for the outage, not one per attempt


def test_a_refusing_fleet_is_retried_only_rarely_and_stop_ends_the_wait(fleet, tmp_path, caplog):
    door_cfg, admin = fleet
    with admin.transaction():
        central.claim_fingerprint(admin, "fleet-model:v1")
    agent, recorder, _ = agent_for(door_cfg, tmp_path, sync_interval_s=0.5)
    caplog.set_level(logging.INFO, logger="edge.fleet")
    agent.start()
    try:
        assert wait_until(lambda: agent.last_error is not None, AGENT_WAIT_S)
        refusal = agent.last_error
        assert refusal.startswith("the fleet's templates come from model fleet-model:v1, this door runs "
                                  f"{FINGERPRINT}") and agent.online is False
        admin.execute("UPDATE fleet_meta SET value = %s WHERE key = 'fingerprint'", [FINGERPRINT])
        time.sleep(1.2)  # a dropped link would have been retried twice by now
        assert (agent.syncs, agent.online, recorder.reports) == (0, False, [])
    finally:
        assert stopped_in_time(agent)
    assert fleet_lines(caplog, "fleet_offline") == [f"fleet_offline door=d1 reason={refusal}"]


def test_a_broken_local_store_is_reported_and_synced_again_once_repaired(fleet, tmp_path, caplog):
    door_cfg, _ = fleet
    tap = Tap(door_cfg("d1").dsn)
    agent, recorder, store = agent_for(door_cfg, tmp_path, dsn=tap.dsn, sync_interval_s=30.0)
    with store.edit():
        store.add_person("alice", embedding_of(1))
    good = store.path.read_bytes()
    caplog.set_level(logging.INFO, logger="edge.fleet")
    agent.start()
    try:
        recorder.wait_for(lambda r: r.pushed)
        connected = len(tap.times)
        for garbage in (b"bad", b"worse"):  # two failures in a row, each seen by its own message
            replace(store.path, garbage)
            assert wait_until(lambda: f"{len(garbage)} bytes" in (agent.last_error or ""), AGENT_WAIT_S)
            assert agent.last_error.startswith(f"local store: store {store.path} is corrupt (")
            assert agent.online is False
            time.sleep(PAUSED_S)
            assert len(tap.times) == connected  # no new try before the pause is over …
            connected += 2  # … then one: a work and a listening connection
        after = len(recorder.reports)
        replace(store.path, good)
        recorder.wait_for(lambda r: True, after=after)
        assert agent.online is True and agent.last_error is None
    finally:
        assert stopped_in_time(agent)
        tap.close()
    offline = fleet_lines(caplog, "fleet_offline")
    assert len(offline) == 2 and all(line.startswith("fleet_offline door=d1 reason=local store: ") for line in offline)


# ---- start_agent: the door service's entry -------------------------------------------------------------------------

def test_without_a_usable_dsn_the_door_runs_alone_and_says_why(tmp_path, caplog):
    assert start_agent(Config(), store_path=tmp_path / "s.edgestore", audit_path=None, fingerprint=FINGERPRINT) is None
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://door@127.0.0.1:1/test")
    dsn_file.chmod(0o644)
    config = Config(fleet=FleetConfig(dsn_file=dsn_file, door_id="front", state_path=tmp_path / "fleet.sqlite"))
    caplog.set_level(logging.INFO, logger="edge.fleet")
    assert start_agent(config, store_path=tmp_path / "s.edgestore", audit_path=None, fingerprint=FINGERPRINT) is None
    assert fleet_lines(caplog, "fleet_disabled") == [
        f"fleet_disabled door=front reason=fleet.dsn_file {dsn_file} is readable by others (mode 644); it holds a "
        f"password: chmod 600 {dsn_file}"]
    assert not (tmp_path / "fleet.sqlite").exists()


def test_start_agent_syncs_the_configured_store_with_its_key_template_cap_and_log(fleet, tmp_path):
    door_cfg, admin = fleet
    key = generate_key(tmp_path / "store.key")
    config = Config.model_validate({"store": {"key_file": str(key)}, "enroll": {"max_embeddings_per_person": 2}})
    config = config.model_copy(update={"fleet": door_cfg("front")})
    store_path, audit_path = tmp_path / "front.edgestore", tmp_path / "audit.sqlite"
    store = Store.open(store_path, fingerprint=FINGERPRINT, key_path=key)
    with store.edit():
        alice = store.add_person("alice", embedding_of(1))
    record(audit_path, ("alice", alice.id))
    enrol_centrally(admin, BOB, "bob", rows_of(2, 12, 22))
    agent = start_agent(config, store_path=store_path, audit_path=audit_path, fingerprint=FINGERPRINT)
    try:
        assert wait_until(lambda: agent.online, AGENT_WAIT_S)
        assert agent.syncs >= 1 and admin.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
        assert any(t.name == "fleet-front" and t.daemon for t in threading.enumerate())
    finally:
        assert stopped_in_time(agent)
    assert central_people(admin) == [(alice.id, "alice"), (BOB, "bob")]
    assert store.reload_if_changed() and store.encrypted
    assert np.allclose(store.embeddings("bob"), rows_of(12, 22), atol=1e-6)  # the newest two: this door's cap
