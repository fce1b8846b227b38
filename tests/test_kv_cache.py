"""The KV cache's element types: f16 rounding as numpy's, attention on an f16 cache, and whole models."""
from __future__ import annotations

import math

import numpy as np
import pytest

import tokentrail
from conftest import check_attention
from tokentrail import _core

ISAS = _core.available_isas()


def test_f16_rounding_matches_numpy():
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, 1e6, -1e6, np.inf, -np.inf,
                        6.1e-5, 6.0e-8, 5.96e-8, 2.98e-8, 2.9e-8, 1e-10, 0.33325195, 1 + 2 ** -11,
                        1 + 3 * 2 ** -11, 2 ** -24 * 1.5, 2 ** -24 * 2.5], np.float32)
    x = np.concatenate([special, rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-9, 5, 5000)])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):  # numpy warns on values that round to infinity
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_core.f16_bits(x), want)
    assert np.isnan(_core.f16_bits(np.array([np.nan], np.float32)).view(np.float16)[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pos0,n,heads,kv,hd", [(0, 4, 4, 2, 16), (40, 1, 6, 3, 64), (9, 3, 2, 1, 40)])
def test_attention_reads_an_f16_cache(isa, pos0, n, heads, kv, hd):
    before = _core.isa()
    _core.set_isa(isa)
    try:
        rng = np.random.default_rng(hd + n)
        ctx = pos0 + n
        q = rng.standard_normal((n, heads, hd)).astype(np.float32)
        k = rng.standard_normal((kv, ctx, hd)).astype(np.float32)
        v = rng.standard_normal((kv, ctx, hd)).astype(np.float32)
        z, pattern = _core.attention(q, k, v, pos0, 1 / math.sqrt(hd), "f16")
    finally:
        _core.set_isa(before)
    check_attention(q, k.astype(np.float16), v.astype(np.float16), pos0, 1 / math.sqrt(hd), z, pattern)


def test_f16_cache_model_follows_the_f32_one():
    model = tokentrail.load(kv_dtype="f16")
    ids = model.encode("The storm is strong near the farm. The")
    exact = model.session(kv_dtype="f32")
    half = model.session()
    assert half.kv_dtype == "f16" and exact.kv_dtype == "f32"
    a = exact.feed(ids, all_logits=True)
    b = half.feed(ids, all_logits=True)
    # Keys and values rounded to 11 significant bits: logits move by far less than their spread.
    assert np.abs(a - b).max() < 2e-2 * a.std()
    assert not np.array_equal(a, b)  # the rounding is real
    # Token-by-token decode on the f16 cache, its fork, and a rewind agree with one pass.
    s = model.session()
    for t in ids[:-1]:
        s.feed([t])
    fork = s.fork()
    assert fork.kv_dtype == "f16"
    np.testing.assert_allclose(fork.feed([ids[-1]]), b[-1], rtol=1e-4, atol=1e-4)
    s.rewind(3)
    np.testing.assert_allclose(s.feed(ids[3:], all_logits=True), b[3:], rtol=1e-4, atol=1e-4)
    greedy_a = [int(np.argmax(r)) for r in a]
    greedy_b = [int(np.argmax(r)) for r in b]
    assert greedy_a == greedy_b


def test_bad_kv_dtype_is_named():
    with pytest.raises(ValueError, match="kv_dtype"):
        tokentrail.load(kv_dtype="q8_0")
    model = tokentrail.load()
    with pytest.raises(ValueError, match="kv_dtype"):
        model.session(kv_dtype="bf16")
