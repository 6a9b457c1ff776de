"""The store's promises, pinned where they are made: the match boundaries as documented ("closer than" the threshold,
"ahead by" the margin) and the durability order of every write, seen by recording the system calls (a kill test
cannot see a page cache that was never flushed).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from test_store import enrol, nudged, path, rng, unit  # noqa: F401  (path, rng: fixtures)

from edge.store import Store, generate_key

# ---- match boundaries -------------------------------------------------------------------------------------------


@pytest.fixture
def ada_and_grace(path: Path, rng: np.random.Generator) -> tuple[Store, np.ndarray]:
    """A store of two and a query close to Ada, with its exact distance and margin as the store computes them."""
    ada = unit(rng)
    store = enrol(path, {"Ada": ada, "Grace": unit(rng)})
    query = nudged(ada[0], rng, 0.3)[None, :]
    return store, query


def answer(store: Store, query: np.ndarray, *, threshold_l2: float = 2.0, margin_l2: float = 0.0):
    (match,) = store.match(query, threshold_l2=threshold_l2, margin_l2=margin_l2)
    return match


def test_a_match_exactly_at_the_threshold_is_refused(ada_and_grace):
    store, query = ada_and_grace
    distance = answer(store, query).distance_l2
    assert answer(store, query, threshold_l2=distance).person is None, "accepted only when closer than the threshold"
    assert answer(store, query, threshold_l2=math.nextafter(distance, math.inf)).person == "Ada"


def test_a_margin_exactly_at_the_minimum_is_accepted(ada_and_grace):
    store, query = ada_and_grace
    margin = answer(store, query).margin_l2
    assert margin > 0
    assert answer(store, query, margin_l2=margin).person == "Ada", "ahead by at least the margin is enough"
    assert answer(store, query, margin_l2=math.nextafter(margin, math.inf)).person is None


def test_margin_is_measured_to_the_second_best_person_not_to_another_template(path, rng):
    ada = unit(rng)
    store = enrol(path, {"Ada": np.concatenate([ada, nudged(ada[0], rng, 0.05)[None, :]]), "Grace": unit(rng)})
    match = answer(store, nudged(ada[0], rng, 0.3)[None, :], threshold_l2=0.6, margin_l2=0.3)
    assert match.person == "Ada", "Ada's second template is not a rival"
    assert match.margin_l2 > 0.9


# ---- durability order -------------------------------------------------------------------------------------------


def name_of(path: Path, store_path: Path) -> str:
    """The role of a path in a save: store, backup, temp (new store), staging (new backup name), folder."""
    name = path.name
    if path == store_path.parent:
        return "folder"
    if name == store_path.name:
        return "store"
    if name == store_path.name + ".bak":
        return "backup"
    if name.startswith(f".{store_path.name}.bak.") and name.endswith(".tmp"):
        return "staging"
    if name.startswith(f".{store_path.name}.") and name.endswith(".tmp"):
        return "temp"
    return name


@pytest.fixture
def calls(monkeypatch, path: Path) -> list[tuple]:
    """Every fsync, link and rename, in order, with the bytes an fsynced file held at that moment."""
    recorded: list[tuple] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        content = target.read_bytes() if target.is_file() else None
        recorded.append(("fsync", name_of(target, path), content))
        real_fsync(fd)

    def replace(source, target) -> None:
        recorded.append(("rename", name_of(Path(source), path), name_of(Path(target), path)))
        real_replace(source, target)

    def link(source, target) -> None:
        recorded.append(("link", name_of(Path(source), path), name_of(Path(target), path)))
        real_link(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return recorded


def steps(calls: list[tuple]) -> list[tuple]:
    return [call[:2] if call[0] == "fsync" else call for call in calls]


def test_first_save_fsyncs_the_full_temp_file_then_renames_then_fsyncs_the_folder(path, rng, calls):
    enrol(path, {"Ada": unit(rng)})
    assert steps(calls) == [("fsync", "temp"), ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[0][2] == path.read_bytes(), "the temp file was complete when it was fsynced"


def test_a_save_keeps_the_previous_file_as_backup_before_replacing_it(path, rng, calls):
    store = enrol(path, {"Ada": unit(rng)})
    previous = path.read_bytes()
    calls.clear()
    with store.edit():
        store.add_person("Grace", unit(rng))
    assert steps(calls) == [("fsync", "temp"), ("link", "store", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[0][2] == path.read_bytes()
    assert store.backup_path.read_bytes() == previous


def test_an_erasing_save_makes_the_backup_the_new_file(path, rng, calls):
    store = enrol(path, {"Ada": unit(rng), "Grace": unit(rng)})
    calls.clear()
    with store.edit():
        store.remove("Ada")
    assert steps(calls) == [("fsync", "temp"), ("link", "temp", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert store.backup_path.read_bytes() == path.read_bytes() == calls[0][2]


def test_a_copied_backup_is_fsynced_before_it_gets_its_name(path, rng, calls, monkeypatch):
    store = enrol(path, {"Ada": unit(rng)})
    previous = path.read_bytes()

    def no_hard_links(source, target) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    calls.clear()
    with store.edit():
        store.add_person("Grace", unit(rng))
    assert steps(calls) == [("fsync", "temp"), ("fsync", "staging"), ("rename", "staging", "backup"),
                            ("rename", "temp", "store"), ("fsync", "folder")]
    assert calls[1][2] == previous, "the copy was complete when it was fsynced"


def test_a_new_key_file_is_fsynced_and_so_is_its_folder(tmp_path, calls):
    key = generate_key(tmp_path / "store.key")
    assert [(call[0], call[1]) for call in calls] == [("fsync", "store.key"), ("fsync", "folder")]
    assert calls[0][2] == key.read_bytes() and len(calls[0][2]) == 32
