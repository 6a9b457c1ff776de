"""Many doors against one PostgreSQL (`python -m edge fleet bench`): door processes, a mixed load at the centre, a
partitioned door behind a fault proxy, and the numbers: how long an enrolment or an erasure takes to be usable at
every door, whether every door ends identical to the centre, and whether the cut-off door lost or doubled audit rows.

Each door is a separate process (`python -m edge.fleet.sim door …`) running the real sync agent on its own store
and decision log; it reports on stdout, as JSON lines, when changed people became usable (a second Store, like the
door loop's, reloads the file and matches the person's template) and, on SIGTERM, a digest of its final store.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge.store import EMBEDDING_DIM

SIM_FINGERPRINT = "sim:random-unit-vectors"
MATCH_THRESHOLD_L2 = 0.3
MATCH_MARGIN_L2 = 0.0
MATCH_CHECK_MAX = 200  # changes per sync checked by a real 1:N match (each costs one product over every template)
KIOSK_TICK_S = 0.1
CONVERGE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 600.0
DOOR_STOP_TIMEOUT_S = 60.0
OP_MIX = (("enrol", 0.4), ("rename", 0.3), ("remove", 0.3))
PROXY_BUFFER_BYTES = 65536
PROXY_POLL_S = 0.2


# ---- network faults -----------------------------------------------------------------------------------------------

class FaultProxy:
    """A TCP proxy on 127.0.0.1 between doors and PostgreSQL that a test or the bench controls:
    `cut()` drops every link and refuses new ones (a pulled cable), `blackhole()` keeps links open but forwards
    nothing (a dead route: only timeouts notice), `delay(s)` holds every chunk s seconds, `reset()` kills the current
    links with a TCP RST, `heal()` restores service."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._mode = "up"
        self._delay_s = 0.0
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def dsn_for(self, dsn: str) -> str:
        """`dsn` with host and port replaced by this proxy's."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        return make_conninfo(**{**conninfo_to_dict(dsn), "host": "127.0.0.1", "port": str(self.port)})

    def cut(self) -> None:
        self._mode = "cut"
        self._drop_links(rst=False)

    def blackhole(self) -> None:
        self._mode = "blackhole"

    def reset(self) -> None:
        self._drop_links(rst=True)

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def heal(self) -> None:
        self._mode, self._delay_s = "up", 0.0

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._drop_links(rst=False)

    def _drop_links(self, *, rst: bool) -> None:
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            try:  # the pump thread may have closed it already
                if rst:
                    link.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    link.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            link.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._links.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select(PROXY_POLL_S):
                    if self._mode == "blackhole":
                        time.sleep(PROXY_POLL_S)
                        continue
                    data = key.fileobj.recv(PROXY_BUFFER_BYTES)
                    if not data:
                        return
                    if self._delay_s:
                        time.sleep(self._delay_s)
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._links.difference_update((a, b))
            for sock in (a, b):
                sock.close()


# ---- synthetic people -------------------------------------------------------------------------------------------

def template(index: int) -> np.ndarray:
    """Person `index`'s one unit template, the same in every process."""
    vector = np.random.default_rng(index).standard_normal(EMBEDDING_DIM).astype(np.float32)
    return (vector / np.linalg.norm(vector))[None, :]


def store_digest(people: list[tuple[str, np.ndarray]]) -> str:
    """Order-free digest of (name, templates) pairs: equal digests mean identical stores."""
    lines = sorted(f"{name}\t{hashlib.sha256(np.ascontiguousarray(rows, '<f4').tobytes()).hexdigest()}"
                   for name, rows in people)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ---- one door process ---------------------------------------------------------------------------------------------

def door_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.fleet.sim door")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--door-id", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--watch", default=None, help="a name the simulated camera keeps seeing (decision log)")
    parser.add_argument("--connect-timeout-s", type=float, default=2.0)
    parser.add_argument("--interval-s", type=float, default=5.0)
    args = parser.parse_args(argv)

    from edge.config import FleetConfig
    from edge.fleet.sync import FleetAgent
    from edge.store import Store

    args.dir.mkdir(parents=True, exist_ok=True)
    cfg = FleetConfig(dsn=args.dsn, door_id=args.door_id, schema_name=args.schema, state_path=args.dir / "fleet.sqlite",
                      sync_interval_s=args.interval_s, connect_timeout_s=args.connect_timeout_s)
    store_path, audit_path = args.dir / "store.edgestore", args.dir / "audit.sqlite"
    reader = Store.open(store_path, fingerprint=SIM_FINGERPRINT)  # what the door loop would see
    names: dict[str, str] = {}
    out_lock = threading.Lock()

    def emit(document: dict) -> None:
        with out_lock:
            print(json.dumps(document), flush=True)

    def on_synced(report) -> None:
        if not (report.added or report.updated or report.erased):
            return
        reader.reload_if_changed()
        agreed = agent.replica.state.people()
        changed = report.added + report.updated
        usable = []
        for central_id in changed:
            local_id = agreed[central_id][0]
            person = reader.find(local_id)
            names[central_id] = person.name
            if len(changed) > MATCH_CHECK_MAX:  # the first sync: being in the reloaded store is enough
                usable.append(central_id)
                continue
            (match,) = reader.match(reader.embeddings(local_id)[:1], threshold_l2=MATCH_THRESHOLD_L2,
                                    margin_l2=MATCH_MARGIN_L2)
            if match.person == person.name:
                usable.append(central_id)
        gone = [cid for cid in report.erased if not any(p.name == names.get(cid) for p in reader.persons)]
        emit({"door": args.door_id, "t": time.time(), "usable": usable, "erased": gone, "version": report.version})

    agent = FleetAgent(cfg, dsn=args.dsn, store=Store.open(store_path, fingerprint=SIM_FINGERPRINT),
                       audit_path=audit_path, on_synced=on_synced)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.start()
    camera = threading.Thread(target=_camera, args=(reader, audit_path, args.watch, stop), daemon=True)
    if args.watch:
        camera.start()
    stop.wait()
    if args.watch:
        camera.join()
        _wait(lambda: not agent.replica.local_changes_pending(), DOOR_STOP_TIMEOUT_S / 2)  # last rows pushed
    agent.stop()
    reader.reload_if_changed()
    final = Store.open(store_path, fingerprint=SIM_FINGERPRINT)
    emit({"door": args.door_id, "final": store_digest([(p.name, final.embeddings(p.id)) for p in final.persons]),
          "people": len(final), "syncs": agent.syncs, "online": agent.online})
    return 0


def _camera(reader, audit_path: Path, watched: str, stop: threading.Event) -> None:
    """A door loop stand-in: every tick it sees the watched person (while enrolled here) or a random enrolled one,
    matches them against the local store as the kiosk does and logs the decision; the watched index comes from
    its name (p-NNNNN)."""
    from edge.audit import AuditLog
    from edge.decide import Decision

    audit = AuditLog(audit_path)
    rng = random.Random(0)
    watched_index = int(watched.split("-")[1])
    frame = 0
    enrolled = reader.persons
    while not stop.wait(KIOSK_TICK_S):
        if reader.reload_if_changed():
            enrolled = reader.persons
        frame += 1
        if frame % 2 and enrolled:
            probe = reader.embeddings(rng.choice(enrolled).id)[:1]
        else:
            probe = template(watched_index)
        (match,) = reader.match(probe, threshold_l2=MATCH_THRESHOLD_L2, margin_l2=MATCH_MARGIN_L2)
        event = "unlock" if match.person else "unknown"
        audit.record(Decision(event=event, person=match.person, track=frame, frame=frame, t_s=time.time(),
                              distance_l2=match.distance_l2, margin_l2=match.margin_l2, votes=1, first_frame=frame,
                              box=(0, 0, 1, 1)), door_action="pulse" if match.person else "none",
                     person_id=match.extra["candidate_id"] if match.person else None)
    audit.close()


# ---- the coordinator ----------------------------------------------------------------------------------------------

class Door:
    """A door process and what it reported."""

    def __init__(self, door_id: str, command: list[str]) -> None:
        self.door_id = door_id
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
        self.usable: dict[str, float] = {}
        self.erased: dict[str, float] = {}
        self.final: dict | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            report = json.loads(line)
            if "final" in report:
                self.final = report
                continue
            for central_id in report["usable"]:
                self.usable.setdefault(central_id, report["t"])
            for central_id in report["erased"]:
                self.erased.setdefault(central_id, report["t"])

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(DOOR_STOP_TIMEOUT_S)
        deadline = time.monotonic() + DOOR_STOP_TIMEOUT_S
        while self.final is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.final or {}


def _spread(seconds: list[float]) -> dict:
    """Median/p95/max of the finite values; `never` counts changes that did not reach every door."""
    finite = [s for s in seconds if s != float("inf")]
    if not finite:
        return {"n": 0, "never": len(seconds)}
    return {"n": len(finite), "never": len(seconds) - len(finite), "median_s": round(float(np.median(finite)), 3),
            "p95_s": round(float(np.percentile(finite, 95)), 3), "max_s": round(max(finite), 3)}


def run_bench(*, dsn: str, doors: int, people: int, ops: int, rate: float, cut_s: float,
              work_dir: Path | None = None, log=lambda line: None) -> dict:
    """The whole scenario in a throwaway schema (dropped at the end); returns the measured numbers."""
    import psycopg

    from edge.audit import AuditLog
    from edge.config import FleetConfig
    from edge.fleet import central

    schema = f"edge_fleet_bench_{os.getpid()}_{secrets.token_hex(3)}"
    cfg = FleetConfig(dsn=dsn, schema_name=schema, door_id="bench-centre")
    conn = central.connect(dsn, cfg, autocommit=True)
    tmp = tempfile.TemporaryDirectory(prefix="edge-fleet-bench-", dir=work_dir)
    proxy = None
    started_doors: list[Door] = []
    try:
        central.migrate(conn, schema)
        with conn.transaction():
            central.claim_fingerprint(conn, SIM_FINGERPRINT)
        started = time.perf_counter()
        ids = [secrets.token_hex(6) for _ in range(people)]
        with conn.transaction():
            central.enrol_many(conn, [(ids[i], f"p-{i:05d}", template(i)) for i in range(people)])
        log(f"seeded {people} people in {time.perf_counter() - started:.1f} s")
        living = dict(zip(ids, range(people)))  # central id → template index
        names = {pid: f"p-{i:05d}" for pid, i in living.items()}

        def door_command(door_id: str, door_dsn: str, *extra: str) -> list[str]:
            return [sys.executable, "-m", "edge.fleet.sim", "door", "--dsn", door_dsn, "--schema", schema,
                    "--door-id", door_id, "--dir", str(Path(tmp.name) / door_id), *extra]

        fleet = [Door(f"door-{n:02d}", door_command(f"door-{n:02d}", dsn)) for n in range(doors)]
        started_doors.extend(fleet)
        host, port = host_port(dsn)
        proxy = FaultProxy(host, port)
        watched_id = ids[0]
        cut_door = Door("door-cut", door_command("door-cut", proxy.dsn_for(dsn), "--watch", names[watched_id]))
        started_doors.append(cut_door)
        living.pop(watched_id)  # the load never touches the watched person; the cut erases them
        everyone = fleet + [cut_door]
        started = time.perf_counter()
        if not _wait(lambda: all(len(d.usable) >= people for d in everyone), READY_TIMEOUT_S):
            raise RuntimeError("doors did not finish their first sync: " +
                               ", ".join(f"{d.door_id} {len(d.usable)}" for d in everyone))
        first_sync_s = time.perf_counter() - started
        log(f"{len(everyone)} doors hold all {people} people after {first_sync_s:.1f} s")

        rng = random.Random(1)
        enrolled_at: dict[str, float] = {}
        erased_at: dict[str, float] = {}
        next_index = people
        cut_at_op = ops // 4
        cut_window: tuple[float, float] | None = None
        cut_started = 0.0
        period_s = 1.0 / rate
        load_started = time.perf_counter()
        for n in range(ops):
            if n == cut_at_op:
                proxy.cut()
                cut_started = time.time()
                with conn.transaction():
                    central.erase(conn, watched_id, central.CENTRAL)
                erased_during_cut_at = time.time()
                log(f"door-cut cut off; erased {names[watched_id]} centrally")
            if cut_window is None and cut_started and time.time() - cut_started >= cut_s:
                proxy.heal()
                cut_window = (cut_started, time.time())
                log(f"door-cut reconnected after {cut_window[1] - cut_window[0]:.1f} s")
            kind = rng.choices([k for k, _ in OP_MIX], [w for _, w in OP_MIX])[0]
            with conn.transaction():
                if kind == "enrol":
                    person_id = secrets.token_hex(6)
                    central.enrol(conn, person_id=person_id, name=f"p-{next_index:05d}", note=None,
                                  rows=template(next_index), source=central.CENTRAL)
                    living[person_id], names[person_id] = next_index, f"p-{next_index:05d}"
                    next_index += 1
                else:
                    person_id = rng.choice(list(living))
                    if kind == "rename":
                        names[person_id] = f"{names[person_id].split(' ')[0]} r{n}"
                        central.rename(conn, person_id, names[person_id], central.CENTRAL)
                    else:
                        central.erase(conn, person_id, central.CENTRAL)
                        living.pop(person_id)
            (enrolled_at if kind == "enrol" else erased_at if kind == "remove" else {})[person_id] = time.time()
            time.sleep(max(0.0, load_started + (n + 1) * period_s - time.perf_counter()))
        load_s = time.perf_counter() - load_started
        if cut_window is None:
            time.sleep(max(0.0, cut_started + cut_s - time.time()))
            proxy.heal()
            cut_window = (cut_started, time.time())
            log(f"door-cut reconnected after {cut_window[1] - cut_window[0]:.1f} s")
        log(f"{ops} operations in {load_s:.1f} s")

        latest = central.status(conn)["version"]
        converged = _wait(lambda: _all_at(conn, [d.door_id for d in everyone], latest), CONVERGE_TIMEOUT_S)
        finals = {d.door_id: d.stop() for d in everyone}
        started_doors.clear()
        centre = _central_digest(conn)

        def reach(times: dict[str, float], reported: str) -> list[float]:
            return [max(getattr(d, reported).get(pid, float("inf")) for d in fleet) - t for pid, t in times.items()]

        short_lived = enrolled_at.keys() & erased_at.keys()  # enrolled and erased again within the load: left out
        enrol_s = reach({pid: t for pid, t in enrolled_at.items() if pid not in short_lived}, "usable")
        erase_s = reach({pid: t for pid, t in erased_at.items() if pid not in short_lived}, "erased")
        partition = _partition_report(conn, AuditLog, Path(tmp.name) / "door-cut" / "audit.sqlite", cut_window,
                                      names[watched_id], cut_door.erased.get(watched_id), erased_during_cut_at)
        report = {
            "doors": doors, "people": people, "ops": ops, "rate_ops_s": rate, "load_s": round(load_s, 1),
            "first_sync_s": round(first_sync_s, 1), "converged": converged,
            "enrol_to_all_doors": _spread(enrol_s), "erase_to_all_doors": _spread(erase_s),
            "enrolled_and_erased_during_load": len(short_lived),
            "identical": converged and all(f.get("final") == centre for f in finals.values()),
            "people_final": central.status(conn)["people"], "partition": partition,
        }
        return report
    finally:
        for door in started_doors:
            door.process.kill()
        if proxy is not None:
            proxy.close()
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(schema)))
        conn.close()
        tmp.cleanup()


def _partition_report(conn, audit_log_class, audit_path: Path, cut_window: tuple[float, float], watched: str,
                      door_erased_at: float | None, erased_at: float) -> dict:
    """Audit rows of the cut-off door: all of them centrally, once each; unlocks during the cut; the erasure."""
    audit = audit_log_class(audit_path)
    local = audit.rows()
    audit.close()
    central_rows = conn.execute("SELECT local_seq, person FROM audit WHERE door_id = 'door-cut'").fetchall()
    central_seqs = [seq for seq, _ in central_rows]
    local_seqs = {row["id"] for row in local}
    during = [row for row in local if cut_window[0] <= row["t_unix"] <= cut_window[1]]
    lost, duplicated = len(local_seqs - set(central_seqs)), len(central_seqs) - len(set(central_seqs))
    report = {
        "cut_s": round(cut_window[1] - cut_window[0], 1), "audit_rows_local": len(local_seqs),
        "audit_rows_central": len(central_seqs), "lost": lost, "duplicated": duplicated,
        "rows_during_cut": len(during), "unlocks_during_cut": sum(r["event"] == "unlock" for r in during),
        "erasure_applied_after_reconnect_s": None if door_erased_at is None else round(door_erased_at - cut_window[1], 2),
        "erased_name_left_local": sum(r["person"] == watched for r in local),
        "erased_name_left_central": sum(person == watched for _, person in central_rows),
        "erased_at_cut_start_s": round(erased_at - cut_window[0], 2),
    }
    report["ok"] = (lost == 0 and duplicated == 0 and report["unlocks_during_cut"] > 0 and door_erased_at is not None
                    and door_erased_at >= cut_window[1] and report["erased_name_left_local"] == 0
                    and report["erased_name_left_central"] == 0)
    return report


def _central_digest(conn) -> str:
    rows: dict[str, list[bytes]] = {}
    names = dict(conn.execute("SELECT id, name FROM people").fetchall())
    for person_id, blob in conn.execute("SELECT person_id, embedding FROM templates ORDER BY person_id, position"):
        rows.setdefault(person_id, []).append(blob)
    return store_digest([(names[pid], np.frombuffer(b"".join(blobs), "<f4").reshape(-1, EMBEDDING_DIM))
                         for pid, blobs in rows.items()])


def _all_at(conn, door_ids: list[str], version: int) -> bool:
    rows = conn.execute("SELECT count(*) FROM doors WHERE door_id = ANY(%s) AND applied_version >= %s",
                        [door_ids, version]).fetchone()
    return rows[0] == len(door_ids)


def host_port(dsn: str) -> tuple[str, int]:
    """The server a DSN points at (for putting a FaultProxy in front of it)."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    return parts.get("host") or "127.0.0.1", int(parts.get("port") or 5432)


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


if __name__ == "__main__":
    if sys.argv[1:2] != ["door"]:
        sys.exit("usage: python -m edge.fleet.sim door --dsn DSN --schema NAME --door-id ID --dir DIR")
    sys.exit(door_main(sys.argv[2:]))
