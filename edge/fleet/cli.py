"""`python -m edge fleet init|status|sync|erase|bench`: set up the fleet database, look at it, sync this door once,
erase a person fleet-wide, or run the many-door simulation."""
from __future__ import annotations

import argparse
from pathlib import Path

from edge.config import Config
from edge.console import emit_json, positive_int, say
from edge.errors import FleetError, InputError

ACTIONS = ("init", "status", "sync", "erase", "bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("person", nargs="?", metavar="PERSON", help="erase: name or id in the fleet")
    p.add_argument("--fingerprint", default=None,
                   help="init: the fleet's model fingerprint (default: this machine's model, see `doctor`)")
    p.add_argument("--store", type=Path, default=None, help="sync: store file (default: store.path in the config)")
    p.add_argument("--audit", type=Path, default=None, help="sync: audit log (default: audit.path in the config)")
    p.add_argument("--dsn", default=None, help="bench: PostgreSQL to simulate against (default: fleet.dsn)")
    p.add_argument("--doors", type=positive_int, default=20, help="bench: door processes")
    p.add_argument("--people", type=positive_int, default=10_000, help="bench: people enrolled before the load")
    p.add_argument("--ops", type=positive_int, default=1000, help="bench: enrol/rename/remove operations")
    p.add_argument("--rate", type=float, default=10.0, help="bench: operations per second")
    p.add_argument("--cut-s", type=float, default=60.0, help="bench: how long the partitioned door is cut off")


def cmd_fleet(args, config: Config) -> int:
    import psycopg

    from edge.fleet import central

    if args.action == "bench":
        from edge.fleet.sim import run_bench

        report = run_bench(dsn=args.dsn or central.read_dsn(config.fleet), doors=args.doors, people=args.people,
                           ops=args.ops, rate=args.rate, cut_s=args.cut_s, log=say)
        say("  ".join(f"{k} {v}" for k, v in report.items() if not isinstance(v, (dict, list))))
        if args.json:
            emit_json(report)
        return 0 if report["identical"] and report["partition"]["ok"] else 1
    cfg = config.fleet
    dsn = central.read_dsn(cfg)
    conn = central.connect(dsn, cfg, autocommit=True)
    try:
        result = ACTION_FUNCTIONS[args.action](args, config, conn)
    except psycopg.OperationalError as err:
        raise FleetError(central.unreachable(dsn, err)) from None
    finally:
        conn.close()
    if args.json:
        emit_json(result)
    return 0


def _init(args, config: Config, conn) -> dict:
    from edge.fleet import central

    fingerprint = args.fingerprint or _model_fingerprint(config)
    before, after = central.migrate(conn, config.fleet.schema_name)
    with conn.transaction():
        central.claim_fingerprint(conn, fingerprint)
    say(f"fleet schema {config.fleet.schema_name}: version {after}" + (f" (was {before})" if before != after else
                                                                        " (up to date)") + f", model {fingerprint}")
    return {"schema": config.fleet.schema_name, "schema_version": after, "previous_version": before,
            "fingerprint": fingerprint}


def _status(args, config: Config, conn) -> dict:
    from edge.fleet import central

    central.check_schema(conn, config.fleet.schema_name)
    result = central.status(conn)
    say(f"fleet {config.fleet.schema_name}: schema {result['schema_version']}, version {result['version']}, "
        f"{result['people']} people, {result['templates']} templates, {result['erasures']} erasures, "
        f"{result['audit_rows']} audit rows, model {result['fingerprint']}")
    for door in result["doors"]:
        say(f"  {door['door_id']:<20} last seen {door['last_seen']}  {door['behind']} version(s) behind  "
            f"audit rows pushed up to {door['audit_seq']}")
    return result


def _sync(args, config: Config, conn) -> dict:
    from edge.__main__ import open_store
    from edge.fleet.sync import Replica

    replica = Replica(config.fleet, store=open_store(config, args), audit_path=args.audit or config.audit.path)
    try:
        report = replica.sync(conn)
    finally:
        replica.close()
    say(f"fleet sync {config.fleet.door_id}: " + "  ".join(f"{k}={v}" for k, v in report.fields().items()))
    for line in report.refused:
        say(f"refused: {line}")
    return {**report.fields(), "refusals": report.refused}


def _erase(args, config: Config, conn) -> dict:
    from edge.fleet import central

    if not args.person:
        raise InputError("fleet erase needs PERSON (a name or id in the fleet)")
    central.check_schema(conn, config.fleet.schema_name)
    with conn.transaction():
        person_id, name = central.find_person(conn, args.person)
        central.erase(conn, person_id, central.CENTRAL)
    say(f"erased {name} ({person_id}) from the fleet; every door removes them at its next sync")
    return {"id": person_id, "erased": True}


def _model_fingerprint(config: Config) -> str:
    from edge.embed import store_fingerprint

    return store_fingerprint(config)


ACTION_FUNCTIONS = {"init": _init, "status": _status, "sync": _sync, "erase": _erase}
