"""`python -m edge bench store`: build, load, save and 1:N match times of the embedding store on synthetic people.

Kept apart from `edge/store.py` so that the store holds only what the door relies on (and mutation testing of the
store counts only store code). The reference is measured in the same run: a per-query norm over all rows.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge.store import EMBEDDING_DIM, Store, generate_key

BENCH_FINGERPRINT = "bench:synthetic"
BENCH_REPEATS = 3
BENCH_NAIVE_QUERIES = 20
BENCH_PROBE_NOISE_L2 = 0.3  # probes are enrolled vectors moved this far, like a new photo of the same person
BENCH_THRESHOLD_L2 = 0.6
BENCH_MARGIN_L2 = 0.05
P95_PERCENT = 95
MIB = 1 << 20
KIB = 1 << 10


def bench_store(size: int, *, rows_per_person: int = 1, queries: int = 200, tmp_dir: Path, encrypted: bool = False,
                seed: int = 0) -> dict:
    """Build a store of `size` people, each with `rows_per_person` unit vectors around a random face, and time
    load, save and 1:N match (`first_match_ms`: the first query after loading, which builds the templates).

    `naive_ms_median` is the reference measured in the same run: per-query np.linalg.norm over all rows.
    """
    tmp_dir = Path(tmp_dir)
    rng = np.random.default_rng(seed)
    path = tmp_dir / "bench.edgestore"
    key_path = generate_key(tmp_dir / "bench.key") if encrypted else None
    enrolled = _random_unit(rng, size)

    started = time.perf_counter()
    builder = Store.open(path, fingerprint=BENCH_FINGERPRINT, key_path=key_path)
    all_rows = []
    with builder.edit():
        for i, vector in enumerate(enrolled[:, None, :]):
            rows = vector if rows_per_person == 1 else _nudged(rng, np.repeat(vector, rows_per_person, 0))
            builder.add_person(f"person-{i:07d}", rows)
            all_rows.append(rows)
    build_s = time.perf_counter() - started
    del builder
    matrix = np.concatenate(all_rows)  # the store's rows, for the naive reference

    rss_before_mib = _rss_mib()
    load_s = []
    for _ in range(BENCH_REPEATS):
        started = time.perf_counter()
        store = Store.open(path, fingerprint=BENCH_FINGERPRINT, key_path=key_path)
        load_s.append(time.perf_counter() - started)

    truth = rng.integers(size, size=queries)
    probes = _nudged(rng, enrolled[truth])
    started = time.perf_counter()
    store.match(probes[:1], threshold_l2=BENCH_THRESHOLD_L2, margin_l2=BENCH_MARGIN_L2)
    first_match_ms = (time.perf_counter() - started) * 1e3
    match_ms, hits = [], 0
    for probe, person in zip(probes, truth):
        started = time.perf_counter()
        (answer,) = store.match(probe[None, :], threshold_l2=BENCH_THRESHOLD_L2, margin_l2=BENCH_MARGIN_L2)
        match_ms.append((time.perf_counter() - started) * 1e3)
        hits += answer.person == f"person-{person:07d}"
    rss_mib = _rss_mib() - rss_before_mib

    naive_ms = []
    for probe in probes[:BENCH_NAIVE_QUERIES]:
        started = time.perf_counter()
        int(np.argmin(np.linalg.norm(matrix - probe, axis=1)))
        naive_ms.append((time.perf_counter() - started) * 1e3)

    save_s = []
    for i in range(BENCH_REPEATS):
        started = time.perf_counter()
        with store.edit():
            store.add_person(f"extra-{i}", _random_unit(rng, 1))
        save_s.append(time.perf_counter() - started)

    match_ms_median = float(np.median(match_ms))
    return {
        "size": size,
        "rows_per_person": rows_per_person,
        "queries": queries,
        "encrypted": encrypted,
        "build_s": round(build_s, 3),
        "load_s": round(float(np.median(load_s)), 4),
        "save_s": round(float(np.median(save_s)), 4),
        "first_match_ms": round(first_match_ms, 1),
        "match_ms_median": round(match_ms_median, 3),
        "match_ms_p95": round(float(np.percentile(match_ms, P95_PERCENT)), 3),
        "naive_ms_median": round(float(np.median(naive_ms)), 3),
        "speedup_vs_naive": round(float(np.median(naive_ms)) / match_ms_median, 1),
        "hit_rate": hits / queries,
        "file_mib": round(path.stat().st_size / MIB, 2),
        "rss_mib": round(rss_mib, 1),
    }


def _nudged(rng: np.random.Generator, vectors: np.ndarray) -> np.ndarray:
    """Unit vectors about BENCH_PROBE_NOISE_L2 from `vectors`, like other photos of the same people."""
    noise = rng.standard_normal(vectors.shape).astype(np.float32) * (BENCH_PROBE_NOISE_L2 / np.sqrt(EMBEDDING_DIM))
    return _unit(vectors + noise)


def _random_unit(rng: np.random.Generator, count: int) -> np.ndarray:
    return _unit(rng.standard_normal((count, EMBEDDING_DIM)).astype(np.float32))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _rss_mib() -> float:
    """Resident memory of this process (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB / MIB
    raise RuntimeError("VmRSS not found in /proc/self/status")
