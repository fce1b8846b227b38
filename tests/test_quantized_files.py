"""Files quantized by llama.cpp's own quantizer, read by tokentrail and compared with llama.cpp.

A tiny Llama-family model (rows of 256 and 512 values, so that every matrix
can take the 256-value k-quants) is built by transformers, written as an f32
GGUF, and quantized by llama.cpp (`llama_model_quantize`, as the
`llama-quantize` tool does) to the mixes people download: Q4_K_M and Q5_K_M
(Q4_K / Q5_K bodies with Q6_K for the output and some value and down
projections), and the 32-value types Q4_1, Q5_0, Q5_1 and IQ4_NL. tokentrail
loads each file as it is (no conversion) and its logits and greedy tokens are
compared with llama.cpp's on the same file, with the bounds and reasoning of
test_llamacpp.py (llama.cpp feeds 8-bit activations to every quantized
product).
"""
from __future__ import annotations

import ctypes

import pytest

import tokentrail
from conftest import require
from test_llamacpp import HF_PROMPT, compare
from tokentrail.loading import read_checkpoint
from tokentrail.loading.gguf import GGUFFile
from tokentrail.loading.gguf_writer import write_gguf

llama_cpp = require("llama_cpp")

# llama.cpp file type -> the weight types the file must hold (so each kernel is really exercised).
MIXES = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", {"q4_k", "q6_k"}),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", {"q5_k", "q6_k"}),
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", {"q4_1"}),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", {"q5_0"}),
    "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", {"q5_1"}),
    "iq4_nl": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", {"iq4_nl"}),
}


def llama_quantize(src, dst, ftype_name: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama.cpp could not quantize {src} to {ftype_name}"


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    """A tiny Llama (hidden 256, MLP 512) as an f32 GGUF without a tokenizer, and tokentrail's model of it."""
    require("torch")
    transformers = require("transformers")
    d = tmp_path_factory.mktemp("llama256")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    import torch

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d, safe_serialization=True)
    ck = read_checkpoint(d)
    ck.tokenizer = None
    path = write_gguf(ck, d / "llama256-f32.gguf", "f32")
    return path, tokentrail.load(path)


@pytest.mark.parametrize("mix", list(MIXES))
def test_llama_cpp_quantized_file(float_file, tmp_path, mix):
    src, original = float_file
    ftype, expected = MIXES[mix]
    path = tmp_path / f"llama256-{mix}.gguf"
    llama_quantize(src, path, ftype)
    stored = {GGUFFile(path).tensors[name].dtype for name in GGUFFile(path).tensors}
    assert expected <= stored, f"{mix} file holds {sorted(stored)}"
    model = tokentrail.load(path)
    assert expected <= {w.dtype for w in model.weights.values()}  # read as stored, not converted
    compare(path, HF_PROMPT, mix, "llama256", original)
