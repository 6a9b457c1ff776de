"""A reader for dlib's binary serialisation format (dlib/serialize.h), shared by the model converters.

Integers: one control byte (bit 7 = negative, low 4 bits = how many magnitude bytes follow), then the
magnitude little-endian; signed and unsigned share the format. Floats: two integers, an int64 mantissa then
an int16 exponent (value = mantissa * 2**exponent; exponents 32000/32001/32002 and above mean +inf/-inf/NaN).
bool: ASCII '1'/'0'. string and vector: a count, then the bytes or elements. matrix: rows and cols (negative
in the current format), then the elements row-major.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from edge.errors import ModelError

T = TypeVar("T")

SIGN_BIT = 0x80
SIZE_MASK = 0x0F
UNSIGNED_MASK = 0x8F  # dlib masks out the 3 reserved bits; a set sign bit then makes the size invalid
LEGACY_FLOAT_BITS = 0x70  # set only in the first byte of dlib's old ASCII float format
EXP_INF, EXP_NINF, EXP_NAN = 32000, 32001, 32002
MANTISSA_BYTES, EXPONENT_BYTES = 8, 2
COUNT_BYTES = 8  # unsigned long on the 64-bit systems the models were written on


class DlibFormatError(ModelError):
    """The bytes are not what the dlib format says should be there (truncated, corrupt or another kind)."""


class DlibReader:
    """Sequential reader over the bytes of one dlib-serialised object; every read checks bounds and ranges."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self.pos

    def fail(self, what: str) -> DlibFormatError:
        """An error naming the byte offset, for the caller to raise."""
        return DlibFormatError(f"{what} at byte {self.pos} of {len(self._data)}")

    def read_bytes(self, count: int) -> bytes:
        """The next `count` raw bytes."""
        if count > self.remaining:
            raise self.fail(f"truncated: wanted {count} bytes, {self.remaining} left")
        start = self.pos
        self.pos += count
        return self._data[start : self.pos]

    def _read_integer(self, size_bytes: int, signed: bool) -> int:
        """One integer for a C type of `size_bytes` bytes; rejects values that type cannot hold."""
        if self.pos >= len(self._data):
            raise self.fail("truncated: wanted an integer, no bytes left")
        control = self._data[self.pos]
        count = control & (SIZE_MASK if signed else UNSIGNED_MASK)
        if count == 0 or count > size_bytes:
            raise self.fail(f"bad integer control byte 0x{control:02x} for a {size_bytes}-byte integer")
        start = self.pos + 1
        end = start + count
        if end > len(self._data):
            raise self.fail(f"truncated: integer needs {count} bytes, {len(self._data) - start} left")
        value = int.from_bytes(self._data[start:end], "little")
        if signed and control & SIGN_BIT:
            value = -value
        bits = 8 * size_bytes
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if not low <= value <= high:
            raise self.fail(f"integer {value} does not fit in {bits} bits")
        self.pos = end
        return value

    def read_int(self, size_bytes: int = 8) -> int:
        """A signed integer (C type of `size_bytes` bytes: 2 short, 4 int, 8 long/int64)."""
        return self._read_integer(size_bytes, signed=True)

    def read_uint(self, size_bytes: int = 8) -> int:
        """An unsigned integer (C type of `size_bytes` bytes); a negative one is an error, as in dlib."""
        return self._read_integer(size_bytes, signed=False)

    def read_count(self) -> int:
        """The element count of a string, vector or array; larger than the bytes left means corrupt."""
        count = self.read_uint(COUNT_BYTES)
        if count > self.remaining:
            raise self.fail(f"count {count} exceeds the {self.remaining} bytes left")
        return count

    def read_float(self) -> float:
        """A float or double as a Python float; float32 values come back exact (their mantissa has 24 bits)."""
        if self.pos < len(self._data) and self._data[self.pos] & LEGACY_FLOAT_BITS:
            raise self.fail("old ASCII float format (dlib before 18.x) is not supported")
        mantissa = self.read_int(MANTISSA_BYTES)
        exponent = self.read_int(EXPONENT_BYTES)
        if exponent >= EXP_INF:
            return {EXP_INF: math.inf, EXP_NINF: -math.inf}.get(exponent, math.nan)
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            return math.copysign(math.inf, mantissa)

    def read_bool(self) -> bool:
        """ASCII '1' or '0'."""
        byte = self.read_bytes(1)
        if byte not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"bad bool byte {byte!r}")
        return byte == b"1"

    def read_string(self, encoding: str = "utf-8") -> str:
        """A length-prefixed string."""
        raw = self.read_bytes(self.read_count())
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            raise self.fail(f"string is not valid {encoding}") from None

    def read_vector(self, read_item: Callable[[], T]) -> list[T]:
        """A std::vector: its count, then each element read by `read_item`."""
        return [read_item() for _ in range(self.read_count())]

    def read_floats(self, count: int) -> np.ndarray:
        """`count` consecutive dlib floats as float64."""
        if count > self.remaining:
            raise self.fail(f"{count} floats cannot fit in the {self.remaining} bytes left")
        return np.array([self.read_float() for _ in range(count)], dtype=np.float64)

    def read_matrix(self) -> np.ndarray:
        """A dlib::matrix of floats as a float64 (rows, cols) array; negative sizes mark the current format."""
        rows, cols = self.read_int(), self.read_int()
        if rows < 0 or cols < 0:
            rows, cols = -rows, -cols
        if rows < 0 or cols < 0:
            raise self.fail(f"bad matrix size {rows}x{cols}")
        return self.read_floats(rows * cols).reshape(rows, cols)

    def expect_end(self) -> None:
        """Fail if bytes are left over: the file is longer than the object it should hold."""
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected bytes after the end of the object")


def parse_model_file(path, parse: Callable[[bytes], T], what: str) -> T:
    """Read a dlib model file and parse it; a missing or malformed file is one ModelError line with the fix."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelError(f"cannot read {path} ({err.strerror}): run `make models` to fetch it") from None
    try:
        return parse(data)
    except DlibFormatError as err:
        raise ModelError(f"{path} is not a valid {what} ({err}): delete it and run `make models` again") from None
