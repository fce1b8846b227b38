"""Quantized products with int8 activations (load(exact=False)), against the numpy reference and llama.cpp.

The kernels round each token's activations as llama.cpp does and multiply in
integers; tests/int8_reference.py computes the same in numpy (the rounding bit
for bit, the product in float64). Every kernel variant is checked across odd
shapes, and the variants against each other: they run the same float
operations in the same order per token, so they agree bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import tokentrail
from conftest import assert_logits_do_not_depend_on_the_batch, require
from int8_reference import error_bound, int8_matmul, quantize_activations
from tokentrail import _core
from tokentrail.errors import InvalidArgumentError
from tokentrail.loading.quant import quantize

TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "q6_k")
K_QUANTS = ("q4_k", "q5_k", "q6_k")
ISAS = _core.available_isas()


@pytest.fixture
def each_isa():
    """Runs the test body once per kernel variant, restoring the default after."""
    default = _core.isa()
    yield ISAS
    _core.set_isa(default)


def activations(rng, n: int, k: int) -> np.ndarray:
    """Activations with the awkward cases: a zero block, a block with one large outlier, ties at .5."""
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[0, :32] = 0.0
    if n > 1:
        x[1, k - 3] = -50.0
    if n > 2:  # largest magnitude 127, so x * 127 / max is x itself: exact ties at .5, rounded to even
        x[2, :32] = np.arange(32, dtype=np.float32) - 15.5
        x[2, 0] = 127.0
    return x


@pytest.mark.parametrize("block", [32, 256])
def test_activation_rounding_is_numpys_bit_for_bit(each_isa, block):
    rng = np.random.default_rng(block)
    x = activations(rng, 9, 512)
    want_q, want_s = quantize_activations(x, block)
    for isa in each_isa:
        _core.set_isa(isa)
        q, s = _core.int8_quantize(x, block)
        np.testing.assert_array_equal(q, want_q, err_msg=isa)
        np.testing.assert_array_equal(s, want_s, err_msg=isa)
    assert np.abs(want_q).max() == 127 and (want_q[0, :32] == 0).all()


@pytest.mark.parametrize("dtype", TYPES)
def test_products_match_the_numpy_reference_on_every_variant(each_isa, dtype):
    rng = np.random.default_rng(len(dtype))
    widths = (256, 768) if dtype in K_QUANTS else (32, 96, 160)  # K not a multiple of 256 where allowed
    for k in widths:
        for rows in (1, 5, 37):  # not multiples of the register tile
            w = quantize(rng.standard_normal((rows, k)).astype(np.float32), dtype)
            for n in (1, 2, 3, 15, 16, 17, 31, 33):  # token tiles of 16 (AVX-512) and 8 (AVX2), and their edges
                x = activations(rng, n, k)
                want = int8_matmul(w, dtype, rows, k, x)
                bound = error_bound(w, dtype, rows, k, x)
                results = []
                for isa in each_isa:
                    _core.set_isa(isa)
                    y = _core.matmul(w, dtype, rows, k, x, int8_activations=True)
                    assert np.all(np.abs(y - want) <= bound), f"{isa} {dtype} k={k} rows={rows} n={n}"
                    results.append(y)
                for isa, y in zip(each_isa[1:], results[1:]):
                    np.testing.assert_array_equal(y, results[0], err_msg=f"{isa} vs {each_isa[0]}: {dtype} n={n}")


def test_int8_products_differ_from_float_by_the_rounding_only():
    """Sanity of the reference itself: the float path is off by int8 rounding, far more than float rounding."""
    rng = np.random.default_rng(1)
    w = quantize(rng.standard_normal((64, 256)).astype(np.float32), "q4_0")
    x = rng.standard_normal((8, 256)).astype(np.float32)
    exact = _core.matmul(w, "q4_0", 64, 256, x)
    fast = _core.matmul(w, "q4_0", 64, 256, x, int8_activations=True)
    bound = error_bound(w, "q4_0", 64, 256, x)
    assert np.abs(exact - fast).max() > 100 * bound.max()
    assert np.abs(exact - fast).max() < 0.05 * np.abs(exact).max()


def test_bias_and_bad_arguments():
    rng = np.random.default_rng(2)
    w = quantize(rng.standard_normal((8, 64)).astype(np.float32), "q8_0")
    x = rng.standard_normal((4, 64)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    y = _core.matmul(w, "q8_0", 8, 64, x, bias, int8_activations=True)
    np.testing.assert_allclose(y, _core.matmul(w, "q8_0", 8, 64, x, int8_activations=True) + bias, rtol=1e-6)
    with pytest.raises(ValueError, match="block-quantized"):
        _core.matmul(rng.standard_normal((8, 64)).astype(np.float32), "f32", 8, 64, x, int8_activations=True)
    with pytest.raises(ValueError, match="block"):
        _core.int8_quantize(x, 64)
    with pytest.raises(InvalidArgumentError, match="exact"):
        tokentrail.load(exact="no")


# --------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------

def test_a_model_with_int8_activations_matches_the_float_path_given_the_same_rounding():
    """The demo model as q8_0: exact=False equals the float path fed the rounded inputs of each product."""
    from test_llamacpp import with_rounded_inputs

    fast = tokentrail.load(dtype="q8_0", exact=False)
    # The float reference without the row-lane copy: its GEMV sums 16 lanes of k at once, a little
    # more accurate than one lane over all of k, and each rounded input below amplifies a product's
    # float error into whole quanta wherever a value sits near a rounding boundary.
    exact = tokentrail.load(dtype="q8_0", repack=False)
    assert not fast.exact and exact.exact and "int8" in repr(fast)
    ids = fast.encode("The storm is coming over the hills and the river is rising fast in the valley below")
    assert len(ids) >= 16  # a prefill the int8 path takes (from INT8_MIN_ROWS tokens)
    ours = fast.forward(ids)
    modelled = with_rounded_inputs(exact, ids)
    plain = exact.forward(ids)
    spread = plain.std(axis=1)
    assert (np.abs(ours - modelled).max(axis=1) / spread).max() < 1e-4
    assert (np.abs(ours - plain).max(axis=1) / spread).max() > 1e-3  # the rounding is really there


def test_cli_no_exact_is_the_apis():
    prompt = "The storm is coming over the hills and the river is rising fast"  # a prefill the int8 path takes
    args = ["generate", prompt, "-n", "8", "--dtype", "q8_0", "--no-exact"]
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = tokentrail.load(dtype="q8_0", exact=False)
    assert len(model.encode(prompt)) >= 8
    want = prompt + model.generate(prompt, max_new_tokens=8, temperature=0).text
    assert out.stdout.strip() == want.strip()


# llama.cpp's files: with exact=False tokentrail rounds as llama.cpp does, so on the prompt
# (one batch of several tokens, where the int8 path runs) the two agree far more closely.
LLAMA_MIXES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
PROMPT = [1, 17, 200, 5, 99, 42, 42, 7, 250, 3, 77, 300, 12, 14, 400, 401, 8, 9, 10, 11]


@pytest.mark.parametrize("mix", list(LLAMA_MIXES))
def test_int8_path_agrees_with_llama_cpp_more_closely(llama256_f32, tmp_path, mix):
    llama_cpp = require("llama_cpp")
    from test_quantized_files import llama_quantize

    path = tmp_path / f"llama256-{mix}.gguf"
    llama_quantize(llama256_f32, path, LLAMA_MIXES[mix])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    llm.eval(PROMPT)
    theirs = np.array(llm.scores[:len(PROMPT)], np.float32)
    exact = tokentrail.load(path).forward(PROMPT)
    fast = tokentrail.load(path, exact=False).forward(PROMPT)
    spread = exact.std(axis=1)
    d_exact = (np.abs(theirs - exact).max(axis=1) / spread).max()
    d_fast = (np.abs(theirs - fast).max(axis=1) / spread).max()
    print(f"{mix}: llama.cpp vs tokentrail, float activations {d_exact:.2e}, int8 activations {d_fast:.2e} of the spread")
    assert d_fast < 0.25 * d_exact


@pytest.mark.parametrize("int8", [False, True])
def test_a_product_group_equals_its_products_one_by_one(each_isa, int8):
    """matmul_group (q/k/v, gate/up in the forward pass) shares x and one parallel region among
    several weights; each output must be bit for bit the product of its weight alone, also when
    the weights differ in type (a Q4_K_M file's q/k/v mix Q4_K and Q6_K), in activation block
    (32 for Q8_0, 256 for the k-quants), in kind (a float weight beside quantized ones) and in
    kernel (Q8_0 rows in whole blocks of 16 stream through the row lanes, a tail does not)."""
    rng = np.random.default_rng(7)
    k = 512
    group = [("q4_k", 64), ("q6_k", 37), ("q8_0", 16), ("f16", 21), ("q8_0", 40)]
    weights = []
    for dtype, rows in group:
        w = rng.standard_normal((rows, k)).astype(np.float32)
        weights.append((w.astype(np.float16) if dtype == "f16" else quantize(w, dtype), dtype, rows))
    for isa in each_isa:
        _core.set_isa(isa)
        for n in (1, 7, 8, 16, 17, 47, 48, 70):  # GEMV, int8 from INT8_MIN_ROWS, GEMM from GEMM_MIN_ROWS
            x = rng.standard_normal((n, k)).astype(np.float32)
            together = _core.matmul_group(weights, k, x, int8)
            assert len(together) == len(group)
            for (w, dtype, rows), y in zip(weights, together):
                # (the single-product binding runs the int8 kernel at any n; a model, from INT8_MIN_ROWS,
                # or at every n for the types the int8 variant streams with batch-independent results)
                rounded = int8 and dtype != "f16" and (n >= _core.INT8_MIN_ROWS or _core.int8_every_row_count(dtype))
                alone = _core.matmul(w, dtype, rows, k, x, None, rounded)
                assert y.shape == (n, rows)
                np.testing.assert_array_equal(y, alone, err_msg=f"{isa} {dtype} n={n} int8={int8}")


def test_a_product_group_refuses_bad_groups():
    rng = np.random.default_rng(8)
    w = quantize(rng.standard_normal((32, 256)).astype(np.float32), "q8_0")
    x = np.ones((4, 256), np.float32)
    with pytest.raises(ValueError, match="1..8"):
        _core.matmul_group([], 256, x, False)
    with pytest.raises(ValueError, match="1..8"):
        _core.matmul_group([(w, "q8_0", 32)] * 9, 256, x, False)
    with pytest.raises(ValueError, match=r"x must be \[n, cols\]"):
        _core.matmul_group([(w, "q8_0", 32)], 256, np.ones((4, 128), np.float32), False)
    with pytest.raises(ValueError, match="holds"):
        _core.matmul_group([(w, "q8_0", 33)], 256, x, False)


def test_a_few_tokens_give_the_rows_of_a_full_tile_bit_for_bit(each_isa):
    """The int8 product of a token does not depend on how many tokens share the call: 1 to 64
    tokens equal the same tokens among 80 (more than the row-lane kernel's 64 accumulators, more
    than one tile of the token-lane kernel), bit for bit, for whole blocks of rows and their tails
    and for rows of an odd number of 32-value blocks."""
    rng = np.random.default_rng(11)
    for dtype in TYPES:
        widths = (256, 768) if dtype in K_QUANTS else (96, 160, 576)
        for k in widths:
            for rows in (16, 37, 64):
                w = quantize(rng.standard_normal((rows, k)).astype(np.float32), dtype)
                x = activations(rng, 80, k)
                for isa in each_isa:
                    _core.set_isa(isa)
                    full = _core.matmul(w, dtype, rows, k, x, int8_activations=True)
                    for n in (1, 2, 3, 7, 8, 16, 17, 24, 32, 33, 48, 64):
                        few = _core.matmul(w, dtype, rows, k, x[:n], int8_activations=True)
                        np.testing.assert_array_equal(few, full[:n], err_msg=f"{isa} {dtype} k={k} rows={rows} n={n}")


def test_q8_0_rows_give_the_same_int8_products_in_either_kernel(each_isa):
    """Q8_0 weights in whole blocks of 16 rows stream through the row-lane kernel (with AVX-512
    VNNI, at any number of tokens, 64 at a time); a matrix with a tail of rows runs the token-lane
    kernel for all of its rows. The same rows give the same results bit for bit either way (the
    row lanes round their activations sixteen blocks at a time, the token lanes block by block:
    non-finite activations included)."""
    rng = np.random.default_rng(12)
    k = 576
    w = rng.standard_normal((37, k)).astype(np.float32)
    tail = quantize(w, "q8_0")                # 37 rows: the token-lane kernel
    whole = quantize(w[:32], "q8_0")          # 32 rows: the row lanes, where the variant has them
    for isa in each_isa:
        _core.set_isa(isa)
        for n in (1, 5, 17, 64, 65, 100, 130):
            x = activations(rng, n, k)
            if n >= 5:  # an infinity, a NaN and a huge value, in blocks of either rounding
                x[3, 40], x[4, 70], x[n - 1, 550] = np.inf, np.nan, 3e38
            a = _core.matmul(tail, "q8_0", 37, k, x, int8_activations=True)
            b = _core.matmul(whole, "q8_0", 32, k, x, int8_activations=True)
            np.testing.assert_array_equal(b, a[:, :32], err_msg=f"{isa} n={n}")
            if _core.int8_row_lanes():  # and from the row-lane copy a model keeps
                c = _core.matmul(whole, "q8_0", 32, k, x, int8_activations=True, row_lanes=True)
                np.testing.assert_array_equal(c, a[:, :32], err_msg=f"{isa} n={n}, row-lane copy")


def test_the_row_lane_copy_is_refused_where_the_row_lanes_cannot_take_the_weights():
    rng = np.random.default_rng(13)
    x = activations(rng, 4, 64)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    cases = [(quantize(w, "q8_0"), "q8_0", 37, True),       # a tail of rows
             (quantize(w, "q4_0"), "q4_0", 37, False),
             (quantize(w[:32], "q4_0"), "q4_0", 32, True),   # int8 products of Q4_0 read the original rows
             (quantize(w[:32], "q5_1"), "q5_1", 32, True),
             (w[:32].astype(np.float16), "f16", 32, False)]  # a type with no copy
    if not _core.int8_row_lanes():
        cases.append((quantize(w[:32], "q8_0"), "q8_0", 32, True))  # no row-lane kernel here
    if not _core.float_row_lanes():
        cases.append((quantize(w[:32], "q4_0"), "q4_0", 32, False))
    for data, dtype, rows, int8 in cases:
        with pytest.raises(ValueError, match="row_lanes needs"):
            _core.matmul(data, dtype, rows, 64, x, int8_activations=int8, row_lanes=True)


def test_q8_0_with_int8_activations_gives_a_sequence_the_same_logits_in_any_batch():
    """Where the int8 variant streams Q8_0 at every row count (AVX-512 VNNI), a model with int8
    activations is batch-independent: a sequence's logits, prefill and decode, are bit for bit the
    same alone and beside others (which the server's batched steps and speculative verification rely on)."""
    if not _core.int8_every_row_count("q8_0"):
        pytest.skip(f"the {_core.int8_isa()} int8 variant uses int8 activations for Q8_0 from INT8_MIN_ROWS only")
    model = tokentrail.load(dtype="q8_0", exact=False)  # the bundled demo model
    assert_logits_do_not_depend_on_the_batch(model, seed=5)  # 104 rows: token lanes


# ---- AMX tiles (the avx512amx variant: Intel Xeon, Sapphire Rapids and later) -------------------
AMX = "avx512amx" in _core.available_int8_isas()
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU (or this OS) offers no AMX tiles to this process")


def test_int8_variants_are_listed_and_chosen_by_name():
    variants = _core.available_int8_isas()
    assert variants[0] == _core.int8_isa()  # the default comes first
    with pytest.raises(ValueError, match=r"int8 variant 'avx9000' .* \(available: " + ", ".join(variants) + r"\)"):
        _core.set_int8_isa("avx9000")
    try:
        for v in variants:
            _core.set_int8_isa(v)
            assert _core.int8_isa() == v
    finally:
        _core.set_isa(_core.isa())  # back to the default int8 variant
    assert _core.int8_isa() == variants[0]


def _variant_products(w, rows, k, x):
    """The int8 product through the row-lane copy on every int8 variant, by name."""
    out = {}
    try:
        for v in _core.available_int8_isas():
            _core.set_int8_isa(v)
            out[v] = _core.matmul(w, "q8_0", rows, k, x, int8_activations=True, row_lanes=True)
    finally:
        _core.set_isa(_core.isa())
    return out


@needs_amx
def test_amx_tiles_give_the_vnni_products_bit_for_bit():
    """Token counts below AMX_MIN_TOKENS (vpdpbusd), partial and whole groups of 16, and more than
    the 64 tokens of a pass; one block of 32 values and many; one group of 16 rows and many. The
    tiles' integer sums are exact and the float steps after them are VNNI's, in the same order."""
    rng = np.random.default_rng(21)
    for rows, k in ((16, 32), (48, 576), (64, 1536)):
        w = quantize(rng.standard_normal((rows, k)).astype(np.float32), "q8_0")
        for n in (1, 3, 4, 5, 15, 16, 17, 31, 33, 48, 63, 64, 65, 100, 129):
            x = activations(rng, n, k)
            got = _variant_products(w, rows, k, x)
            np.testing.assert_array_equal(got["avx512amx"], got["avx512vnni"], err_msg=f"rows={rows} k={k} n={n}")
            want = int8_matmul(w, "q8_0", rows, k, x)
            assert np.all(np.abs(got["avx512amx"] - want) <= error_bound(w, "q8_0", rows, k, x))


@needs_amx
def test_amx_tiles_survive_another_librarys_tiles_between_calls():
    """The tile configuration belongs to the thread: PyTorch (oneDNN) may load its own for bf16
    products on the same threads between two of ours, and ours must be loaded again."""
    torch = require("torch")
    rng = np.random.default_rng(22)
    rows, k = 64, 576
    w = quantize(rng.standard_normal((rows, k)).astype(np.float32), "q8_0")
    x = activations(rng, 40, k)
    want = _variant_products(w, rows, k, x)["avx512vnni"]
    a = torch.randn(256, 256, dtype=torch.bfloat16)
    for _ in range(3):
        (a @ a).sum().item()  # bf16 products, through AMX where oneDNN takes it
        got = _core.matmul(w, "q8_0", rows, k, x, int8_activations=True, row_lanes=True)
        np.testing.assert_array_equal(got, want)


@needs_amx
def test_a_model_gives_the_same_logits_with_amx_tiles_or_without():
    """The bundled model in q8_0 with int8 activations and the row-lane copy: a prompt, a decode step
    and a batched step give the same logits bit for bit on either variant, and stay batch-independent."""
    model = tokentrail.load(dtype="q8_0", exact=False)
    assert model.repacked
    prompts = [list(range(3, 40)), list(range(50, 58)), [9, 10, 11]]
    runs = {}
    try:
        for v in ("avx512amx", "avx512vnni"):
            _core.set_int8_isa(v)
            sessions = [model.session() for _ in prompts]
            first = [np.asarray(x) for x in model.forward_batch(sessions, prompts)]
            step = [np.asarray(x) for x in model.forward_batch(sessions, [[7]] * len(prompts))]
            runs[v] = first + step
    finally:
        _core.set_isa(_core.isa())
    for a, b in zip(runs["avx512amx"], runs["avx512vnni"]):
        np.testing.assert_array_equal(a, b)
    assert _core.int8_isa() == "avx512amx"
    assert_logits_do_not_depend_on_the_batch(model, seed=23)


@needs_amx
def test_tokentrail_amx_0_keeps_vnni_alone():
    code = "from tokentrail import _core; print(_core.int8_isa(), _core.available_int8_isas())"
    env = dict(os.environ, TOKENTRAIL_AMX="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["avx512vnni", "['avx512vnni']"]
