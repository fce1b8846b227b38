"""The row-lane copies of quantized matrices (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL and the k-quants;
`load(repack=...)`): products through them against a float64 reference, a row's result independent
of its batch, and models with and without the copy alike."""
from __future__ import annotations

import os

import numpy as np
import pytest

import tokentrail
from conftest import assert_logits_do_not_depend_on_the_batch
from tokentrail import _core
from tokentrail.errors import InvalidArgumentError
from tokentrail.loading.gguf_writer import write_gguf
from tokentrail.loading.quant import dequantize, quantize
from tokentrail.model import _in_read_only_file

needs_row_lanes = pytest.mark.skipif(not _core.int8_row_lanes(),
                                     reason=f"the {_core.int8_isa()} variant has no row-lane kernels")


COPIED = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "q6_k"]


@needs_row_lanes
@pytest.mark.parametrize("dtype", COPIED)
@pytest.mark.parametrize("rows", [16, 32, 48, 80])
def test_float_products_through_the_copy_match_float64(rows, dtype):
    """Every way the tokens and the groups of 16 rows are split into passes (1-3 tokens: 4 groups at
    a time, 4-7: 2 groups, 8 and more: one group with passes of up to 16 tokens)."""
    rng = np.random.default_rng(rows)
    k = 768 if dtype in ("q4_k", "q5_k", "q6_k") else 576  # whole super-blocks of 256 values for the k-quants
    w = quantize(rng.standard_normal((rows, k)).astype(np.float32), dtype)
    wf = dequantize(w, dtype, (rows, k)).astype(np.float64)
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 50, 100, 150):  # 150: the GEMM, its panels from the copy
        x = rng.standard_normal((n, k)).astype(np.float32)
        y = _core.matmul(w, dtype, rows, k, x, row_lanes=True)
        ref = x.astype(np.float64) @ wf.T
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"n={n}")


@needs_row_lanes
@pytest.mark.parametrize("dtype", COPIED)
def test_a_row_through_the_copy_does_not_depend_on_its_batch(dtype):
    """A token's sum runs over k in one lane in the same order at any batch size: each row of an
    n-token product equals the same row computed alone, bit for bit (float activations), the
    packed GEMM's past 128 tokens included."""
    rng = np.random.default_rng(3)
    rows, k = 80, 1536
    w = quantize(rng.standard_normal((rows, k)).astype(np.float32), dtype)
    x = rng.standard_normal((200, k)).astype(np.float32)
    alone = np.stack([_core.matmul(w, dtype, rows, k, x[t:t + 1], row_lanes=True)[0] for t in range(200)])
    for n in (2, 3, 4, 6, 8, 13, 16, 33, 100, 200):
        np.testing.assert_array_equal(_core.matmul(w, dtype, rows, k, x[:n], row_lanes=True), alone[:n],
                                      err_msg=f"n={n}")


@needs_row_lanes
def test_a_grouped_product_gives_each_weight_its_rows_alone_at_any_batch():
    """The forward pass multiplies q/k/v and gate/up as one group. A weight whose copy takes any number
    of tokens (Q5_0, IQ4_NL, Q4_K, Q5_1: block sums scaled once per block) keeps to it beside weights
    whose copies stop at 64 (Q6_K) or 128 tokens (Q8_0) and go to the packed GEMM above: each weight's
    rows equal those it gives alone, one token at a time, bit for bit."""
    rng = np.random.default_rng(5)
    k = 512
    weights = [(quantize(rng.standard_normal((32, k)).astype(np.float32), dt), dt, 32)
               for dt in ("q5_0", "q6_k", "iq4_nl", "q8_0", "q4_k", "q5_1")]
    x = rng.standard_normal((200, k)).astype(np.float32)
    alone = [np.concatenate([_core.matmul(w, dt, rows, k, x[t:t + 1], row_lanes=True) for t in range(200)])
             for w, dt, rows in weights]
    for n in (1, 5, 40, 60, 100, 150, 200):
        together = _core.matmul_group(weights, k, x[:n], row_lanes=True)
        for (_, dt, _), got, want in zip(weights, together, alone):
            np.testing.assert_array_equal(got, want[:n], err_msg=f"{dt}, n={n}")
    with pytest.raises(ValueError, match="row_lanes"):  # f32 has no copy: refused, not left out
        _core.matmul_group(weights[:1] + [(rng.standard_normal((32, k)).astype(np.float32), "f32", 32)], k, x,
                           row_lanes=True)


def _logits(model, prompts):
    out = []
    for p in prompts:
        s = model.session()
        out.append(np.asarray(s.feed(p)))
        out.append(np.asarray(s.feed([5])))
    return out


@needs_row_lanes
@pytest.mark.parametrize("dtype,exact", [("q8_0", True), ("q8_0", False), ("q4_0", True), ("q4_1", True),
                                         ("q5_0", True), ("q5_1", True), ("iq4_nl", True)])
def test_a_model_with_the_copy_gives_the_logits_of_one_without(dtype, exact):
    with_copy = tokentrail.load(dtype=dtype, exact=exact, repack=True)
    without = tokentrail.load(dtype=dtype, exact=exact, repack=False)
    assert with_copy.repacked and not without.repacked
    prompts = [[1, 2, 3], list(range(10, 60))]
    for a, b in zip(_logits(with_copy, prompts), _logits(without, prompts)):
        if exact:  # the same float products summed in another order
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        else:  # the same integer sums and float steps
            np.testing.assert_array_equal(a, b)


@needs_row_lanes
@pytest.mark.parametrize("dtype", ["q4_k", "q5_k", "q6_k"])
def test_a_k_quant_model_with_the_copy_gives_the_logits_of_one_without(llama256_f32, dtype):
    """A Llama whose rows hold whole 256-value super-blocks: every Q4_K, Q5_K or Q6_K matrix gets its copy;
    the logits match a model without it, and a sequence's logits do not depend on its batch."""
    with_copy = tokentrail.load(llama256_f32, dtype=dtype, repack=True)
    without = tokentrail.load(llama256_f32, dtype=dtype, repack=False)
    assert with_copy.repacked and not without.repacked
    prompts = [[1, 2, 3], list(range(10, 60))]
    for a, b in zip(_logits(with_copy, prompts), _logits(without, prompts)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # Within its 64 positions; 144 tokens in one step: Q6_K past its 64 goes to the GEMM, Q4_K and Q5_K
    # stay on their copies in two blocks of tokens.
    assert_logits_do_not_depend_on_the_batch(with_copy, seed=9, lengths=(3, 11, 20, 50, 60))


@needs_row_lanes
@pytest.mark.parametrize("dtype", ["q4_0", "q5_1", "q4_k", "q6_k"])
def test_with_int8_activations_the_copy_serves_the_float_products(llama256_f32, dtype):
    """With int8 activations, products of INT8_MIN_ROWS tokens and more read the file's rows in
    integers, and those of fewer tokens (decode) stay in float: they read the copy. The logits
    match a model without the copy, in decode (the copy's float products) and for a prompt (the
    same int8 products)."""
    with_copy = tokentrail.load(llama256_f32, dtype=dtype, exact=False, repack=True)
    without = tokentrail.load(llama256_f32, dtype=dtype, exact=False, repack=False)
    assert with_copy.repacked and not without.repacked
    prompts = [[1, 2, 3], list(range(10, 60))]
    for a, b in zip(_logits(with_copy, prompts), _logits(without, prompts)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@needs_row_lanes
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_float_logits_with_the_copy_do_not_depend_on_the_batch(dtype):
    """194 prompt tokens in one batched step: past 128, Q8_0 goes to the packed GEMM, the others stay on
    their copies in blocks of tokens."""
    assert_logits_do_not_depend_on_the_batch(tokentrail.load(dtype=dtype, repack=True), seed=8,
                                             lengths=(3, 11, 20, 70, 90))


@needs_row_lanes
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])  # the demo's rows of 128 hold no Q4_K super-block
def test_a_gguf_file_repacked_reads_its_embedding_rows_back_from_the_file(tmp_path, dtype):
    """The file's pages are handed back once copied; the tied embedding's lookups read them again."""
    source = tokentrail.load()
    path = write_gguf(tokentrail.loading.read_checkpoint(source.source), tmp_path / f"demo-{dtype}.gguf", dtype=dtype)
    a = tokentrail.load(path, repack=True)
    b = tokentrail.load(path, repack=False)
    assert a.repacked
    quantized = [w for w in a.weights.values() if w.dtype == dtype]
    assert quantized and all(_in_read_only_file(np.ascontiguousarray(w.data)) for w in quantized)
    prompts = [list(range(1, 40))]
    for x, y in zip(_logits(a, prompts), _logits(b, prompts)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert a.generate([1, 2, 3], max_new_tokens=12, temperature=0).token_ids == \
        b.generate([1, 2, 3], max_new_tokens=12, temperature=0).token_ids


@needs_row_lanes
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_a_repacked_model_runs_on_another_kernel_variant_from_the_file(tmp_path, dtype):
    """Kernels without row lanes read the original rows: switched to AVX2 after loading, a repacked
    GGUF model (whose file pages were handed back) gives the logits of one loaded without the copy."""
    source = tokentrail.load()
    path = write_gguf(tokentrail.loading.read_checkpoint(source.source), tmp_path / f"demo-{dtype}.gguf", dtype=dtype)
    repacked, plain = tokentrail.load(path, repack=True), tokentrail.load(path, repack=False)
    default = _core.isa()
    try:
        _core.set_isa("avx2")
        prompts = [list(range(1, 60))]
        for a, b in zip(_logits(repacked, prompts), _logits(plain, prompts)):
            np.testing.assert_array_equal(a, b)
    finally:
        _core.set_isa(default)


def test_repack_option_is_checked():
    with pytest.raises(InvalidArgumentError, match="repack must be"):
        tokentrail.load(repack="yes")
    if not _core.int8_row_lanes():
        with pytest.raises(InvalidArgumentError, match="repack=True needs"):
            tokentrail.load(dtype="q8_0", repack=True)
    assert tokentrail.load(repack=False).repacked is False
    assert tokentrail.load(dtype="f32").repacked is False  # nothing in q8_0 to lay out


def test_cli_repack_flags_reach_the_model():
    """`--no-repack` loads without the copy (the same greedy text); `--repack` insists on it."""
    import subprocess
    import sys

    prompt = "Once upon a time"
    base = [sys.executable, "-m", "tokentrail.cli", "generate", prompt, "-n", "8", "--dtype", "q8_0"]
    off = subprocess.run([*base, "--no-repack"], capture_output=True, text=True, timeout=120)
    assert off.returncode == 0, off.stderr
    model = tokentrail.load(dtype="q8_0", repack=False)
    assert off.stdout.strip() == (prompt + model.generate(prompt, max_new_tokens=8, temperature=0).text).strip()
    on = subprocess.run([*base, "--repack"], capture_output=True, text=True, timeout=120)
    if _core.int8_row_lanes():
        assert on.returncode == 0, on.stderr
    else:
        assert on.returncode != 0 and "repack=True needs" in on.stderr


def test_the_core_refuses_a_file_backed_name_that_is_no_weight():
    model = tokentrail.load()
    weights = {n: (np.ascontiguousarray(w.data), w.dtype) for n, w in model.weights.items()}
    with pytest.raises(ValueError, match="'blocks.0.attn.q.weihgt', which is not among the weights"):
        _core.Model(model.config.core_dict(), weights, file_backed=["blocks.0.attn.q.weihgt"])


def _vmas_advised(flag: str) -> int:
    """How many of this process's mappings carry `flag` in their VmFlags (hg: advised into huge
    pages, nh: advised against them)."""
    with open("/proc/self/smaps") as fh:
        return sum(1 for line in fh if line.startswith("VmFlags:") and flag in line.split()[1:])


@needs_row_lanes
def test_copies_in_4_kib_pages_when_asked(monkeypatch):
    """TOKENTRAIL_HUGE_PAGES=0 puts the copies in 4 KiB pages (advised against huge pages: on VMs
    that back a fresh 2 MiB page slowly, loading took 4-8x as long), with the same logits; any
    other value than 0 or 1 is refused when a copy is made."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps to read the pages' advice from")
    monkeypatch.delenv("TOKENTRAIL_HUGE_PAGES", raising=False)
    assert _core.copies_in_huge_pages()
    huge = tokentrail.load(dtype="q8_0", repack=True)
    monkeypatch.setenv("TOKENTRAIL_HUGE_PAGES", "0")
    assert not _core.copies_in_huge_pages()
    before = _vmas_advised("nh")
    small = tokentrail.load(dtype="q8_0", repack=True)
    assert small.repacked and _vmas_advised("nh") > before
    ids = list(range(5, 40))
    assert np.array_equal(huge.session().feed(ids), small.session().feed(ids))
    monkeypatch.setenv("TOKENTRAIL_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="TOKENTRAIL_HUGE_PAGES must be 0"):
        tokentrail.load(dtype="q8_0", repack=True)
    monkeypatch.setenv("TOKENTRAIL_HUGE_PAGES", "1")
    assert _core.copies_in_huge_pages()
