"""`bench_store` (behind `python -m edge bench store`) returns complete, sane numbers; no timing thresholds."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge.bench_store import MIB, bench_store
from edge.store import EMBEDDING_DIM

SIZE = 2000
QUERIES = 20
KEYS = {"size", "load_s", "save_s", "match_ms_median", "match_ms_p95", "file_mib", "rss_mib", "naive_ms_median",
        "hit_rate"}


@pytest.mark.parametrize("encrypted", [False, True])
def test_bench_store_reports_sane_numbers(tmp_path: Path, encrypted: bool) -> None:
    result = bench_store(SIZE, queries=QUERIES, tmp_dir=tmp_path, encrypted=encrypted)
    assert KEYS <= result.keys()
    assert result["size"] == SIZE and result["queries"] == QUERIES and result["encrypted"] is encrypted
    assert result["hit_rate"] == 1.0
    assert 0 < result["load_s"] < 60 and 0 < result["save_s"] < 60
    assert 0 < result["match_ms_median"] <= result["match_ms_p95"]
    matrix_mib = SIZE * EMBEDDING_DIM * 4 / MIB
    assert matrix_mib < result["file_mib"] < 2 * matrix_mib
    assert isinstance(result["rss_mib"], float)


def test_bench_store_with_several_rows_per_person_still_finds_everyone(tmp_path: Path) -> None:
    result = bench_store(SIZE, rows_per_person=3, queries=QUERIES, tmp_dir=tmp_path)
    assert result["rows_per_person"] == 3 and result["hit_rate"] == 1.0 and result["first_match_ms"] > 0
    matrix_mib = 3 * SIZE * EMBEDDING_DIM * 4 / MIB
    assert matrix_mib < result["file_mib"] < 2 * matrix_mib
