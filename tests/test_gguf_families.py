"""Every family as a GGUF file: written by llama.cpp's own converter and by `tokentrail convert`,
read by tokentrail with transformers' logits, and read by llama.cpp with tokentrail's.

The GGUF twin of each tiny random Hugging Face model comes from llama.cpp's convert_hf_to_gguf.py
(see llama_cpp_converter.py). Bounds: against transformers, the Hugging Face parity bound (1e-4);
against llama.cpp, its f32 bound from test_llamacpp.py (5e-4 of the logits' spread: the same
weights, only the order of summation and llama.cpp's tabulated GELU differ). Gemma gates every MLP
through that GELU, on activations its embedding scale (sqrt(hidden)) makes large, where the table's
f16 steps are coarse: its bound is 2e-3 (measured 8-9e-4), still the size of the f16 KV cache's
effect that the f32 bound guards against.
"""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from conftest import greedy_with_logits, require
from llama_cpp_converter import convert, write_placeholder_tokenizer
from reference_models import CALL_DEPENDENT, FAMILIES, build, reference_logits
from tokentrail.loading import read_checkpoint
from tokentrail.loading.gguf_writer import write_gguf

PROMPT = [1, 17, 200, 5, 99, 42, 42, 7, 250, 3, 64, 128]
LLAMA_CPP_BOUND = 5e-4
GELU_GATED_BOUND = 2e-3

# What a GGUF file of these configurations cannot say, so that its twin legitimately differs:
# llama.cpp's converter writes no window for Mistral (llama.cpp runs it with full attention), and
# GGUF has no field for Gemma 2's query_pre_attn_scalar (llama.cpp derives the scale from sizes).
NOT_EXPRESSIBLE = {"mistral_window": "the converter drops Mistral's sliding window",
                   "gemma2_qpas": "GGUF cannot store query_pre_attn_scalar"}
# Architectures this build of llama.cpp reads through llama-cpp-python.
LLAMA_CPP_ARCHS = {"llama", "qwen2", "qwen3", "qwen3moe", "olmoe", "gemma", "gemma2", "gemma3", "phi3", "gptneox",
                   "olmo2", "gpt2"}


@pytest.fixture(scope="module", params=[f for f in FAMILIES if f not in CALL_DEPENDENT])
def twins(request, tmp_path_factory):
    """(family, transformers model, Hugging Face dir, llama.cpp-converted GGUF)."""
    require("torch")
    require("transformers")
    d = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, d)
    write_placeholder_tokenizer(d, ref.config.vocab_size)
    return request.param, ref, d, convert(d, d / "converted.gguf")


def _close(got, want, bound, label):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= bound, f"{label}: max |difference| {err:.2e} of the largest logit > {bound:.0e}"


def test_converted_gguf_matches_transformers(twins):
    family, ref, _, path = twins
    if family in NOT_EXPRESSIBLE:
        pytest.skip(NOT_EXPRESSIBLE[family])
    ours = tokentrail.load(path)
    got, greedy = greedy_with_logits(ours, PROMPT, 8)
    want = reference_logits(ref, PROMPT + greedy)
    _close(got, want, 1e-4, family)
    assert greedy == [int(np.argmax(r)) for r in want[len(PROMPT) - 1:-1]]


def test_converted_gguf_reads_the_family_fields(twins):
    family, _, d, path = twins
    hf, gg = tokentrail.load(d).config, tokentrail.load(path).config
    for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size", "qk_norm", "pre_norms", "post_norms",
                 "parallel_residual", "rotary_size", "attn_softcap", "final_softcap", "embed_scale", "n_experts",
                 "n_experts_used", "renormalize_experts", "norm", "activation"):
        assert getattr(gg, name) == pytest.approx(getattr(hf, name)), f"{family}: {name}"
    if family not in NOT_EXPRESSIBLE:
        assert gg.sliding_layers() == hf.sliding_layers()


def _without_tokenizer(d):
    """The checkpoint of `d` without its placeholder word-level tokenizer (GGUF has no such kind)."""
    ck = read_checkpoint(d)
    ck.tokenizer = None
    return ck


def test_tokentrail_convert_round_trip(twins, tmp_path):
    """`tokentrail convert` writes each family back as GGUF; reading that file gives the same logits.
    What the format cannot say is refused, never written wrongly."""
    family, _, d, _ = twins
    if family in NOT_EXPRESSIBLE:
        with pytest.raises(tokentrail.CheckpointError, match="cannot"):
            write_gguf(_without_tokenizer(d), tmp_path / "ours.gguf")
        return
    source = tokentrail.load(d)
    out = write_gguf(_without_tokenizer(d), tmp_path / "ours.gguf")
    back = tokentrail.load(out)
    _close(back.forward(PROMPT), source.forward(PROMPT), 1e-5, family)


def test_llama_cpp_agrees_on_converted_and_written_files(twins, tmp_path):
    llama_cpp = require("llama_cpp")
    family, _, d, path = twins
    arch = tokentrail.load(path).config.architecture
    if arch not in LLAMA_CPP_ARCHS:
        pytest.skip(f"llama.cpp does not read {arch}")
    files = [("converted", path)]
    if family not in NOT_EXPRESSIBLE:
        files.append(("written", write_gguf(_without_tokenizer(d), tmp_path / "ours.gguf")))
    for label, file in files:
        ours = tokentrail.load(file)
        got, greedy = greedy_with_logits(ours, PROMPT, 4)
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                              type_k=0, type_v=0, verbose=False)
        llm.eval(PROMPT)
        for tok in greedy:
            llm.eval([tok])
        theirs = np.array(llm.scores[:len(PROMPT) + len(greedy)], dtype=np.float32)
        llm.close()
        spread = got.std(axis=1, keepdims=True)
        err = float((np.abs(theirs - got) / spread).max())
        bound = GELU_GATED_BOUND if ours.config.gated_mlp and ours.config.activation != "silu" else LLAMA_CPP_BOUND
        assert err <= bound, f"{family} ({label}): {err:.2e} of the spread"


def _copy_with(src, dst, extra_key=None, extra_tensor=None):
    """Rewrite a GGUF file with the gguf package, adding one metadata key or one tensor."""
    gguf = require("gguf")
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), vtype)
    if extra_key:
        writer.add_float32(f"{arch}.{extra_key}", 0.5)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_unknown_gguf_metadata_and_tensors_are_refused(twins, tmp_path):
    family, _, _, path = twins
    tokentrail.load(_copy_with(path, tmp_path / "same.gguf"))  # the copy itself reads
    with pytest.raises(tokentrail.CheckpointError, match="attention.temperature_scale"):
        tokentrail.load(_copy_with(path, tmp_path / "key.gguf", extra_key="attention.temperature_scale"))
    with pytest.raises(tokentrail.CheckpointError, match="blk.0.attn_mystery.weight"):
        tokentrail.load(_copy_with(path, tmp_path / "tensor.gguf", extra_tensor="blk.0.attn_mystery.weight"))


def test_journey_and_captures_of_the_gguf_twin(twins):
    """Loaded from GGUF, every family still records every capture point and its journey adds up."""
    family, _, d, path = twins
    ours = tokentrail.load(path)
    logits, cache = ours.run_with_cache(PROMPT, names="*")
    np.testing.assert_allclose(cache["logits"][-1], logits[-1] if logits.ndim == 2 else logits, atol=1e-5)
    for layer in range(ours.config.n_layers):
        assert f"blocks.{layer}.attn_pattern" in cache and f"blocks.{layer}.resid_post" in cache
        if ours.config.n_experts:
            assert f"blocks.{layer}.router" in cache
    j = ours.journey(PROMPT)
    a = j.attribution()
    summed = a["capped_total"] if ours.config.final_softcap else a["total"]
    assert abs(summed - float(j.logits[a["token"]])) <= 1e-4 * max(1.0, abs(float(j.logits[a["token"]])))
