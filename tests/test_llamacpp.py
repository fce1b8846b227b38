"""llama.cpp reads the GGUF files tokentrail writes and computes the same next-token logits.

Reference: llama.cpp itself, through the llama-cpp-python package, loading the
file `tokentrail convert` (or `write_gguf`) produced. Both engines read the
very same weights, so what remains is how each does its arithmetic. Logits are
compared as max |difference| over the vocabulary divided by the spread (the
standard deviation of tokentrail's logits at that position), at every
position of the prompt and of an 8-token greedy continuation.

Fixed bounds, per weight type (u = unit roundoff of the format llama.cpp
rounds to; noise enters at each of the 4 matrix-product inputs per layer,
adds up like a random walk over the ~10-20 of them, and the worst of a few
thousand logits sits about 4 standard deviations out):

* f32: float32 everywhere; only summation order differs (u = 6e-8, ~1e-6 of
  the spread). llama.cpp's GELU, though, reads an f16 table (u = 4.9e-4 on
  the MLP activation: ~1e-4 for GPT-2). Bound 5e-4: still 4 times below the
  2e-3 that llama.cpp's default f16 KV cache causes (the tests run it with an
  f32 cache), so no hidden f16 stage goes unnoticed.
* f16: llama.cpp rounds every product's input to f16 before multiplying f16
  weights (uniform relative error, rms u/sqrt(3) = 2.8e-4); tokentrail keeps
  float32 activations. sqrt(20) * 2.8e-4 * 4 = 5e-3. Bound 1e-2.
* q8_0, q4_0: llama.cpp quantizes every product's input to 8 bits in blocks
  of 32 (step = block maximum / 127, rms error step / sqrt(12); with block
  maxima 3-4 times the block RMS, 0.8% of it) and multiplies integers.
  sqrt(20) * 0.8% * 4 = 0.15. Bound 0.2 -- still far below the 0.6-0.9 by
  which 4-bit weights themselves move the logits of the Llama-family models
  here (measured: 0.03-0.06 between the engines); the q4_0 cases also check
  that the engines differ by less than a quarter of that, i.e. llama.cpp
  reads the same 4-bit values, not merely something near the f32 weights.

A model-specific bound as well: tokentrail runs again with every product's
input rounded (and GELU tabulated) the way llama.cpp does it, through
capture-point replacement, and llama.cpp must stay within 4 times the
distance that this moves tokentrail's own logits (plus 2e-5 for summation
order). On f32 Llama-family files that bound is ~3e-5. Rounding is
discontinuous, so the emulation need not reproduce llama.cpp's numbers
exactly (1e-6 differences flip later roundings), but it measures the size of
the disturbance for this very model and prompt.

Top-1: llama.cpp's best token must be tokentrail's or within twice the bound
of it, and each greedy step must pick tokentrail's token unless tokentrail's
top two logits are that close. The continuation is fed to llama.cpp one
token at a time, so its KV-cache decode path is compared too.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tokentrail
from conftest import greedy_with_logits, require, require_stories
from tokentrail.loading import Checkpoint, read_checkpoint
from tokentrail.loading.gguf_writer import write_gguf
from tokentrail.loading.quant import dequantize, quantize
from tokentrail.tokenizer import Tokenizer

llama_cpp = require("llama_cpp")

TYPES = ("f32", "f16", "q8_0", "q4_0")
TOL = {"f32": 5e-4, "f16": 1e-2, "q8_0": 0.2, "q4_0": 0.2}
SUMMATION_ORDER = 2e-5
ROUNDING_FACTOR = 4  # llama.cpp vs tokentrail, at most this many times the modelled rounding disturbance
GREEDY_STEPS = 8
HF_PROMPT = [1, 17, 200, 5, 99, 42, 42, 7, 250, 3]
GGML_F32 = 0


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def byte_level_placeholder(vocab_size: int, bos: int | None, eos: int | None) -> Tokenizer:
    """A byte-level BPE vocabulary for checkpoints that ship without a tokenizer.

    llama.cpp refuses a GGUF file without tokenizer.ggml.* keys; these tests
    feed token ids, so any vocabulary of the right size will do. Token i is
    byte i in GPT-2's byte-to-character mapping; one merge (newline twice)
    because llama.cpp's BPE loader wants at least one.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(min(vocab_size - 1, 256))}
    newline = chars[10]
    vocab[newline * 2] = len(vocab)
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(newline, newline)]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return Tokenizer(inner, bos_id=bos, eos_ids=[] if eos is None else [eos])


def with_placeholder_tokenizer(ck: Checkpoint) -> Checkpoint:
    c = ck.config
    eos = c.eos_token_ids[0] if c.eos_token_ids else None
    return Checkpoint(c, ck.weights, byte_level_placeholder(c.vocab_size, c.bos_token_id, eos), ck.source)


def llama_cpp_logits(path, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position: the prompt in one batch, then one token at a time."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                          type_k=GGML_F32, type_v=GGML_F32, verbose=False)
    llm.eval(prompt)
    for tok in continuation:
        llm.eval([tok])
    n = len(prompt) + len(continuation)
    assert llm.n_tokens == n
    out = np.array(llm.scores[:n], dtype=np.float32)
    llm.close()
    return out


def tokentrail_greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation and the logits of every position (prompt batch, then single tokens)."""
    rows, out = greedy_with_logits(model, prompt, n)
    return out, rows


def matmul_inputs(model) -> list[tuple[str, str]]:
    """(capture point, name of the matrix that multiplies it), in the order the forward pass meets them."""
    pairs = []
    for layer in range(model.config.n_layers):
        p = f"blocks.{layer}."
        pairs += [(p + "attn_norm", p + "attn.q.weight"), (p + "attn_z", p + "attn.o.weight"),
                  (p + "mlp_norm", p + "mlp.up.weight"), (p + "mlp_post", p + "mlp.down.weight")]
    pairs.append(("final_norm", "unembed.weight" if "unembed.weight" in model.weights else "embed.weight"))
    return pairs


def round_like_llama_cpp(x: np.ndarray, weight_dtype: str) -> np.ndarray:
    """What llama.cpp's CPU backend turns a product's float32 input into, by the weight's type."""
    if weight_dtype == "f32":
        return x
    if weight_dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    return dequantize(quantize(x, "q8_0"), "q8_0", x.shape)  # q8_0 and q4_0 both take q8_0 inputs


def gelu_like_llama_cpp(x: np.ndarray) -> np.ndarray:
    """llama.cpp's CPU GELU: a table of f16 results indexed by the f16-rounded input (exact outside +-10)."""
    h = x.astype(np.float16).astype(np.float32)
    table = 0.5 * h * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (h + np.float32(0.044715) * h ** 3)))
    y = table.astype(np.float16).astype(np.float32)
    return np.where(x <= -10, 0, np.where(x >= 10, x, y)).astype(np.float32)


def with_rounded_inputs(model, ids: list[int]) -> np.ndarray:
    """tokentrail's logits with every matrix product's input rounded as llama.cpp rounds it.

    Each input depends on the rounded ones before it, so the points are
    rounded one after another, each on a pass that already carries the
    earlier replacements. llama.cpp's GELU comes from an f16 table, so for
    GELU models the MLP's activation is recomputed that way too.
    """
    done: dict[str, np.ndarray] = {}

    def hooks():
        h = model.hooks()
        for name, rows in done.items():
            h.replace(name, dict(enumerate(rows)))
        return h

    gelu = model.config.activation == "gelu_tanh"
    for point, matrix in matmul_inputs(model):
        source = point.replace("mlp_post", "mlp_pre") if gelu else point
        h = hooks().capture(source)
        model.forward(ids, hooks=h)
        x = h.cache[source].reshape(len(ids), -1)
        if source != point:
            x = gelu_like_llama_cpp(x)
        done[point] = round_like_llama_cpp(x, model.weights[matrix].dtype)
    return model.forward(ids, hooks=hooks())


def compare(path, prompt: list[int], dtype: str, label: str, original=None) -> list[int]:
    """Check llama.cpp against tokentrail on the file at `path`; returns tokentrail's greedy continuation.

    `original`: the checkpoint's unconverted model, for the q4_0 check.
    """
    model = tokentrail.load(path)
    continuation, ours = tokentrail_greedy(model, prompt, GREEDY_STEPS)
    ids = prompt + continuation
    theirs = llama_cpp_logits(path, prompt, continuation)
    assert theirs.shape == ours.shape
    assert np.all(np.isfinite(theirs))

    spread = ours.std(axis=1)
    assert np.all(spread > 0)
    diff = np.abs(theirs - ours).max(axis=1) / spread
    rounded = with_rounded_inputs(model, ids)
    disturbance = np.abs(rounded - ours).max(axis=1) / spread
    bound = min(TOL[dtype], ROUNDING_FACTOR * disturbance.max() + SUMMATION_ORDER)
    report = (f"{label} {dtype}: llama.cpp differs from tokentrail by {diff.max():.2e} of the spread "
              f"(worst at position {int(diff.argmax())}); llama.cpp's rounding moves tokentrail's logits "
              f"{disturbance.max():.2e}; bound {bound:.2e}")
    print(report)
    assert diff.max() <= bound, report

    # Top-1: llama.cpp's choice must be tokentrail's best or within the tolerance of it.
    best = ours.max(axis=1)
    at_theirs = ours[np.arange(len(ids)), theirs.argmax(axis=1)]
    assert np.all(best - at_theirs <= 2 * bound * spread), report
    # The greedy continuation: same tokens, unless tokentrail itself saw a near-tie.
    for step, tok in enumerate(continuation):
        row = len(prompt) + step - 1
        top2 = np.sort(ours[row])[-2:]
        if top2[1] - top2[0] > 2 * bound * spread[row]:
            assert int(theirs[row].argmax()) == tok, f"{label} {dtype}: greedy step {step}"
    if dtype == "q4_0" and original is not None:
        # 4-bit weights move the logits far more than the engines differ: llama.cpp
        # reads the same 4-bit values tokentrail does, not something else close to them.
        moved = (np.abs(ours - original.forward(ids)).max(axis=1) / spread).max()
        assert diff.max() < 0.25 * moved, f"{report}; q4_0 weights move the logits only {moved:.2e}"
    return continuation


# --------------------------------------------------------------------------
# stories260K, the real llama2.c model
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_original():
    return tokentrail.load(require_stories() / "stories260K.bin")


@pytest.mark.parametrize("dtype", TYPES)
def test_stories_converted_by_the_cli_runs_in_llama_cpp(stories_original, tmp_path, dtype):
    """Through the command users run; ffn_down (172 columns) stays f16 in q8_0/q4_0 files."""
    src, path = require_stories() / "stories260K.bin", tmp_path / f"stories-{dtype}.gguf"
    subprocess.run([sys.executable, "-m", "tokentrail.cli", "convert", str(src), str(path), "--type", dtype],
                   check=True, capture_output=True)
    prompt = stories_original.encode("Once upon a time, there was a little girl named Lily")
    # llama.cpp reads the written vocabulary: the same ids for this prompt.
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert vocab.tokenize(b"Once upon a time, there was a little girl named Lily", add_bos=True) == prompt
    continuation = compare(path, prompt, dtype, "stories260K", stories_original)
    if dtype == "f32":
        # The f32 file holds the original weights: the same greedy story as the .bin itself.
        assert tokentrail_greedy(stories_original, prompt, GREEDY_STEPS)[0] == continuation


# --------------------------------------------------------------------------
# the parity suite's tiny Hugging Face models
# --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=("llama", "qwen2", "gpt2"))
def hf_model(request, tmp_path_factory):
    require("torch")
    require("transformers")
    from reference_models import build

    d = tmp_path_factory.mktemp(request.param)
    build(request.param, d)
    return request.param, with_placeholder_tokenizer(read_checkpoint(d)), tokentrail.load(d)


@pytest.mark.parametrize("dtype", TYPES)
def test_hf_models_gguf_in_llama_cpp(hf_model, tmp_path, dtype):
    family, ck, original = hf_model
    path = write_gguf(ck, tmp_path / f"{family}-{dtype}.gguf", dtype)
    continuation = compare(path, HF_PROMPT, dtype, family, original)
    if dtype == "f32":
        assert tokentrail_greedy(original, HF_PROMPT, GREEDY_STEPS)[0] == continuation


def test_checkpoint_without_tokenizer_converts_for_llama_cpp(hf_model, tmp_path):
    """A model with no tokenizer is written with tokenizer.ggml.model = "none"; both engines read it."""
    family, ck, original = hf_model
    bare = Checkpoint(ck.config, ck.weights, None, ck.source)
    path = write_gguf(bare, tmp_path / f"{family}-bare.gguf", "f32")
    reread = tokentrail.load(path)
    assert reread.tokenizer is None
    ours = original.forward(HF_PROMPT)
    np.testing.assert_allclose(reread.forward(HF_PROMPT), ours, atol=1e-5)
    theirs = llama_cpp_logits(path, HF_PROMPT, [])
    # f32 everywhere: only summation order (and llama.cpp's GELU table on gpt2) differs, as above.
    assert np.abs(theirs - ours).max() / ours.std() < 5e-4
