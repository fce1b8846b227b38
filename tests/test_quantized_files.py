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
from tokentrail.loading.gguf import GGUFFile

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
def float_file(llama256_f32):
    """The tiny Llama's f32 GGUF (conftest.llama256_f32), and tokentrail's model of it."""
    return llama256_f32, tokentrail.load(llama256_f32)


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
