"""Convert dlib's shape_predictor_5_face_landmarks.dat into a compact .npz for edge.landmarks.

`python -m engines.sp_to_npz DAT NPZ`. The .dat is parsed with engines.dlib_serial (dlib is not needed); pure
Python parsing takes seconds, so it runs once at `make models` time. The .npz holds the cascade as dense
arrays (levels x trees x nodes) so that the predictor can evaluate every tree of a level at once:

    initial_shape    (P, 2)               float32  mean shape, box-normalised (x, y per part)
    split_idx1       (L, T, S)            uint16   feature index of each split node (breadth-first order)
    split_idx2       (L, T, S)            uint16
    split_threshold  (L, T, S)            float32  go to the left child when f[idx1] - f[idx2] > threshold
    leaf_values      (L, T, S + 1, P, 2)  float32  shape increment of each leaf
    anchor_idx       (L, F)               uint8    part each feature pixel is anchored to
    deltas           (L, F, 2)            float32  feature pixel offset from its anchor, in initial-shape space
    format_version   ()                   int32
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from engines.dlib_serial import DlibFormatError, DlibReader, parse_model_file
from engines.onnx_common import run_conversion

FORMAT_VERSION = 1
DLIB_SP_VERSION = 1
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry times make the .npz byte-identical across runs
FILE_MODE = 0o666  # before the umask, like a file made by open(); mkstemp would leave 0600


def _read_tree(reader: DlibReader) -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
    """One regression tree: its splits (idx1, idx2, threshold) and its leaf vectors."""
    splits = reader.read_vector(lambda: (reader.read_uint(), reader.read_uint(), reader.read_float()))
    leaves = reader.read_vector(reader.read_matrix)
    return splits, leaves


def _read_point(reader: DlibReader) -> tuple[float, float]:
    """A dlib::vector<float, 2> (x then y)."""
    return reader.read_float(), reader.read_float()


def parse_shape_predictor(data: bytes) -> dict[str, np.ndarray]:
    """The arrays described in the module docstring, from the bytes of a dlib shape_predictor file."""
    reader = DlibReader(data)
    version = reader.read_int(4)
    if version != DLIB_SP_VERSION:
        raise reader.fail(f"shape_predictor version {version}, expected {DLIB_SP_VERSION}")
    initial = reader.read_matrix()
    forests = reader.read_vector(lambda: reader.read_vector(lambda: _read_tree(reader)))
    anchors = reader.read_vector(lambda: reader.read_vector(reader.read_uint))
    deltas = reader.read_vector(lambda: reader.read_vector(lambda: _read_point(reader)))
    reader.expect_end()
    return _to_arrays(initial, forests, anchors, deltas)


def _to_arrays(initial: np.ndarray, forests: list, anchors: list, deltas: list) -> dict[str, np.ndarray]:
    """Check that the cascade is regular (same tree shape everywhere) and pack it into dense arrays."""
    if initial.ndim != 2 or initial.shape[1] != 1 or initial.shape[0] == 0 or initial.shape[0] % 2:
        raise DlibFormatError(f"initial shape is {initial.shape[0]}x{initial.shape[1]}, expected (2*parts)x1")
    n_parts = initial.shape[0] // 2
    n_levels = len(forests)
    if n_levels == 0 or not (len(anchors) == len(deltas) == n_levels):
        raise DlibFormatError(f"{n_levels} forests, {len(anchors)} anchor lists, {len(deltas)} delta lists")
    n_trees = len(forests[0])
    n_splits = len(forests[0][0][0]) if n_trees else 0
    n_features = len(anchors[0])
    if n_trees == 0 or n_splits == 0 or (n_splits + 1) & n_splits:
        raise DlibFormatError(f"{n_trees} trees of {n_splits} splits: expected full binary trees")
    if any(len(f) != n_trees for f in forests) or any(len(a) != n_features for a in anchors):
        raise DlibFormatError("cascade levels differ in tree or feature counts")
    if any(len(d) != n_features for d in deltas):
        raise DlibFormatError("delta lists and anchor lists differ in length")
    trees = [tree for forest in forests for tree in forest]
    if any(len(splits) != n_splits or len(leaves) != n_splits + 1 for splits, leaves in trees):
        raise DlibFormatError("trees differ in size or have the wrong number of leaves")
    if any(leaf.shape != initial.shape for _, leaves in trees for leaf in leaves):
        raise DlibFormatError("a leaf vector does not match the initial shape's size")
    split_table = np.array([s for splits, _ in trees for s in splits], dtype=np.float64)
    split_table = split_table.reshape(n_levels, n_trees, n_splits, 3)
    idx = split_table[..., :2]
    if idx.max() >= n_features:
        raise DlibFormatError(f"split feature index {int(idx.max())} >= {n_features} features")
    anchor_idx = np.array(anchors, dtype=np.int64)
    if anchor_idx.max() >= n_parts:
        raise DlibFormatError(f"anchor index {int(anchor_idx.max())} >= {n_parts} parts")
    leaves = np.array([leaf for _, tree_leaves in trees for leaf in tree_leaves], dtype=np.float32)
    return {
        "initial_shape": initial.reshape(n_parts, 2).astype(np.float32),
        "split_idx1": idx[..., 0].astype(np.uint16),
        "split_idx2": idx[..., 1].astype(np.uint16),
        "split_threshold": split_table[..., 2].astype(np.float32),
        "leaf_values": leaves.reshape(n_levels, n_trees, n_splits + 1, n_parts, 2),
        "anchor_idx": anchor_idx.astype(np.uint8),
        "deltas": np.array(deltas, dtype=np.float32).reshape(n_levels, n_features, 2),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
    }


def _current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_npz(arrays: dict[str, np.ndarray], npz_path: Path) -> None:
    """Write an uncompressed .npz (loads fast; floats barely compress) atomically and reproducibly."""
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=npz_path.parent, prefix=f".{npz_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        os.chmod(tmp_name, FILE_MODE & ~_current_umask())
        os.replace(tmp_name, npz_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def convert(dat_path: Path, npz_path: Path) -> None:
    """Parse the dlib .dat at dat_path and write the arrays to npz_path (temp file, then os.replace)."""
    dat_path, npz_path = Path(dat_path), Path(npz_path)
    arrays = parse_model_file(dat_path, parse_shape_predictor, "dlib shape predictor")
    write_npz(arrays, npz_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.sp_to_npz", description=__doc__.splitlines()[0])
    parser.add_argument("dat", type=Path, help="dlib shape_predictor .dat file")
    parser.add_argument("npz", type=Path, help="output .npz file")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert(args.dat, args.npz), args.npz)


if __name__ == "__main__":
    sys.exit(main())
