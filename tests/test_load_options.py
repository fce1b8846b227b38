"""Converting weights at load time, and loading without copying the checkpoint."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tokentrail
from conftest import require
from reference_models import build, reference_logits

IDS = [1, 17, 200, 5, 99, 42, 42, 7]
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    require("torch")
    require("transformers")
    d = tmp_path_factory.mktemp("llama")
    return d, build("llama", d)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "f16", "bf16"])
def test_converted_weights_match_transformers_on_the_same_rounded_weights(llama, dtype):
    torch = require("torch")
    gguf = require("gguf")
    d, ref = llama
    model = tokentrail.load(d, dtype=dtype)
    state = {}
    for layer in range(model.config.n_layers):
        for ours, theirs in HF_NAMES.items():
            part = "attn" if ours in "qkvo" else "mlp"
            w = model.weights[f"blocks.{layer}.{part}.{ours}.weight"]
            assert w.dtype == dtype
            if dtype in ("q8_0", "q4_0"):  # decoded by the gguf package, not by tokentrail
                qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
                values = gguf.quants.dequantize(np.asarray(w.data), qtype).reshape(w.shape)
            elif dtype == "f16":
                values = np.asarray(w.data).astype(np.float32)
            else:
                values = (np.asarray(w.data).astype(np.uint32) << 16).view(np.float32)
            state[f"model.layers.{layer}.{theirs}.weight"] = torch.from_numpy(np.array(values, np.float32))
    for name in ("embed.weight", "unembed.weight"):
        assert model.weights[name].dtype == dtype
    w = model.weights["embed.weight"]
    rounded = w.to_float32()
    state["model.embed_tokens.weight"] = torch.from_numpy(np.array(rounded))
    state["lm_head.weight"] = torch.from_numpy(np.array(model.weights["unembed.weight"].to_float32()))
    ref.load_state_dict(state, strict=False)
    np.testing.assert_allclose(model.forward(IDS), reference_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_unknown_dtype(llama):
    with pytest.raises(ValueError, match="unknown dtype"):
        tokentrail.load(llama[0], dtype="int3")


def test_loading_maps_instead_of_copying(tmp_path):
    """A float32 checkpoint runs from its memory map: resident memory stays near one copy of the weights."""
    require("torch")
    require("transformers")
    script = textwrap.dedent(f"""
        import resource, sys, os
        sys.path.insert(0, {str((tmp_path / '..').resolve())!r})
        import torch, transformers as tf
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
        tf.LlamaForCausalLM(cfg).save_pretrained({str(tmp_path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    size = (tmp_path / "model.safetensors").stat().st_size
    probe = textwrap.dedent(f"""
        import resource, numpy, tokentrail
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = tokentrail.load({str(tmp_path)!r})
        m.forward([1, 2, 3])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)
    assert size > 80e6
    assert grown < 1.25 * size, (grown, size)


def test_rows_that_do_not_fill_blocks_fall_back_to_f16(llama):
    d, _ = llama
    k_model = tokentrail.load(d, dtype="q4_k")  # 256-value blocks; this model's rows have 64 or 96 values
    f16_model = tokentrail.load(d, dtype="f16")
    assert {w.dtype for n, w in k_model.weights.items() if len(w.shape) == 2} == {"f16"}
    np.testing.assert_array_equal(k_model.forward(IDS), f16_model.forward(IDS))
