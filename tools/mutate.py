"""Mutation testing of the safety-critical modules with mutmut: how many small planted bugs do the tests catch?

    python tools/mutate.py                      every module in MODULES, one after the other
    python tools/mutate.py decide door          only these
    python tools/mutate.py --without 'test_promises_*'   the same, leaving some test files out (a "before" run)
    python tools/mutate.py store --label store --recheck  the last run's survivors against the tests added since

Each run works in out/mutate/<label>/ ("current", or "before" with --without), where mutmut copies the project
afresh into its mutants/ folder. mutmut first records which tests call which function, then runs, per mutant, only
the tests that reach the mutated function. A mutant counts as caught when a test fails or runs out of time. Prints
one line per module and keeps out/mutate/<label>/summary.json: per module the commit, the counts and every
surviving mutant with its diff.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module -> the test files whose in-process tests exercise it (mutmut narrows these down per function)
MODULES = {
    "decide": ["test_decide.py", "test_promises_decide.py", "test_promises_door.py", "test_kiosk.py", "test_fuse.py",
               "test_liveness.py", "test_promises_kiosk_wiring.py"],
    "door": ["test_door.py", "test_promises_door.py", "test_kiosk.py"],
    "kiosk": ["test_kiosk.py", "test_promises_kiosk.py", "test_promises_kiosk_wiring.py", "test_promises_door.py",
              "test_promises_enrolment.py", "test_fuse.py", "test_liveness.py", "test_blink.py"],
    "store": ["test_store.py", "test_promises_store.py", "test_names.py", "test_kiosk.py"],
    "quality": ["test_promises_enrolment.py", "test_kiosk.py"],
    "fuse": ["test_fuse.py", "test_promises_fuse.py", "test_decide.py", "test_promises_decide.py"],
    "liveness": ["test_liveness.py", "test_promises_liveness.py", "test_kiosk.py", "test_blink.py"],
    "blink": ["test_blink.py", "test_promises_blink.py", "test_promises_liveness.py", "test_liveness.py"],
    "fleet.sync": ["test_fleet.py", "test_promises_fleet.py"],
}
# Left out of mutation runs (`make test` runs them): tests that reach the code only through a child process (mutmut's
# map of which test calls which function cannot see into children, so they would never be chosen for a mutant, only
# slow down its first run), and tests too slow to repeat for every mutant whose promises faster tests pin as well:
# SIGKILLed store writers (~10 s; test_promises_store records the write order), a kiosk on the real models (store
# reload: test_promises_kiosk), a live camera's reconnection (the camera is not mutated; the loop's side of a lost
# camera: test_promises_door, test_promises_kiosk).
SKIP_FIXTURES = ["video"]  # test_kiosk's CLI runs over the sample video (tools/mutate_plugin.py)
DESELECT = [
    "tests/test_kiosk.py::test_cli_enrolment_is_picked_up_by_a_running_kiosk",
    "tests/test_kiosk.py::test_live_camera_disconnect_recovers_within_5_s_without_restart",
    "tests/test_door.py::test_sigterm_during_pulse_leaves_relay_off_and_released",
    "tests/test_promises_enrolment.py::test_cli_enrolment_applies_each_gate",
    "tests/test_store.py::test_two_writing_processes_lose_nothing",
    "tests/test_store.py::test_sigkill_during_saves_loses_no_committed_person",
    "tests/test_fleet.py::test_fleet_sim_three_door_processes_converge_and_survive_a_partition",
]
# What the copied project needs besides edge/ and tests/ (models come through EDGE_MODELS_DIR).
LINKED = ["edge", "tests", "engines", "samples"]
KILLED = {1, 3}  # mutmut exit codes: a test failed or pytest errored
TIMEOUT = {24, -24, 36, 152, 255}  # the tests ran out of time (an endless loop counts as caught)
CAUGHT = KILLED | TIMEOUT
NOT_RUN = {33: "no test reaches it", 34: "skipped", None: "not checked"}


def source_path(module: str) -> str:
    """edge/<module>.py, a dotted module name (fleet.sync) as a path (edge/fleet/sync.py)."""
    return f"edge/{module.replace('.', '/')}.py"


def test_files(module: str, without: list[str]) -> list[str]:
    """The module's test files that exist and are not left out by a --without pattern."""
    return [f"tests/{name}" for name in MODULES[module]
            if (ROOT / "tests" / name).exists() and not any(fnmatch.fnmatch(name, p) for p in without)]


def prepare(work: Path, modules: list[str], without: list[str]) -> None:
    """A folder mutmut can run in: links to the project and a pyproject.toml with the [tool.mutmut] table."""
    shutil.rmtree(work / "mutants", ignore_errors=True)  # mutmut would keep stale copies of unmutated modules
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    tests = sorted({path for module in modules for path in test_files(module, without)})
    table = {
        "source_paths": ["edge"],
        "only_mutate": [source_path(module) for module in modules],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": [arg for test in DESELECT for arg in ("--deselect", test)]
        + ["-p", "no:cacheprovider", "-p", "mutate_plugin"],
        "also_copy": ["engines", "samples"],
    }
    toml = "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + f"\n[tool.mutmut]\n{toml}\n")


def campaign_env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "EDGE_MODELS_DIR": str(ROOT / "models"), "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "EDGE_SHARED_DATA": str(ROOT.parent / "shared" / "data"),
            "PYTHONPATH": os.pathsep.join(str(path) for path in (*paths, ROOT / "tools")),
            "MUTATE_SKIP_FIXTURES": " ".join(SKIP_FIXTURES)}


def run_campaign(work: Path, module: str, max_children: int) -> None:
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), f"edge.{module}.*"]
    subprocess.run(command, cwd=work, env=campaign_env(), check=True)


# Each survivor against the tests as they are now, in one process, switched by mutmut's own trampoline variable.
RECHECK = """
import contextlib, io, json, os, sys
import pytest
survivors, args = json.loads(sys.argv[1]), sys.argv[2:]
def fails(mutant):
    os.environ["MUTANT_UNDER_TEST"] = mutant
    with contextlib.redirect_stdout(io.StringIO()):
        return pytest.main(["-x", "-q", *args]) in (1, 3)  # as mutmut counts: a test failed or pytest errored
if fails(""):
    sys.exit("the tests fail on the unmutated code")
print(json.dumps([mutant for mutant in survivors if fails(mutant)]))
"""


def recheck(work: Path, module: str, without: list[str], commit: str) -> dict:
    """A finished run's survivors against the tests added since (copied afresh into mutmut's folder; the tests
    the run already had are left out: every survivor passed them). What the run caught stays caught."""
    row = json.loads((work / "summary.json").read_text())[module]
    mutants = work / "mutants"
    shutil.copytree(ROOT / "tests", mutants / "tests", dirs_exist_ok=True)
    survivors = [name for name, survivor in row["survivors"].items() if survivor["status"] in ("survived", NOT_RUN[33])]
    known = json.loads((mutants / "mutmut-stats.json").read_text())["duration_by_test"]
    args = [*test_files(module, without), "-p", "no:cacheprovider", "-p", "mutate_plugin",
            *(arg for test in [*DESELECT, *known] for arg in ("--deselect", test))]
    shown = subprocess.run([sys.executable, "-c", RECHECK, json.dumps(survivors), *args], cwd=mutants,
                           env=campaign_env(mutants), check=True, capture_output=True, text=True)
    caught = json.loads(shown.stdout.splitlines()[-1])
    checked = row["caught"] + sum(s["status"] in ("survived", NOT_RUN[33]) for s in row["survivors"].values())
    row["caught_on_recheck"] = {"commit": commit, "mutants": caught}
    row["caught"] += len(caught)
    row["survived"] -= len(caught)
    row["kill_rate"] = round(row["caught"] / checked, 4)
    row["survivors"] = {name: survivor for name, survivor in row["survivors"].items() if name not in caught}
    return row


def results(work: Path, module: str, commit: str) -> dict:
    """Caught/survived counts of one module from mutmut's meta file, with the survivors' names and diffs."""
    meta = json.loads((work / "mutants" / f"{source_path(module)}.meta").read_text())
    codes = meta["exit_code_by_key"]
    caught = sum(code in CAUGHT for code in codes.values())
    timeout = sum(code in TIMEOUT for code in codes.values())
    survivors = sorted(name for name, code in codes.items() if code not in CAUGHT)
    checked = sum(code not in (34, None) for code in codes.values())
    return {
        "commit": commit, "mutants": len(codes), "caught": caught, "timeout": timeout, "survived": len(survivors),
        "kill_rate": round(caught / checked, 4) if checked else None,
        "survivors": {name: {"status": NOT_RUN.get(codes[name], "survived"), "diff": diff}
                      for name, diff in diffs(work, module, survivors).items()},
    }


# mutmut's own diff of each mutant against the original function, all in one process (pinned mutmut 3.8.1)
DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path, names = sys.argv[1], sys.argv[2:]
print(json.dumps({name: get_diff_for_mutant(name, path=path) for name in names}))
"""


def diffs(work: Path, module: str, mutants: list[str]) -> dict[str, str]:
    shown = subprocess.run([sys.executable, "-c", DIFFS, source_path(module), *mutants], cwd=work, check=True,
                           capture_output=True, text=True)
    return {name: "\n".join(line for line in text.splitlines() if re.match(r"[-+@]", line) and line[:3] not in
                             ("---", "+++")) for name, text in json.loads(shown.stdout).items()}


def dirty() -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "edge", "tests"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--without", action="append", default=[], metavar="PATTERN",
                        help="leave out test files matching this pattern (e.g. 'test_promises_*' for a before run)")
    parser.add_argument("--label", default=None, help="folder under out/mutate (default: 'current', 'before' with --without)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--recheck", action="store_true",
                        help="run only the survivors of the last run in that folder against the tests added since")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    work = ROOT / "out" / "mutate" / (args.label or ("before" if args.without else "current"))
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = commit.stdout.strip() + (" (uncommitted changes)" if dirty() else "")
    if args.recheck:
        for module in modules:
            summary[module] = recheck(work, module, args.without, commit)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    else:
        prepare(work, modules, args.without)
        for module in modules:
            run_campaign(work, module, args.max_children)
            summary[module] = results(work, module, commit)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'module':<10}{'mutants':>9}{'caught':>8}{'timeout':>9}{'survived':>10}{'kill rate':>11}")
    for module, row in summary.items():
        rate = "-" if row["kill_rate"] is None else f"{row['kill_rate']:.1%}"
        print(f"{module:<10}{row['mutants']:>9}{row['caught']:>8}{row.get('timeout', '-'):>9}{row['survived']:>10}"
              f"{rate:>11}")
    print(f"survivors and their diffs: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
