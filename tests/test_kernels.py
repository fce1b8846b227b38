"""Every kernel variant this CPU runs, against numpy, at sizes that are not multiples of a vector."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import SCALE_OFFSETS, check_attention, random_blocks
from tokentrail import _core
from tokentrail.loading.weights import bf16_from_float32

ISAS = _core.available_isas()
# (n, rows, cols): decode-sized products take the GEMV, prefill-sized ones (GEMM_MIN_ROWS
# tokens or more) the packed GEMM; both at sizes that are not multiples of a vector or tile.
G = _core.GEMM_MIN_ROWS
SIZES = [(1, 1, 1), (3, 17, 5), (7, 64, 33), (5, 100, 130), (9, 31, 257), (G, 33, 70), (G + 11, 97, 129)]


@pytest.fixture(params=ISAS)
def isa(request):
    before = _core.isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


def test_scalar_is_always_available():
    assert "scalar" in ISAS
    with pytest.raises(ValueError):
        _core.set_isa("no-such-isa")


@pytest.mark.parametrize("n,rows,cols", SIZES)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_matmul(isa, dtype, n, rows, cols):
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    if dtype == "f16":
        stored = w.astype(np.float16)
        exact = stored.astype(np.float32)
    elif dtype == "bf16":
        stored = bf16_from_float32(w)
        exact = (stored.astype(np.uint32) << 16).view(np.float32)
    else:
        stored = exact = w
    got = _core.matmul(stored, dtype, rows, cols, x, b)
    want = x.astype(np.float64) @ exact.astype(np.float64).T + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * math.sqrt(cols))


def test_matmul_rejects_wrong_size():
    with pytest.raises(ValueError, match="bytes"):
        _core.matmul(np.zeros((3, 4), np.float32), "f32", 3, 5, np.zeros((1, 5), np.float32))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0, 1e-3])
def test_softmax(isa, temperature):
    x = np.random.default_rng(1).standard_normal((4, 37)).astype(np.float32) * 10
    x[2, 5] = 1e4  # one overwhelming logit, others underflow to exactly 0
    z = x.astype(np.float64) / temperature
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(_core.softmax(x, temperature), want, atol=1e-6)


def test_norms(isa):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 67)).astype(np.float32)
    w = rng.standard_normal(67).astype(np.float32)
    b = rng.standard_normal(67).astype(np.float32)
    rms = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(_core.rmsnorm(x, w, 1e-5), rms, rtol=1e-5, atol=1e-6)
    mu = x.mean(-1, keepdims=True)
    ln = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(_core.layernorm(x, w, b, 1e-5), ln, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [10, 6])
def test_rope(isa, adjacent, rotary_dim):
    """Full and partial rotary (the first rotary_dim elements of each head turn), cos/sin scaled."""
    rng = np.random.default_rng(3)
    n, heads, hd, theta, factor = 6, 3, 10, 10000.0, 1.25
    x = rng.standard_normal((n, heads * hd)).astype(np.float32)
    pos = np.array([0, 1, 5, 17, 100, 1000], np.int32)
    half = rotary_dim // 2
    inv = (theta ** (-2.0 * np.arange(half) / rotary_dim)).astype(np.float32)
    ang = pos[:, None] * inv[None, :].astype(np.float64)
    cos, sin = factor * np.cos(ang)[:, None, :], factor * np.sin(ang)[:, None, :]
    v = x.reshape(n, heads, hd).astype(np.float64)
    r = v[..., :rotary_dim]
    if adjacent:
        a, b = r[..., 0::2], r[..., 1::2]
    else:
        a, b = r[..., :half], r[..., half:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    want = v.copy()
    if adjacent:
        want[..., 0:rotary_dim:2], want[..., 1:rotary_dim:2] = ra, rb
    else:
        want[..., :half], want[..., half:rotary_dim] = ra, rb
    got = _core.rope(x, pos, heads, hd, inv, adjacent, factor)
    np.testing.assert_allclose(got, want.reshape(n, -1), atol=2e-5)


def test_activations(isa):
    # Odd length (a vector tail), and values far out where exp over- or underflows.
    x = np.concatenate([np.linspace(-8, 8, 1001), [-100, -60, -30, 30, 60, 100]]).astype(np.float32)
    xd = x.astype(np.float64)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(_core.gelu_erf(x), 0.5 * xd * (1 + erf(xd / math.sqrt(2))), atol=1e-6)
    tanh_form = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    np.testing.assert_allclose(_core.gelu_tanh(x), tanh_form, atol=1e-6)
    np.testing.assert_allclose(_core.silu(x), xd / (1 + np.exp(-xd)), atol=1e-6, rtol=1e-6)
    big = np.random.default_rng(5).standard_normal(200_003).astype(np.float32) * 4  # threaded path
    np.testing.assert_allclose(_core.silu(big), big / (1 + np.exp(-big.astype(np.float64))), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(_core.relu(x), np.maximum(xd, 0), atol=0)


@pytest.mark.parametrize("pos0,n,heads,kv,hd", [(0, 5, 4, 2, 8), (7, 3, 6, 3, 17), (0, 1, 2, 1, 33), (20, 1, 8, 8, 64),
                                                # keys in whole vectors and tails; head widths of 3, 8 and 2.5 vectors
                                                (40, 3, 4, 2, 48), (33, 2, 2, 1, 128), (70, 1, 3, 1, 40), (15, 2, 2, 2, 16)])
def test_attention_gqa_causal(isa, pos0, n, heads, kv, hd):
    rng = np.random.default_rng(pos0 + n)
    ctx = pos0 + n
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    k = rng.standard_normal((kv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((kv, ctx, hd)).astype(np.float32)
    scale = 1 / math.sqrt(hd)
    z, pattern = _core.attention(q, k, v, pos0, scale)
    check_attention(q, k, v, pos0, scale, z, pattern)


def test_environment_variable_forces_a_variant():
    import subprocess
    import sys

    for name in ISAS:
        out = subprocess.run([sys.executable, "-c", "from tokentrail import _core; print(_core.isa())"],
                             env={**__import__("os").environ, "TOKENTRAIL_ISA": name},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == name


def test_every_block_type_has_a_kernel_test():
    from tokentrail.loading.weights import BLOCK_TYPES

    assert set(SCALE_OFFSETS) == set(BLOCK_TYPES)


@pytest.mark.parametrize("dtype", list(SCALE_OFFSETS))
@pytest.mark.parametrize("source", ["quantized", "random bytes"])
@pytest.mark.parametrize("n,rows", [(1, 7), (3, 33), (6, 5), (_core.GEMM_MIN_ROWS + 3, 35)])
def test_quantized_matmul_against_numpy_dequantize(isa, dtype, source, n, rows):
    from tokentrail.loading.quant import block_info, dequantize, quantize

    block = block_info(dtype)[0]
    cols = block * (3 if block == 32 else 2) + (block if rows % 2 else 0)  # several blocks, odd counts too
    rng = np.random.default_rng(rows + n)
    if source == "quantized":
        packed = quantize(rng.standard_normal((rows, cols)).astype(np.float32), dtype)
    else:
        packed = random_blocks(rng, dtype, rows, cols, scale=0.05)
    exact = dequantize(packed, dtype, (rows, cols)).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    got = _core.matmul(packed, dtype, rows, cols, x, b)
    np.testing.assert_allclose(got, x @ exact.T + b, rtol=1e-5, atol=1e-4 * math.sqrt(cols))
    np.testing.assert_allclose(_core.row_to_f32(packed, dtype, rows, cols), exact, rtol=1e-6, atol=1e-7)


def test_quantized_columns_must_fill_blocks():
    with pytest.raises(ValueError, match="block size"):
        _core.matmul(np.zeros((2, 34), np.uint8), "q8_0", 2, 33, np.zeros((1, 33), np.float32))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", *SCALE_OFFSETS])
def test_a_decode_product_gives_each_token_what_it_gets_alone(isa, dtype):
    """Below GEMM_MIN_ROWS tokens, a token's result does not depend on how many tokens share its
    register tile: every product of 2..GEMM_MIN_ROWS-1 tokens equals, bit for bit, each token's
    product alone (the architecture's promise for batched decoding; a compiler that fuses a scalar
    multiply-add in some tiles and not in others breaks it)."""
    from tokentrail.loading.quant import block_info, quantize

    rows = 37
    cols = 2 * 256 if dtype in ("q4_k", "q5_k", "q6_k") else 3 * 32 if dtype in SCALE_OFFSETS else 3 * 32 + 7
    rng = np.random.default_rng(len(dtype))
    w32 = rng.standard_normal((rows, cols)).astype(np.float32)
    if dtype == "f32":
        w = w32
    elif dtype == "f16":
        w = w32.astype(np.float16)
    elif dtype == "bf16":
        w = bf16_from_float32(w32)
    else:
        assert cols % block_info(dtype)[0] == 0
        w = quantize(w32, dtype)
    x = rng.standard_normal((_core.GEMM_MIN_ROWS - 1, cols)).astype(np.float32)
    alone = np.concatenate([_core.matmul(w, dtype, rows, cols, x[i:i + 1]) for i in range(len(x))])
    for n in (2, 3, 4, 5, 8, 13, 16, 17, len(x)):
        np.testing.assert_array_equal(_core.matmul(w, dtype, rows, cols, x[:n]), alone[:n], err_msg=f"{n} tokens")
