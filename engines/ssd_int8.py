"""The res10 SSD detector quantised to int8 (weights per channel, activations per tensor), for CPUs.

`python -m engines.ssd_int8 ONNX INT8_ONNX`. ONNX Runtime's static quantiser rewrites the fp32 graph made by
engines.ssd_to_onnx as QDQ (QuantizeLinear/DequantizeLinear pairs that its CPU provider fuses into int8
kernels: VNNI on x86, dot-product instructions on a Raspberry Pi 5 / Jetson's Cortex-A cores). Activation
ranges are calibrated (min/max, deterministic) on the photos bundled in samples/ and their mirror images at
300×300; the sample video, on which recall is measured, is not used.
The fp32 model's metadata (PriorBox / DetectionOutput parameters) is copied over, so edge.detect reads both
the same way. Measured on the sample video (640 px frames, 360×300 input): faces in 94 of 105 frames (fp32: 92),
with ×2–3 less detector time (see README, Speed).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edge.errors import ModelError
from engines.fetch import PROJECT_ROOT, write_atomically
from engines.onnx_common import run_conversion

CALIBRATION_GLOBS = ("samples/people/*/*.jpg", "samples/photos/*.jpg")
CALIBRATION_SIDE_PX = 640  # photos downscaled as the detector does by default, then seen at 300×300


def extra_inputs() -> list[Path]:
    """The bundled photos the activation ranges are taken from (engines.fetch keys the conversion on them too)."""
    return sorted(p for pattern in CALIBRATION_GLOBS for p in PROJECT_ROOT.glob(pattern))


def calibration_blobs() -> list[np.ndarray]:
    """Detector input blobs for each calibration photo and its mirror image, as edge.detect makes them."""
    from edge.detect import preprocess
    from edge.images import load_image

    images = [load_image(path) for path in extra_inputs()]
    if not images:
        raise ModelError(f"no calibration photos under {PROJECT_ROOT / 'samples'}: the checkout is incomplete")
    return [preprocess(image, CALIBRATION_SIDE_PX) for original in images
            for image in (original, np.ascontiguousarray(original[:, ::-1]))]


def convert(onnx_path: Path, int8_path: Path) -> None:
    """Quantise onnx_path (the fp32 SSD) into int8_path, atomically."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, int8_path = Path(onnx_path), Path(int8_path)
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path} not found: run `make models`")
    fp32 = onnx.load(str(onnx_path))
    input_name = fp32.graph.input[0].name
    feeds = iter([{input_name: blob} for blob in calibration_blobs()])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    logging.disable(logging.WARNING)  # the quantiser warns on the root logger about rank-1 gains it rightly skips
    try:
        with tempfile.TemporaryDirectory(prefix="ssd_int8.") as tmp:
            prepared, quantised = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(quantised), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            model = onnx.load(str(quantised))
    finally:
        logging.disable(logging.NOTSET)
    del model.metadata_props[:]
    model.metadata_props.extend(fp32.metadata_props)
    onnx.checker.check_model(model)
    write_atomically(model.SerializeToString(), int8_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.ssd_int8", description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="the fp32 res10 SSD made by engines.ssd_to_onnx")
    parser.add_argument("int8_onnx", type=Path, help="output .onnx file")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert(args.onnx, args.int8_onnx), args.int8_onnx)


if __name__ == "__main__":
    sys.exit(main())
