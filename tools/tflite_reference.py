"""Write the reference outputs of a .tflite model, computed by Google's own interpreter, for the converter's test.

    python tools/tflite_reference.py MODEL.tflite REFERENCE.npz

REFERENCE.npz holds `input`, one uint8 NHWC image; the model is run on it as float32 / 255 (the input range of
MediaPipe's landmark models) and every output is written back into the file under its tensor name, next to the
input. Needs only numpy and the LiteRT interpreter (`pip install ai-edge-litert`, in a scratch virtual
environment: it is not a dependency of the project). tests/data/facemesh_reference.npz and iris_reference.npz
were made this way from the FaceMesh crop (edge.blink.crop) of the face in samples/photos/obama.jpg and the iris
crop of its eye on the image's left.
"""
from __future__ import annotations

import sys

import numpy as np


def main(model_path: str, reference_path: str) -> int:
    from ai_edge_litert.interpreter import Interpreter

    with np.load(reference_path) as saved:
        image = saved["input"]
    interpreter = Interpreter(model_path=model_path)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image.astype(np.float32) / 255.0)
    interpreter.invoke()
    outputs = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    np.savez_compressed(reference_path, input=image, **outputs)
    print(f"{reference_path}: {', '.join(f'{k} {v.shape}' for k, v in outputs.items())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
