"""Templates in PostgreSQL as `bytea` (what the fleet uses) or as a typed float4[] column (the shape a pgvector
`vector(128)` would have): bulk write, a door's full pull into a numpy matrix, and size on disk, in the same run.

    .venv/bin/python bench/fleet_template_storage.py [--dsn postgresql://postgres@127.0.0.1:5432/test] [--people 10000]
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge.store import EMBEDDING_DIM  # noqa: E402

REPEATS = 3


def timed(action) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--people", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.people, EMBEDDING_DIM)).astype("<f4")
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    schema = f"edge_storage_bench_{secrets.token_hex(3)}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        try:
            conn.execute("CREATE TABLE as_bytea (id int PRIMARY KEY, embedding bytea NOT NULL)")
            conn.execute("CREATE TABLE as_array (id int PRIMARY KEY, embedding real[] NOT NULL)")

            def write(table: str, value) -> None:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
                with conn.cursor().copy(sql.SQL("COPY {} (id, embedding) FROM STDIN").format(sql.Identifier(table))) as copy:
                    for i, row in enumerate(rows):
                        copy.write_row((i, value(row)))

            def pull_bytea() -> np.ndarray:
                blobs = [r[0] for r in conn.execute("SELECT embedding FROM as_bytea ORDER BY id")]
                return np.frombuffer(b"".join(blobs), "<f4").reshape(-1, EMBEDDING_DIM)

            def pull_array() -> np.ndarray:
                return np.array([r[0] for r in conn.execute("SELECT embedding FROM as_array ORDER BY id")], np.float32)

            report = {
                "people": args.people,
                "write_bytea_s": timed(lambda: write("as_bytea", lambda row: row.tobytes())),
                "write_float4_array_s": timed(lambda: write("as_array", lambda row: row.tolist())),
                "pull_bytea_s": timed(pull_bytea),
                "pull_float4_array_s": timed(pull_array),
            }
            assert np.array_equal(pull_bytea(), rows), "bytea must give the exact float32 bytes back"
            report["float4_array_exact"] = bool(np.array_equal(pull_array(), rows))
            for table in ("as_bytea", "as_array"):
                report[f"{table}_mib"] = conn.execute("SELECT pg_total_relation_size(%s)", [f"{schema}.{table}"]
                                                      ).fetchone()[0] / 2**20
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    print("  ".join(f"{k} {round(v, 3) if isinstance(v, float) else v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
