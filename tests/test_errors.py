"""Bad input raises a clear error naming the problem; the cache limit is enforced."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tokentrail


def copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_full_cache_raises(llama_dir):
    model = tokentrail.load(llama_dir, context=8)
    s = model.session()
    s.feed([1, 2, 3, 4, 5])
    s.feed([6, 7, 8])
    with pytest.raises(tokentrail.ContextFullError, match="context is full"):
        s.feed([9])
    assert s.pos == 8  # nothing was half-written
    s.rewind(7)
    assert s.feed([9]).shape == (model.config.vocab_size,)


def test_fork_is_independent(llama_dir):
    model = tokentrail.load(llama_dir)
    s = model.session()
    s.feed([1, 5, 9])
    f = s.fork()
    a = s.feed([11])
    f.feed([12])
    b = f.fork()
    assert s.pos == 4 and f.pos == 4 and b.pos == 4
    np.testing.assert_allclose(a, model.forward([1, 5, 9, 11])[-1], atol=1e-5)
    np.testing.assert_allclose(b.feed([13]), model.forward([1, 5, 9, 12, 13])[-1], atol=1e-5)


def test_token_out_of_vocabulary(llama_dir):
    model = tokentrail.load(llama_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([1, model.config.vocab_size])


def test_corrupted_config(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(tokentrail.CheckpointError, match="config.json"):
        tokentrail.load(d)


def test_unknown_architecture(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tokentrail.CheckpointError, match="unsupported architecture 'MambaForCausalLM'"):
        tokentrail.load(d)


def test_config_that_disagrees_with_tensors(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tokentrail.CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj\.weight.*|expected"):
        tokentrail.load(d)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_safetensors_wrong_shape(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)

    def edit(h):  # same bytes, shape transposed: only the shape check can notice
        h["model.layers.1.self_attn.k_proj.weight"]["shape"] = list(reversed(h["model.layers.1.self_attn.k_proj.weight"]["shape"]))

    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(tokentrail.CheckpointError) as e:
        tokentrail.load(d)
    assert "model.layers.1.self_attn.k_proj.weight" in str(e.value) and "model.safetensors" in str(e.value)


def test_safetensors_data_past_end(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(tokentrail.CheckpointError, match="inside the file"):
        tokentrail.load(d)


def test_missing_tensor(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path)
    _rewrite_header(d / "model.safetensors", lambda h: h.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(tokentrail.CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        tokentrail.load(d)


def test_truncated_header(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(tokentrail.CheckpointError, match="truncated"):
        tokentrail.load(d)
