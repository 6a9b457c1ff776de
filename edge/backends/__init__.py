"""Embedding backends: each runs the converted dlib ResNet on a batch of chips.

Interface (duck-typed, like opencv_zoo's models): `name`, `infer(x) -> ndarray` with x a float32
(N, 3, 150, 150) RGB batch of raw 0..255 pixels (the graph normalises) returning the raw (N, 128)
descriptors, and `close()`. Backends import their runtime lazily so the CPU path never imports TensorRT.
"""
