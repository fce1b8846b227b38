"""Weights as the engine consumes them, independent of the file they came from."""
from __future__ import annotations

from dataclasses import dataclass

from typing import NamedTuple

import numpy as np
from ..errors import InvalidArgumentError

from .. import _core


class WeightType(NamedTuple):
    """One row of the core's table of weight types (cpp/include/tokentrail/tensor.h)."""

    name: str
    ggml_id: int           # its number in GGUF files
    values_per_block: int  # 1 for the float types
    bytes_per_block: int
    half_scales_at: int    # byte offset of a block's half-precision scales
    half_scales: int       # how many follow one another there (0 for the float types)


# Every weight type the kernels read, as the core declares them.
WEIGHT_TYPES = {row[0]: WeightType(*row) for row in _core.weight_types()}
# Block layouts of the quantized types: (values per block, bytes per block).
BLOCK_TYPES = {t.name: (t.values_per_block, t.bytes_per_block)
               for t in WEIGHT_TYPES.values() if t.values_per_block > 1}
# How numpy holds each float type's elements (bfloat16 as its uint16 bit patterns).
FLOAT_TYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
assert set(FLOAT_TYPES) == set(WEIGHT_TYPES) - set(BLOCK_TYPES), "float types out of step with the core"
DTYPES = tuple(WEIGHT_TYPES)


@dataclass
class Weight:
    """One named tensor.

    `data` is the storage the kernels read, usually a memory map of the file:
    float32/float16 arrays as themselves, bfloat16 as uint16 bit patterns, and
    block-quantized types as a uint8 array of shape [rows, bytes_per_row].
    `shape` is the logical shape (rows, cols) or (n,).
    """

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    # (file, tensor name in that file), so later checks can say where a bad tensor came from.
    source: tuple | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown weight dtype {self.dtype!r}; expected one of {DTYPES}")
        self.shape = tuple(int(s) for s in self.shape)

    @classmethod
    def from_array(cls, array: np.ndarray) -> "Weight":
        array = np.asarray(array)
        if array.dtype == np.float32:
            return cls(array, "f32", array.shape)
        if array.dtype == np.float16:
            return cls(array, "f16", array.shape)
        return cls(np.ascontiguousarray(array, dtype=np.float32), "f32", array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_float32(self) -> np.ndarray:
        """A float32 copy in the logical shape (for tests, the journey, and conversion)."""
        if self.dtype == "f32":
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.dtype == "f16":
            return np.asarray(self.data).astype(np.float32).reshape(self.shape)
        if self.dtype == "bf16":
            bits = np.asarray(self.data, dtype=np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        from .quant import dequantize

        return dequantize(self.data, self.dtype, self.shape)


def bf16_from_float32(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def aligned(array: np.ndarray) -> np.ndarray:
    """`array`, or an aligned copy when its data does not start at a multiple of its element size.

    Files may place tensors anywhere (a safetensors header of odd length, GGUF
    general.alignment = 1); the kernels read float32 and 16-bit elements through
    typed pointers, which must be aligned. numpy's own allocations always are.
    """
    if array.ctypes.data % array.dtype.itemsize:
        return array.copy()
    return array


def has_non_finite(w: Weight) -> bool:
    """Does the weight hold a NaN or an infinity? (for block types: in a block scale)

    The core tests the exponent bits of every element (of every block's half
    scales) with all threads, at about the speed of reading the data: fast
    enough to run at every load.
    """
    return bool(_core.has_non_finite(np.ascontiguousarray(w.data), w.dtype))
