"""Build the TensorRT engine of the embedding model: ONNX → <models_dir>/dlib_resnet_<precision>.engine + metadata.

`python -m engines.build_trt [--precision fp16|fp32] [--max-batch N] [--workspace-mib MIB] [--models-dir DIR]
[--dry-run]` (or `make engine`). An engine only runs with the TensorRT version and GPU that built it, so the
JSON metadata written next to it records both, with the sha256 of the ONNX it came from; the embedder checks
them before loading it. `--dry-run` needs no GPU: it checks the ONNX graph and the settings and prints the plan.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge.backends.tensorrt import ENGINE_STEM, engine_path_in, metadata_path, runtime_or_reason
from edge.embed import CHIP_PX, ONNX_FILE
from edge.errors import ConfigError, EdgeError, ModelError, first_line
from engines.fetch import default_models_dir, sha256_file, write_atomically

FP16_ONNX_FILE = ONNX_FILE.removesuffix(".onnx") + ".fp16.onnx"  # what an FP16 engine is parsed from
INPUT_NAME = "chips"
OUTPUT_NAME = "embeddings"
CHIP_DIMS = (3, CHIP_PX, CHIP_PX)
EMBEDDING_DIM = 128
MIN_BATCH = 1
OPT_BATCH = 4
MAX_BATCH_LIMIT = 64  # embedder.max_batch allows up to 64
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_MIB = 1024
MIB = 1 << 20
TIMING_CACHE_FILE = f"{ENGINE_STEM}.timing-cache"
JETSON_NOTES = "see the README's TensorRT/Jetson notes (engines/TENSORRT.md)"


@dataclass(frozen=True)
class BuildSettings:
    """What to build: precision, the batch range of the optimization profile and the builder's workspace."""

    precision: str = "fp16"
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_mib: int = DEFAULT_WORKSPACE_MIB

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch; opt is the typical number of faces in a frame, capped by max."""
        return MIN_BATCH, min(OPT_BATCH, self.max_batch), self.max_batch

    def check(self) -> None:
        """Raise ConfigError (one line) when the settings cannot make a valid engine."""
        if self.precision not in ("fp16", "fp32"):
            raise ConfigError(f"--precision must be fp16 or fp32, not {self.precision!r}")
        low, opt, high = self.profile
        if not (1 <= low <= opt <= high <= MAX_BATCH_LIMIT):
            raise ConfigError(
                f"--max-batch {self.max_batch} gives batch profile {low}/{opt}/{high}; "
                f"need 1 ≤ min ≤ opt ≤ max ≤ {MAX_BATCH_LIMIT}"
            )
        if self.workspace_mib <= 0:
            raise ConfigError(f"--workspace-mib must be > 0, not {self.workspace_mib}")


def _dims(value_info) -> list[int | str]:
    """An ONNX tensor's dims: ints where fixed, the symbolic name (or '?') where dynamic."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def checked_onnx(onnx_path: Path):
    """(model, one-line description of its I/O); ModelError unless the file is a valid ONNX graph with input chips
    [batch,3,150,150] float32 → embeddings [batch,128] float32 and a dynamic batch."""
    import onnx

    if not onnx_path.exists():
        raise ModelError(f"embedding model {onnx_path} missing: run `make models`")
    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
    except Exception as err:
        reason = first_line(err, type(err).__name__)
        raise ModelError(f"{onnx_path} is not a valid ONNX model ({reason}): run `make models` again") from None
    return model, check_io(model, onnx_path)


def check_io(model, label: Path | str) -> str:
    """checked_onnx's I/O rules for a loaded model (`label` names it in errors); the I/O description."""
    import onnx

    graph = model.graph
    weights = {w.name for w in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    expected = (("input", inputs, INPUT_NAME, CHIP_DIMS), ("output", list(graph.output), OUTPUT_NAME, (EMBEDDING_DIM,)))
    described = []
    for role, tensors, name, fixed in expected:
        if [t.name for t in tensors] != [name]:
            raise ModelError(f"{label}: {role}s are {[t.name for t in tensors]}, expected ['{name}']")
        elem_type = tensors[0].type.tensor_type.elem_type
        if elem_type != onnx.TensorProto.FLOAT:
            dtype = onnx.TensorProto.DataType.Name(elem_type)
            raise ModelError(f"{label}: {role} {name} is {dtype}, expected FLOAT")
        dims = _dims(tensors[0])
        if len(dims) != 1 + len(fixed) or tuple(dims[1:]) != fixed:
            raise ModelError(f"{label}: {role} {name} has shape {dims}, expected [batch, {', '.join(map(str, fixed))}]")
        if isinstance(dims[0], int):
            raise ModelError(f"{label}: {role} {name} has a fixed batch of {dims[0]}; the engine needs a dynamic batch")
        described.append(f"{name} [{', '.join(map(str, dims))}] float32")
    return " → ".join(described)


def fp16_graph(model, label: Path | str):
    """The FP16 form of a checked model (engines/onnx_fp16.py) and a one-line description; its I/O is checked."""
    from engines.onnx_fp16 import float16_initializers, to_fp16

    try:
        converted = to_fp16(model)
    except Exception as err:
        raise ModelError(f"{label}: could not make its FP16 graph ({first_line(err, type(err).__name__)})") from None
    check_io(converted, f"{label} (fp16 graph)")
    halves, singles = float16_initializers(converted)
    return converted, f"{halves} float16 weights, {singles} float32, I/O float32; checker passed"


def import_tensorrt():
    """The tensorrt module, or a ModelError naming the fix."""
    try:
        import tensorrt
    except ImportError as err:
        raise ModelError(f"TensorRT is not installed ({err}); {JETSON_NOTES}") from None
    return tensorrt


class EngineBuilder:
    """ONNX → serialized TensorRT engine: a strongly typed network parsed with OnnxParser, one optimization profile."""

    def __init__(self, settings: BuildSettings, *, verbose: bool = False) -> None:
        trt = self.trt = import_tensorrt()
        self.settings = settings
        self.logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.config = self.builder.create_builder_config()
        self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib * MIB)
        self.network = None
        self.parser = None

    def fp16_problem(self) -> str | None:
        """Why an FP16 engine would be slow here; None when it is fine. TensorRT 11 dropped the query (and weak
        typing with it): there the FP16 graph decides the precision and the GPU is taken to have fast FP16."""
        if getattr(self.builder, "platform_has_fast_fp16", True):
            return None
        return "this GPU has no fast FP16"

    def create_network(self, onnx_path: Path) -> None:
        """Parse the ONNX into a strongly typed network (the graph's own types: float16 in the FP16 graph,
        float32 otherwise) and add the min/opt/max batch profile for its input."""
        trt = self.trt
        flags = 0
        creation = trt.NetworkDefinitionCreationFlag
        if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        if hasattr(creation, "STRONGLY_TYPED"):  # opt-in on 10.x; 11.x is always strongly typed
            flags |= 1 << int(creation.STRONGLY_TYPED)
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)  # kept: the network uses weights it owns
        if not self.parser.parse_from_file(str(onnx_path)):
            first = first_line(self.parser.get_error(0) if self.parser.num_errors else "")
            raise ModelError(f"TensorRT could not parse {onnx_path}: {first}")
        chips = self.network.get_input(0)
        chip_dims = tuple(chips.shape)[1:]
        low, opt, high = self.settings.profile
        profile = self.builder.create_optimization_profile()
        profile.set_shape(chips.name, (low, *chip_dims), (opt, *chip_dims), (high, *chip_dims))
        self.config.add_optimization_profile(profile)

    def create_engine(self, *, timing_cache_path: Path):
        """The serialized engine (IHostMemory); the timing cache is read before the build and saved after it."""
        if self.network is None:
            raise ModelError("EngineBuilder.create_network must run before create_engine")
        self._attach_timing_cache(timing_cache_path)
        serialized = self.builder.build_serialized_network(self.network, self.config)
        if serialized is None:
            raise ModelError("TensorRT failed to build the engine (its messages above say why)")
        write_atomically(bytes(memoryview(self.config.get_timing_cache().serialize())), timing_cache_path)
        return serialized

    def _attach_timing_cache(self, path: Path) -> None:
        """Reuse the timing cache of earlier builds; one from another GPU or TensorRT is replaced by a fresh one."""
        blob = path.read_bytes() if path.exists() else b""
        if blob:
            try:
                cache = self.config.create_timing_cache(blob)
                if cache is not None and self.config.set_timing_cache(cache, ignore_mismatch=False):
                    return
            except Exception:  # a truncated or foreign cache file only costs build time
                pass
            print(f"build_trt: timing cache {path.name} is unusable here; starting afresh", file=sys.stderr)
        self.config.set_timing_cache(self.config.create_timing_cache(b""), ignore_mismatch=False)


def plan_metadata(onnx_sha256: str, precision: str, settings: BuildSettings, runtime: dict | None) -> dict:
    """The metadata record of an engine (build fields None until it is built)."""
    runtime = runtime or {}
    return {
        "tensorrt_version": runtime.get("tensorrt_version"),
        "gpu_name": runtime.get("gpu_name"),
        "compute_capability": runtime.get("compute_capability"),
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "max_batch": settings.max_batch,
        "built_from": FP16_ONNX_FILE if precision == "fp16" else ONNX_FILE,
        "built_at": None,
        "build_s": None,
    }


def dry_run(models_dir: Path, settings: BuildSettings) -> dict:
    """Check the settings and the ONNX, print the plan to stderr; returns the metadata that would be written."""
    settings.check()
    onnx_path = models_dir / ONNX_FILE
    model, io = checked_onnx(onnx_path)
    fp16_line = fp16_graph(model, onnx_path)[1] if settings.precision == "fp16" else None
    onnx_sha = sha256_file(onnx_path)
    runtime, why = runtime_or_reason()
    engine_path = engine_path_in(models_dir, settings.precision)
    cache_path = models_dir / TIMING_CACHE_FILE
    low, opt, high = settings.profile
    where = (
        f"TensorRT {runtime['tensorrt_version']} on {runtime['gpu_name']} (compute {runtime['compute_capability']})"
        if runtime
        else f"not usable here ({why}); the real build needs TensorRT + pycuda + an NVIDIA GPU"
    )
    fp16_note = " (the FP16 graph where the GPU has fast FP16, else an fp32 engine)"
    precision_note = fp16_note if settings.precision == "fp16" else ""
    lines = [
        "build_trt: dry run, nothing written",
        f"  onnx          {onnx_path} (sha256 {onnx_sha[:12]}…)",
        f"  graph         {io}; checker passed",
        f"  precision     {settings.precision}{precision_note}",
        *([f"  fp16 graph    {models_dir / FP16_ONNX_FILE}: {fp16_line}"] if fp16_line else []),
        f"  profile       batch min/opt/max {low}/{opt}/{high}",
        f"  workspace     {settings.workspace_mib} MiB",
        f"  engine        {engine_path}",
        f"  metadata      {metadata_path(engine_path)}",
        f"  timing cache  {cache_path} ({'reused' if cache_path.exists() else 'created'})",
        f"  runtime       {where}",
    ]
    print("\n".join(lines), file=sys.stderr)
    return plan_metadata(onnx_sha, settings.precision, settings, runtime)


def build_engine(models_dir: Path, settings: BuildSettings, *, verbose: bool = False) -> dict:
    """Build <models_dir>/dlib_resnet_<precision>.engine and its metadata; returns the metadata written."""
    settings.check()
    onnx_path = models_dir / ONNX_FILE
    model, _ = checked_onnx(onnx_path)
    import_tensorrt()
    runtime, why = runtime_or_reason()
    if runtime is None:
        raise ModelError(f"cannot build a TensorRT engine here: {why}; {JETSON_NOTES}")
    builder = EngineBuilder(settings, verbose=verbose)
    precision = settings.precision
    if precision == "fp16" and (why_not := builder.fp16_problem()):
        print(f"build_trt: {why_not}; building an fp32 engine instead", file=sys.stderr)
        precision = "fp32"
    source = models_dir / (FP16_ONNX_FILE if precision == "fp16" else ONNX_FILE)
    if precision == "fp16":  # strongly typed: the precision is in the graph (TensorRT 11 has no FP16 flag)
        write_atomically(fp16_graph(model, onnx_path)[0].SerializeToString(), source)
    engine_path = engine_path_in(models_dir, precision)
    meta = plan_metadata(sha256_file(onnx_path), precision, settings, runtime)
    low, opt, high = settings.profile
    print(f"build_trt: building {engine_path.name} ({precision}, batch {low}/{opt}/{high}); minutes on a Jetson", file=sys.stderr)
    start = time.perf_counter()
    builder.create_network(source)
    serialized = builder.create_engine(timing_cache_path=models_dir / TIMING_CACHE_FILE)
    meta["build_s"] = round(time.perf_counter() - start, 1)
    meta["built_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Metadata goes first and comes back last: an interrupted write leaves an engine the embedder calls stale.
    metadata_path(engine_path).unlink(missing_ok=True)
    write_atomically(bytes(memoryview(serialized)), engine_path)
    write_atomically((json.dumps(meta, indent=2) + "\n").encode(), metadata_path(engine_path))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.build_trt", description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="fp16 falls back to fp32 without fast FP16")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="largest batch the engine takes")
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB, help="builder workspace limit (MiB)")
    parser.add_argument("--models-dir", type=Path, default=None, help="ONNX in, engine out (default: ./models)")
    parser.add_argument("--dry-run", action="store_true", help="check the ONNX and settings, print the plan; no GPU needed")
    parser.add_argument("--verbose", action="store_true", help="show TensorRT's INFO messages while building")
    args = parser.parse_args(argv)
    settings = BuildSettings(precision=args.precision, max_batch=args.max_batch, workspace_mib=args.workspace_mib)
    models_dir = args.models_dir or default_models_dir()
    try:
        if args.dry_run:
            meta = dry_run(models_dir, settings)
        else:
            meta = build_engine(models_dir, settings, verbose=args.verbose)
    except EdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"error: {err.filename or models_dir}: {err.strerror}", file=sys.stderr)
        return 2
    except Exception as err:  # TensorRT raises plain RuntimeError/TypeError; the user gets one line, not a traceback
        print(f"error: engine build failed ({type(err).__name__}: {first_line(err)})", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"build_trt: ok  {meta['precision']} engine built in {meta['build_s']} s", file=sys.stderr)
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
