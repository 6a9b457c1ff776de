"""The fleet: PostgreSQL as the source of truth, doors as offline-first replicas.

Everything runs against a real PostgreSQL: EDGE_TEST_PG_DSN, else the local server (127.0.0.1:5432, database
`test`), else a throwaway cluster started from the installed binaries; each test gets its own schema and drops it.
Network faults come from `FaultProxy` (edge/fleet/sim.py) between a door and the server.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import cli, wait_until
from test_kiosk import ALICE, NO_LIVENESS, NOBODY, embedding_of, frames, make_kiosk

from edge.audit import AuditLog
from edge.config import Config, FleetConfig
from edge.door import SimulatedDoor
from edge.errors import ConfigError, FleetError
from edge.fleet import central
from edge.fleet.sim import FaultProxy, host_port, run_bench
from edge.fleet.sync import FleetAgent, Replica, start_agent
from edge.store import Store

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
FINGERPRINT = "test:fake-pipeline"  # the kiosk fakes' store fingerprint
FLEET_WAIT_S = 15.0
CUT_S = 3.0
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PASSWORD = "right-password"


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob(PG_BIN_GLOB))
    return Path(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL cluster from the installed binaries (as the postgres user when we are root)."""

    def __init__(self, *, password: str | None = None) -> None:
        bin_dir = _pg_bin()
        if bin_dir is None:
            pytest.skip("no PostgreSQL: set EDGE_TEST_PG_DSN, run a server on 127.0.0.1:5432 or install postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.port = _free_port()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(self.dir, "postgres")
        self.pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(self.dir / "data")]
        auth = ["-A", "trust"]
        if password:
            (self.dir / "pw").write_text(password)
            shutil.chown(self.dir / "pw", "postgres") if as_postgres else None
            auth = ["-A", "scram-sha-256", f"--pwfile={self.dir / 'pw'}"]
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", *auth],
                       check=True, capture_output=True)
        subprocess.run([*self.pg_ctl, "-w", "-l", str(self.dir / "log"), "-o",
                        f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)

    def dsn(self, password: str | None = None) -> str:
        return f"postgresql://postgres{':' + password if password else ''}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn():
    for dsn in (os.environ.get("EDGE_TEST_PG_DSN"), LOCAL_DSN):
        if dsn and _reachable(dsn):
            yield dsn
            return
    cluster = Cluster()
    yield cluster.dsn()
    cluster.stop()


@pytest.fixture
def fleet(pg_dsn, tmp_path):
    """A fresh fleet schema (migrated, dropped afterwards) and a config factory for its doors."""
    schema = f"edge_test_{secrets.token_hex(4)}"

    def door_cfg(door_id: str, **changes) -> FleetConfig:
        return FleetConfig(dsn=pg_dsn, schema_name=schema, door_id=door_id,
                           state_path=tmp_path / door_id / "fleet.sqlite", connect_timeout_s=2, **changes)

    admin = central.connect(pg_dsn, door_cfg("admin"), autocommit=True)
    central.migrate(admin, schema)
    yield door_cfg, admin
    admin.execute(psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(schema)))
    admin.close()


def door(door_cfg, tmp_path: Path, door_id: str, **changes) -> tuple[Replica, Store]:
    store = Store.open(tmp_path / door_id / "store.edgestore", fingerprint=FINGERPRINT)
    return Replica(door_cfg(door_id, **changes), store=store, audit_path=tmp_path / door_id / "audit.sqlite"), store


def sync(replica: Replica, cfg: FleetConfig):
    with central.connect(cfg.dsn, cfg, autocommit=True) as conn:
        return replica.sync(conn)


def people(store: Store) -> dict[str, np.ndarray]:
    store.reload_if_changed()
    return {p.name: store.embeddings(p.id) for p in store.persons}


def write_config(path: Path, **fleet_keys) -> Path:
    body = "".join(f"  {key}: {value}\n" for key, value in fleet_keys.items())
    path.write_text("fleet:\n" + body)
    return path


# ---- schema -----------------------------------------------------------------------------------------------------

def test_migrations_rerun_and_a_newer_schema_is_refused_with_one_line(fleet, tmp_path):
    door_cfg, admin = fleet
    schema = door_cfg("x").schema_name
    assert central.migrate(admin, schema) == (central.SCHEMA_VERSION, central.SCHEMA_VERSION)
    tables = {row[0] for row in admin.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema])}
    assert {"people", "templates", "erasures", "doors", "audit", "admin_actions", "fleet_meta"} <= tables

    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        store.add_person("alice", embedding_of(ALICE))
    admin.execute("UPDATE fleet_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(FleetError, match="version 999, newer than this edge release"):
        sync(replica, door_cfg("d1"))
    with pytest.raises(FleetError, match="newer"):
        central.migrate(admin, schema)
    assert list(people(store)) == ["alice"]  # the local store is untouched
    config = write_config(tmp_path / "c.yaml", dsn=door_cfg("d1").dsn, schema_name=schema)
    result = cli("fleet", "status", "--config", config)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "newer than this edge release" in result.stderr


def test_audit_is_append_only_except_anonymisation(fleet):
    _, admin = fleet
    with admin.transaction():
        central.push_audit(admin, "d1", [(1, 1.0, "unlock", None, "alice", 1, 1, 0.1, 0.2, 3, "pulse")])
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        admin.execute("UPDATE audit SET event = 'unknown'")
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        admin.execute("DELETE FROM audit")
    admin.execute("UPDATE audit SET person = NULL")
    assert admin.execute("SELECT event, person FROM audit").fetchall() == [("unlock", None)]


# ---- replication ------------------------------------------------------------------------------------------------

def test_door_changes_reach_every_door_bit_for_bit_and_erasure_blanks_every_log(fleet, tmp_path):
    door_cfg, admin = fleet
    (a, store_a), (b, store_b) = door(door_cfg, tmp_path, "a"), door(door_cfg, tmp_path, "b")
    with store_a.edit():
        store_a.add_person("alice", np.stack([embedding_of(ALICE), embedding_of(ALICE + 10)]))
        store_a.add_person("bob", embedding_of(2))
    assert sync(a, door_cfg("a")).pushed == {"enrolled": 2}
    sync(b, door_cfg("b"))
    assert {name: rows.tobytes() for name, rows in people(store_b).items()} == \
           {name: rows.tobytes() for name, rows in people(store_a).items()}

    with store_b.edit():
        store_b.rename("bob", "Robert")
        store_b.add_embeddings("alice", embedding_of(ALICE + 20))
    assert sync(b, door_cfg("b")).pushed == {"renamed": 1, "templates": 1}
    report = sync(a, door_cfg("a"))
    assert sorted(people(store_a)) == ["Robert", "alice"] and len(people(store_a)["alice"]) == 3
    assert len(report.updated) == 2

    log_b = AuditLog(tmp_path / "b" / "audit.sqlite")
    for name in ("alice", "Robert"):
        log_b.record(_decision(name), door_action="pulse", person_id=store_b.find(name).id)
    log_b.close()
    assert sync(b, door_cfg("b")).audit_pushed == 2
    with store_a.edit():
        store_a.remove("alice")
    assert sync(a, door_cfg("a")).pushed == {"erased": 1}
    assert sync(b, door_cfg("b")).erased
    assert sorted(people(store_b)) == ["Robert"]
    assert [row["person"] for row in AuditLog(tmp_path / "b" / "audit.sqlite").rows()] == [None, "Robert"]
    assert admin.execute("SELECT person FROM audit ORDER BY local_seq").fetchall() == [(None,), ("Robert",)]
    assert admin.execute("SELECT count(*) FROM people").fetchone()[0] == 1
    assert admin.execute("SELECT count(*) FROM erasures").fetchone()[0] == 1
    actions = [row[0] for row in admin.execute("SELECT action FROM admin_actions ORDER BY id")]
    assert sorted(actions) == ["enrol", "enrol", "erase", "rename", "templates"]


def test_same_name_enrolled_at_two_doors_ends_in_one_person_and_a_clear_refusal(fleet, tmp_path):
    door_cfg, admin = fleet
    (a, store_a), (b, store_b) = door(door_cfg, tmp_path, "a"), door(door_cfg, tmp_path, "b")
    with store_a.edit():
        store_a.add_person("Carol", embedding_of(3))
    with store_b.edit():
        store_b.add_person("dave", embedding_of(5))
        store_b.add_person("carol", embedding_of(4))  # another face, the same name ignoring case
    sync(a, door_cfg("a"))
    report = sync(b, door_cfg("b"))
    assert report.refused == ["enrolment of 'carol' refused: the name 'carol' already belongs to another person in "
                              "the fleet; removed at this door"]
    sync(a, door_cfg("a"))
    assert sorted(admin.execute("SELECT name FROM people").fetchall()) == [("Carol",), ("dave",)]
    for store in (store_a, store_b):
        assert people(store)["Carol"].tobytes() == embedding_of(3)[None, :].tobytes()
        assert sorted(people(store)) == ["Carol", "dave"]


def test_audit_rows_are_pushed_once_even_when_the_cursor_is_lost(fleet, tmp_path):
    door_cfg, admin = fleet
    replica, _ = door(door_cfg, tmp_path, "d1")
    log = AuditLog(tmp_path / "d1" / "audit.sqlite")
    for n in range(5):
        log.record(_decision(None, event="unknown"), door_action="none")
    assert sync(replica, door_cfg("d1")).audit_pushed == 5
    replica.state.put("audit_seq", 2)  # as if the door died after the centre committed, before it moved its cursor
    log.record(_decision(None, event="unknown"), door_action="none")
    assert sync(replica, door_cfg("d1")).audit_pushed == 1
    seqs = [row[0] for row in admin.execute("SELECT local_seq FROM audit ORDER BY local_seq")]
    assert seqs == [1, 2, 3, 4, 5, 6]
    log.close()


def test_another_model_is_refused_and_the_door_keeps_its_store(fleet, tmp_path):
    door_cfg, admin = fleet
    with admin.transaction():
        central.claim_fingerprint(admin, "fleet-model:v1")
    replica, store = door(door_cfg, tmp_path, "d1")
    with store.edit():
        store.add_person("alice", embedding_of(ALICE))
    with pytest.raises(FleetError, match="come from model fleet-model:v1, this door runs test:fake-pipeline"):
        sync(replica, door_cfg("d1"))
    assert admin.execute("SELECT count(*) FROM people").fetchone()[0] == 0
    assert list(people(store)) == ["alice"]


# ---- the agent beside the door loop, through network faults ------------------------------------------------------

def test_door_loop_keeps_unlocking_through_a_cut_and_catches_up_after_it(fleet, tmp_path):
    door_cfg, admin = fleet
    proxy = FaultProxy(*host_port(door_cfg("x").dsn))
    cfg = door_cfg("d1", sync_interval_s=30.0)  # long: only NOTIFY (or local changes) can explain a quick sync
    store_path, audit_path = tmp_path / "d1" / "store.edgestore", tmp_path / "d1" / "audit.sqlite"
    agent = FleetAgent(cfg, dsn=proxy.dsn_for(cfg.dsn), store=Store.open(store_path, fingerprint=FINGERPRINT),
                       audit_path=audit_path).start()
    config = Config.model_validate({"decide": {"votes_needed": 1, "window_frames": 1, "cooldown_s": 0.0,
                                               "max_missed_frames": 0}, **NO_LIVENESS})
    kiosk_store = Store.open(store_path, fingerprint=FINGERPRINT)
    audit = AuditLog(audit_path)
    kiosk, events = make_kiosk(kiosk_store, SimulatedDoor(), config=config, audit=audit)
    try:
        with admin.transaction():
            central.enrol(admin, person_id="a11ce0000000", name="alice", note=None, rows=embedding_of(ALICE),
                          source=central.CENTRAL)
        assert wait_until(lambda: "alice" in people(kiosk_store), FLEET_WAIT_S)

        proxy.delay(0.2)  # a slow link still works
        with admin.transaction():
            central.enrol(admin, person_id="b0b000000000", name="bob", note=None, rows=embedding_of(2),
                          source=central.CENTRAL)
        assert wait_until(lambda: "bob" in people(kiosk_store), FLEET_WAIT_S)
        proxy.heal()
        proxy.reset()  # links killed with RST: the agent reconnects by itself
        with admin.transaction():
            central.enrol(admin, person_id="ca7010000000", name="carol", note=None, rows=embedding_of(3),
                          source=central.CENTRAL)
        assert wait_until(lambda: "carol" in people(kiosk_store), FLEET_WAIT_S)

        proxy.cut()
        with admin.transaction():
            central.erase(admin, "a11ce0000000", central.CENTRAL)
        assert wait_until(lambda: not agent.online, FLEET_WAIT_S)
        unlocks = 0
        for frame in frames([ALICE, NOBODY] * 10):  # the cut-off door still knows alice and opens for her
            kiosk._last_store_check = float("-inf")
            unlocks += sum(e["event"] == "unlock" for e in kiosk.step(frame))
        assert unlocks == 10 and "alice" in people(kiosk_store)
        rows_during_cut = len(audit.rows())

        proxy.heal()
        assert wait_until(lambda: "alice" not in people(kiosk_store), FLEET_WAIT_S)  # the erasure arrives
        assert wait_until(lambda: agent.replica.state.get("audit_seq") == rows_during_cut, FLEET_WAIT_S)
        local = [row["id"] for row in audit.rows()]
        pushed = [row[0] for row in admin.execute("SELECT local_seq FROM audit WHERE door_id = 'd1' ORDER BY 1")]
        assert pushed == local and len(local) == rows_during_cut  # 0 lost, 0 duplicated
        assert all(row["person"] is None for row in audit.rows())  # her entries are anonymised at the door …
        assert admin.execute("SELECT count(*) FROM audit WHERE person IS NOT NULL").fetchone()[0] == 0  # … centrally
        assert wait_until(lambda: agent.online, FLEET_WAIT_S)
    finally:
        agent.stop()
        audit.close()
        proxy.close()


def test_fleet_sim_three_door_processes_converge_and_survive_a_partition(pg_dsn, tmp_path):
    report = run_bench(dsn=pg_dsn, doors=3, people=300, ops=120, rate=20.0, cut_s=CUT_S, work_dir=tmp_path,
                       log=lambda line: None)
    assert report["converged"] and report["identical"], report
    assert report["enrol_to_all_doors"]["n"] > 0 and report["enrol_to_all_doors"]["never"] == 0, report
    assert report["erase_to_all_doors"]["n"] > 0 and report["erase_to_all_doors"]["never"] == 0, report
    partition = report["partition"]
    assert partition["lost"] == 0 and partition["duplicated"] == 0 and partition["unlocks_during_cut"] > 0, partition
    assert partition["ok"], partition


# ---- bad input: one line each, the door keeps its local store ------------------------------------------------------

def test_bad_dsns_are_one_line_each(fleet, tmp_path, pg_dsn):
    door_cfg, _ = fleet
    schema = door_cfg("x").schema_name
    closed_port = _free_port()
    cases = {
        "not a connection string": "fleet.dsn is not a PostgreSQL connection string",
        f"postgresql://postgres@127.0.0.1:{closed_port}/test": f"127.0.0.1:{closed_port}/test unreachable",
        pg_dsn.rsplit("/", 1)[0] + "/no_such_database": "does not exist",
    }
    for dsn, expected in cases.items():
        result = cli("fleet", "status", "--config", write_config(tmp_path / "c.yaml", dsn=f"'{dsn}'",
                                                                   schema_name=schema))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr

    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg_dsn)
    dsn_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others .*chmod 600"):
        central.read_dsn(FleetConfig(dsn_file=dsn_file))
    dsn_file.chmod(0o600)
    assert central.read_dsn(FleetConfig(dsn_file=dsn_file)) == pg_dsn


def test_door_service_runs_on_its_local_store_when_the_fleet_is_unusable(tmp_path, caplog):
    store_path = tmp_path / "store.edgestore"
    kiosk_store = Store.open(store_path, fingerprint=FINGERPRINT)
    with kiosk_store.edit():
        kiosk_store.add_person("alice", embedding_of(ALICE))
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(f"postgresql://postgres@127.0.0.1:{_free_port()}/test")
    dsn_file.chmod(0o644)
    config = Config(fleet=FleetConfig(dsn_file=dsn_file, door_id="front", state_path=tmp_path / "fleet.sqlite",
                                      connect_timeout_s=1))
    assert start_agent(config, store_path=store_path, audit_path=None, fingerprint=FINGERPRINT) is None
    assert "fleet_disabled door=front reason=fleet.dsn_file" in caplog.text and "chmod 600" in caplog.text
    dsn_file.chmod(0o600)
    agent = start_agent(config, store_path=store_path, audit_path=None, fingerprint=FINGERPRINT)
    try:
        assert wait_until(lambda: agent.last_error is not None, FLEET_WAIT_S)
        assert "unreachable" in agent.last_error and "keeps deciding on its local store" in agent.last_error
        kiosk, _ = make_kiosk(kiosk_store, SimulatedDoor(),
                              config=Config.model_validate({"decide": {"votes_needed": 1, "window_frames": 1},
                                                            **NO_LIVENESS}))
        assert [e["person"] for f in frames([ALICE]) for e in kiosk.step(f)] == ["alice"]
        assert not agent.online
    finally:
        agent.stop()


def test_wrong_password_is_one_line(tmp_path):
    cluster = Cluster(password=PASSWORD)
    try:
        assert _reachable(cluster.dsn(PASSWORD))
        dsn_file = tmp_path / "dsn"
        dsn_file.write_text(cluster.dsn("wrong-password"))
        dsn_file.chmod(0o600)
        result = cli("fleet", "init", "--fingerprint", "m", "--config", write_config(tmp_path / "c.yaml",
                                                                                     dsn_file=dsn_file))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert 'refused the login (password authentication failed for user "postgres")' in result.stderr
        assert "wrong-password" not in result.stderr
    finally:
        cluster.stop()


def test_cli_init_status_sync_and_erase(fleet, tmp_path):
    door_cfg, admin = fleet
    cfg = door_cfg("front")
    config = write_config(tmp_path / "c.yaml", dsn=cfg.dsn, schema_name=cfg.schema_name, door_id="front",
                          state_path=tmp_path / "front.sqlite")
    init = cli("fleet", "init", "--fingerprint", FINGERPRINT, "--json", "--config", config)
    assert init.returncode == 0 and '"schema_version": 1' in init.stdout
    store = Store.open(tmp_path / "s.edgestore", fingerprint=FINGERPRINT)
    with store.edit():
        store.add_person("alice", embedding_of(ALICE))
    env = {"EDGE_MODELS_DIR": str(tmp_path / "no-models")}
    synced = cli("fleet", "sync", "--store", store.path, "--audit", tmp_path / "a.sqlite", "--config", config, env=env)
    assert synced.returncode == 2 and "model" in synced.stderr  # no model here: the fingerprint cannot be read
    admin.execute("UPDATE fleet_meta SET value = %s WHERE key = 'fingerprint'", [_model_fingerprint()])
    store_m = Store.open(tmp_path / "m.edgestore", fingerprint=_model_fingerprint())
    with store_m.edit():
        store_m.add_person("alice", embedding_of(ALICE))
        store_m.add_person("bob", embedding_of(2))
    synced = cli("fleet", "sync", "--store", store_m.path, "--audit", tmp_path / "a.sqlite", "--config", config)
    assert synced.returncode == 0 and "pushed_enrolled=2" in synced.stderr, synced.stderr
    status = cli("fleet", "status", "--config", config)
    assert status.returncode == 0 and "2 people" in status.stderr and "front" in status.stderr
    erased = cli("fleet", "erase", "alice", "--config", config)
    assert erased.returncode == 0 and admin.execute("SELECT name FROM people").fetchall() == [("bob",)]
    synced = cli("fleet", "sync", "--store", store_m.path, "--audit", tmp_path / "a.sqlite", "--config", config)
    assert synced.returncode == 0 and "erased=1" in synced.stderr, synced.stderr
    store_m.reload_if_changed()
    assert [p.name for p in store_m.persons] == ["bob"]


def _model_fingerprint() -> str:
    from edge.embed import store_fingerprint

    return store_fingerprint(Config())


def _decision(person: str | None, *, event: str = "unlock"):
    from edge.decide import Decision

    return Decision(event=event, person=person, track=1, frame=1, t_s=0.0, distance_l2=0.1, margin_l2=0.3, votes=1,
                    first_frame=1, box=(0, 0, 1, 1))
