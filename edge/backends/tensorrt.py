"""TensorRT backend (Jetson / NVIDIA GPU): runs a serialized engine built by `make engine` (engines/build_trt.py).

Everything TensorRT- or CUDA-specific is imported inside functions, so importing this module on a CPU-only
machine costs nothing. Each engine has a JSON metadata file next to it; an engine whose metadata does not
match the installed TensorRT, the GPU or the ONNX model is stale and is never loaded.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np

from edge.errors import InputError, ModelError, first_line

log = logging.getLogger(__name__)

ENGINE_STEM = "dlib_resnet"
# Preference order for `auto`: FP16 where it was built (fast-FP16 GPUs); the GPU test holds it to ONNX Runtime.
PRECISIONS = ("fp16", "fp32")
RUNTIME_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")
METADATA_KEYS = (*RUNTIME_KEYS, "onnx_sha256", "precision", "max_batch")
REBUILD_HINT = "run `make engine` to rebuild"


def engine_path_in(models_dir: Path, precision: str) -> Path:
    """Where the engine of one precision lives: <models_dir>/dlib_resnet_<precision>.engine."""
    return Path(models_dir) / f"{ENGINE_STEM}_{precision}.engine"


def metadata_path(engine_path: Path) -> Path:
    """The metadata written next to an engine: <engine>.json."""
    return engine_path.with_name(engine_path.name + ".json")


def runtime_or_reason(device: int = 0) -> tuple[dict | None, str]:
    """(runtime facts, "") when TensorRT, pycuda and a GPU are usable, else (None, why not); never raises."""
    try:
        for module in ("tensorrt", "pycuda"):
            if importlib.util.find_spec(module) is None:
                return None, f"{module} is not installed"
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        if cuda.Device.count() <= device:
            return None, f"no NVIDIA GPU #{device} visible to CUDA"
        gpu = cuda.Device(device)
        major, minor = gpu.compute_capability()
        return {"tensorrt_version": trt.__version__, "gpu_name": gpu.name(), "compute_capability": f"{major}.{minor}"}, ""
    except Exception as err:  # a broken CUDA install must read as "no TensorRT here", never crash the caller
        return None, f"TensorRT/CUDA not usable ({type(err).__name__}: {first_line(err)})"


def probe_runtime() -> dict | None:
    """{tensorrt_version, gpu_name, compute_capability} when TensorRT + pycuda + a GPU are usable, else None."""
    return runtime_or_reason()[0]


def engine_metadata_problem(
    meta: dict | None, *, onnx_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str
) -> str | None:
    """Why an engine with this metadata must not be used here (None when it matches); meta None = no metadata."""
    if meta is None:
        return "its metadata file is missing"
    if not isinstance(meta, dict):
        return "its metadata is corrupt (not a JSON object)"
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        return f"its metadata is corrupt (no {', '.join(missing)})"
    problems = []
    if str(meta["tensorrt_version"]) != tensorrt_version:
        problems.append(f"engine was built for TensorRT {meta['tensorrt_version']} but {tensorrt_version} is installed")
    if str(meta["gpu_name"]) != gpu_name:
        problems.append(f"engine was built on GPU '{meta['gpu_name']}' but this GPU is '{gpu_name}'")
    if str(meta["compute_capability"]) != compute_capability:
        problems.append(
            f"engine was built for compute capability {meta['compute_capability']} but this GPU has {compute_capability}"
        )
    if str(meta["onnx_sha256"]) != onnx_sha256:
        problems.append(
            f"engine was built from ONNX sha256 {str(meta['onnx_sha256'])[:12]}… but the model is {onnx_sha256[:12]}…"
        )
    return "; ".join(problems) or None


def engine_problem(engine_path: Path, *, onnx_sha256: str, runtime: dict) -> str | None:
    """engine_metadata_problem for the metadata file next to engine_path (missing or unreadable JSON included)."""
    try:
        meta = json.loads(metadata_path(engine_path).read_text())
    except FileNotFoundError:
        meta = None
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its metadata {metadata_path(engine_path).name} is corrupt (not valid JSON)"
    return engine_metadata_problem(meta, onnx_sha256=onnx_sha256, **{k: runtime[k] for k in RUNTIME_KEYS})


def open_matching_engine(models_dir: Path, *, onnx_sha256: str, required: bool) -> TensorRTBackend | None:
    """A TensorRTBackend on the first matching engine (fp16, then fp32), or None to fall back to ONNX Runtime.

    required=True (backend: tensorrt) turns every reason for None into a ModelError. Otherwise a stale or
    unloadable engine is one warning line, and no engine file at all imports nothing (the CPU path).
    """
    engines = [p for p in (engine_path_in(models_dir, precision) for precision in PRECISIONS) if p.exists()]
    if not engines:
        if required:
            raise ModelError(f"no TensorRT engine in {models_dir}: run `make engine` on this device")
        return None
    runtime = probe_runtime()
    if runtime is None:
        why = runtime_or_reason()[1] or "TensorRT is not usable"
        if required:
            raise ModelError(
                f"embedder.backend is tensorrt but {why}: install TensorRT + pycuda (engines/TENSORRT.md) "
                f"or set embedder.backend: auto"
            )
        log.info("tensorrt engine %s not used (%s); using onnxruntime", engines[0], why)
        return None
    stale: tuple[Path, str] | None = None
    for path in engines:
        problem = engine_problem(path, onnx_sha256=onnx_sha256, runtime=runtime)
        if problem is None:
            return _load(path, required=required)
        stale = stale or (path, problem)
    path, problem = stale
    if required:
        raise ModelError(f"tensorrt engine {path} is stale ({problem}): {REBUILD_HINT}")
    log.warning("tensorrt engine %s is stale (%s); using onnxruntime — %s", path, problem, REBUILD_HINT)
    return None


def _load(path: Path, *, required: bool) -> TensorRTBackend | None:
    """TensorRTBackend(path); when not required, a load failure is one warning line and None."""
    try:
        return TensorRTBackend(engine_path=path)
    except Exception as err:
        if required:
            raise ModelError(f"tensorrt engine {path} could not be loaded ({err}): {REBUILD_HINT}") from None
        log.warning("tensorrt engine %s could not be loaded (%s); using onnxruntime — %s", path, err, REBUILD_HINT)
        return None


class TensorRTBackend:
    """TensorRTInfer: one engine, one execution context, one stream and buffers allocated once for max batch.

    It owns a CUDA context of its own, current only inside __init__, infer() and close(), so it neither
    needs pycuda.autoinit nor disturbs other CUDA users in the process.
    """

    name = "tensorrt"

    def __init__(self, *, engine_path: Path, device: int = 0) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        self.engine_path = Path(engine_path)
        cuda.init()
        self._ctx = cuda.Device(device).make_context()
        try:
            self._setup(trt)
        except Exception:
            self._release()
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        self._ctx.pop()

    def _setup(self, trt) -> None:
        """Deserialize, find the I/O tensors by name and allocate host (page-locked) and device buffers."""
        cuda = self._cuda
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ModelError(f"TensorRT {trt.__version__} cannot deserialize it: corrupt, or built by another TensorRT")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"it has inputs {inputs} and outputs {outputs}; expected one of each")
        self._input, self._output = inputs[0], outputs[0]
        max_shape = tuple(self._engine.get_tensor_profile_shape(self._input, 0)[2])
        self.max_batch = int(max_shape[0])
        self._chip_shape = max_shape[1:]
        self._out_dims = tuple(self._engine.get_tensor_shape(self._output))[1:]
        if any(d < 0 for d in self._out_dims):
            raise ModelError(f"its output {self._output} has dynamic dims {self._out_dims}")
        in_dtype = trt.nptype(self._engine.get_tensor_dtype(self._input))
        out_dtype = trt.nptype(self._engine.get_tensor_dtype(self._output))
        self._host_in = cuda.pagelocked_empty((self.max_batch, *self._chip_shape), in_dtype)
        self._host_out = cuda.pagelocked_empty((self.max_batch, *self._out_dims), out_dtype)
        self._dev_in = cuda.mem_alloc(self._host_in.nbytes)
        self._dev_out = cuda.mem_alloc(self._host_out.nbytes)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ModelError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = cuda.Stream()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, 150, 150) float32 RGB 0..255 → (N, 128) float32 raw descriptors; N > max_batch is split."""
        if self._ctx is None:
            raise ModelError(f"tensorrt backend for {self.engine_path} is closed")
        if x.ndim != 4 or tuple(x.shape[1:]) != self._chip_shape:
            raise InputError(f"tensorrt backend expects (N, {', '.join(map(str, self._chip_shape))}), got {x.shape}")
        out = np.empty((len(x), *self._out_dims), np.float32)
        self._ctx.push()
        try:
            for start in range(0, len(x), self.max_batch):
                chunk = x[start : start + self.max_batch]
                out[start : start + len(chunk)] = self._run(chunk)
        finally:
            self._ctx.pop()
        return out

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """One forward pass of ≤ max_batch chips through the preallocated buffers (context already current)."""
        cuda, n = self._cuda, len(chunk)
        self._host_in[:n] = chunk
        if not self._context.set_input_shape(self._input, (n, *self._chip_shape)):
            raise InputError(f"tensorrt engine {self.engine_path} rejects batch {n}")
        self._context.set_tensor_address(self._input, int(self._dev_in))
        self._context.set_tensor_address(self._output, int(self._dev_out))
        cuda.memcpy_htod_async(self._dev_in, self._host_in[:n], self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelError(f"tensorrt engine {self.engine_path}: execute_async_v3 failed")
        cuda.memcpy_dtoh_async(self._host_out[:n], self._dev_out, self._stream)
        self._stream.synchronize()
        return self._host_out[:n]

    def _release(self) -> None:
        """Free buffers and TensorRT objects (our context must be current); safe on a half-built instance."""
        for name in ("_dev_in", "_dev_out"):
            allocation = getattr(self, name, None)
            if allocation is not None:
                allocation.free()
        for name in ("_host_in", "_host_out"):
            array = getattr(self, name, None)
            if array is not None:
                array.base.free()
        for name in ("_stream", "_context", "_engine", "_runtime", "_dev_in", "_dev_out", "_host_in", "_host_out"):
            setattr(self, name, None)

    def close(self) -> None:
        """Free everything and destroy the CUDA context; calling it again does nothing."""
        if self._ctx is None:
            return
        self._ctx.push()
        try:
            self._release()
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
