"""GGML block quantization against the `gguf` package's reference (gguf.quants)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SCALE_OFFSETS, random_blocks, require
from tokentrail.loading.quant import dequantize, quantize, row_bytes
from tokentrail.loading.weights import BLOCK_TYPES, Weight

TYPES = tuple(BLOCK_TYPES)
# Types whose quantizer makes GGML's reference choice (so gguf.quants writes the same bytes).
GGML_CHOICE = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")



def ggml_type(name: str):
    gguf = require("gguf")
    return getattr(gguf.GGMLQuantizationType, name.upper())


def sample(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows at very different scales, plus the awkward cases: an all-zero
    block, one outlier, an all-negative block and values on rounding ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= rng.uniform(1e-3, 10, (rows, 1)).astype(np.float32)
    x[0, :256] = 0
    x[1, 7] = 1e3
    x[2, :256] = -np.abs(x[2, :256])
    x[3, :32] = np.arange(32, dtype=np.float32) - 16.5
    return x


def test_every_block_type_is_covered():
    assert set(SCALE_OFFSETS) == set(BLOCK_TYPES) == set(BOUNDS)


@pytest.mark.parametrize("dtype", GGML_CHOICE)
def test_quantize_is_byte_identical_to_gguf(dtype):
    quants = require("gguf.quants")
    x = sample(32, 512)
    ours = quantize(x, dtype)
    ref = quants.quantize(x, ggml_type(dtype))
    assert ours.dtype == np.uint8 and ours.shape == (32, row_bytes(dtype, 512))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("dtype", TYPES)
def test_dequantize_matches_gguf_on_arbitrary_blocks(dtype):
    """Random bytes exercise every bit of the layout, not only what our quantizer emits."""
    quants = require("gguf.quants")
    rng = np.random.default_rng(1)
    shape = (6, BLOCK_TYPES[dtype][0] * 4)
    raw = random_blocks(rng, dtype, *shape, scale=2.0)  # finite scales: the comparison is about the layout
    ours = dequantize(raw, dtype, shape)
    ref = quants.dequantize(raw, ggml_type(dtype))
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("dtype", TYPES)
def test_round_trip_decodes_identically_in_gguf(dtype):
    quants = require("gguf.quants")
    x = sample(16, 768, seed=2)
    q = quantize(x, dtype)
    np.testing.assert_array_equal(dequantize(q, dtype, x.shape), quants.dequantize(q, ggml_type(dtype)))


# Worst error of one value relative to the largest magnitude of its row, and the
# rms error relative to the rms value, for Gaussian data. The bounds follow from
# the level spacing: q8_0 has 127 levels per side (half a step is 1/254 of the
# block's max), q4_0 has levels -8..7 scaled so the extreme lands on -8, so values
# of the other sign may clip by a whole step (1/8 of the max), q4_k 15 levels over [min, max] plus 6-bit
# sub-block scales, q6_k 32 levels per side plus 8-bit group scales. q4_1 and
# q5_1 spread 15 and 31 steps over [min, max] (half a step is at most 1/15 and
# 1/31 of the max, plus the f16 rounding of d and m); q5_0 is q4_0 with levels
# -16..15 (a clip of at most 1/16); iq4_nl's widest gap between levels is 24,
# with the extreme at 113 at worst (12/113); q5_k is q4_k with twice the levels.
BOUNDS = {"q8_0": (1 / 254 + 1e-3, 0.01), "q4_0": (1 / 8 + 1e-3, 0.11),
          "q4_1": (1 / 15 + 2e-3, 0.09), "q5_0": (1 / 16 + 1e-3, 0.05), "q5_1": (1 / 31 + 2e-3, 0.045),
          "iq4_nl": (12 / 113 + 2e-3, 0.09),
          "q4_k": (0.10, 0.10), "q5_k": (0.05, 0.05), "q6_k": (0.035, 0.03)}


@pytest.mark.parametrize("dtype", TYPES)
def test_error_bounds(dtype):
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    y = dequantize(quantize(x, dtype), dtype, x.shape)
    worst = (np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1)).max()
    rms = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    max_bound, rms_bound = BOUNDS[dtype]
    assert worst <= max_bound, worst
    assert rms <= rms_bound, rms
    # Blocks of zeros stay exactly zero.
    z = np.zeros((1, 256), np.float32)
    np.testing.assert_array_equal(dequantize(quantize(z, dtype), dtype, z.shape), z)


def test_weight_to_float32_uses_dequantize():
    x = sample(4, 256)
    w = Weight(quantize(x, "q8_0"), "q8_0", x.shape)
    np.testing.assert_array_equal(w.to_float32(), dequantize(w.data, "q8_0", x.shape))
    np.testing.assert_allclose(w.to_float32(), x, atol=np.abs(x).max() / 200)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.ones((2, 40), np.float32), "q8_0")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((1, 32), np.nan, np.float32), "q4_0")
    with pytest.raises(ValueError, match="not a block-quantized"):
        quantize(np.ones((1, 32), np.float32), "f16")
    with pytest.raises(ValueError, match="cannot hold"):
        dequantize(np.zeros(33, np.uint8), "q8_0", (32,))
