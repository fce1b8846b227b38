"""Every family: its captures agree with transformers' own intermediate tensors, its journey adds up
and narrates what is particular to it, and anything in a checkpoint the family does not explain
refuses the load."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tokentrail
from conftest import require
from reference_models import FAMILIES, build, build_family

PROMPT = [1, 17, 200, 5, 99, 42, 42, 7, 250, 3, 64, 128]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    return build_family(request, tmp_path_factory)


def reference_internals(ref, ids):
    """transformers' hidden states, attention probabilities and router logits on `ids` (eager attention)."""
    import torch

    ref.config._attn_implementation = "eager"
    kwargs = {"output_router_logits": True} if hasattr(ref.config, "num_experts_per_tok") else {}
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_hidden_states=True, output_attentions=True, **kwargs)
    return out


def test_captures_match_transformers_internals(pair):
    family, _, ours, ref = pair
    out = reference_internals(ref, PROMPT)
    _, cache = ours.run_with_cache(PROMPT, names="*")
    L = ours.config.n_layers
    hidden = [h[0].float().numpy() for h in out.hidden_states]
    # hidden_states[0] is the (scaled) embedding; [l] the residual after layer l-1; the last one is normalised.
    np.testing.assert_allclose(cache["blocks.0.resid_pre"], hidden[0], atol=1e-4, rtol=1e-4)
    for layer in range(L - 1):
        np.testing.assert_allclose(cache[f"blocks.{layer}.resid_post"], hidden[layer + 1], atol=2e-4, rtol=2e-4,
                                   err_msg=f"{family} layer {layer}")
    np.testing.assert_allclose(cache["final_norm"], hidden[L], atol=2e-4, rtol=2e-4)
    for layer in range(L):
        want = out.attentions[layer][0].float().numpy()            # [heads, queries, keys]
        got = cache[f"blocks.{layer}.attn_pattern"].transpose(1, 0, 2)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{family} attention of layer {layer}")
    if ours.config.n_experts:
        for layer in range(L):
            logits = out.router_logits[layer].float().numpy().reshape(len(PROMPT), -1)
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            np.testing.assert_allclose(cache[f"blocks.{layer}.router"], probs, atol=1e-5)


def test_sliding_window_hides_old_positions(pair):
    """Sliding layers give keys older than the window exactly zero weight; every other layer (and
    every layer of a family without a window) gives every earlier key some weight."""
    family, _, ours, _ = pair
    cfg = ours.config
    _, cache = ours.run_with_cache(PROMPT, names="*.attn_pattern")
    for layer, sliding in enumerate(cfg.sliding_layers()):
        pattern = cache[f"blocks.{layer}.attn_pattern"]              # [queries, heads, keys]
        for q in range(len(PROMPT)):
            visible = pattern[q][:, : q + 1]
            hidden = q + 1 - cfg.sliding_window if sliding and q >= cfg.sliding_window else 0
            assert np.all(visible[:, :hidden] == 0.0), (family, layer, q)
            assert np.all(visible[:, hidden:] > 0), (family, layer, q)


def test_journey_adds_up_and_tells_the_family_apart(pair):
    family, _, ours, _ = pair
    j = ours.journey(PROMPT)
    lens = j.logit_lens()
    np.testing.assert_allclose(lens["logits"][-1], j.logits, atol=1e-4, rtol=1e-5)
    a = j.attribution()
    cfg = ours.config
    # The parts add up to the logit (before the final softcap, which is then applied to their sum).
    summed = a["capped_total"] if cfg.final_softcap else a["total"]
    logit = float(j.logits[a["token"]])
    assert abs(summed - logit) <= 1e-4 * max(1.0, abs(logit)), (summed, logit)
    text = "\n".join(str(s) for s in j)
    if cfg.final_softcap:
        assert "softcapping" in text
    if cfg.attn_softcap:
        assert "softcapped" in text
    if cfg.post_norms:
        assert "sandwich norm" in text
    if cfg.parallel_residual:
        assert "parallel residual" in text
    if cfg.n_experts:
        assert "experts" in text and "router" in text
    if any(cfg.sliding_layers()):
        assert "sliding-window layer" in text


def _with_extra(src, dst, edit_config=None, extra_tensor=False):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if extra_tensor:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(dst / "model.safetensors"))
        tensors["model.layers.0.self_attn.mystery_scale.weight"] = np.ones(4, np.float32)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_unknown_tensor_is_refused_by_name(pair, tmp_path):
    family, d, _, _ = pair
    bad = _with_extra(d, tmp_path / "bad", extra_tensor=True)
    with pytest.raises(tokentrail.CheckpointError, match=r"mystery_scale"):
        tokentrail.load(bad)


def test_unknown_config_field_is_refused_by_name(pair, tmp_path):
    family, d, _, _ = pair
    bad = _with_extra(d, tmp_path / "bad", edit_config=lambda c: c.update(attention_temperature_scale=0.5))
    with pytest.raises(tokentrail.CheckpointError, match=r"attention_temperature_scale"):
        tokentrail.load(bad)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(rope_parameters={"rope_type": "su", "rope_theta": 10000.0}), "rope_parameters"),
    (lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                         "warp": 3}), "rope_parameters"),
    (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_parameters"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
    (lambda c: c.update(hidden_size=1e400), "hidden_size"),
    (lambda c: c.update(architectures=5), "architectures"),
    (lambda c: c.update(num_hidden_layers=10**9), "num_hidden_layers"),
])
def test_bad_math_fields_are_refused(tmp_path, edit, field):
    require("torch")
    require("transformers")
    build("llama", tmp_path / "ok")
    bad = _with_extra(tmp_path / "ok", tmp_path / "bad", edit_config=edit)
    with pytest.raises(tokentrail.CheckpointError, match=field):
        tokentrail.load(bad)


def test_qwen3_read_as_qwen2_refuses_its_qk_norms(tmp_path):
    """The q/k norms are what makes Qwen3 Qwen3: a reader that ignored them would compute wrong logits."""
    require("torch")
    require("transformers")
    build("qwen3", tmp_path / "q3")
    bad = _with_extra(tmp_path / "q3", tmp_path / "as_qwen2",
                      edit_config=lambda c: c.update(architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(tokentrail.CheckpointError, match=r"[qk]_norm"):
        tokentrail.load(bad)


@pytest.mark.parametrize("family, expected", [
    ("gemma2", ["family: gemma2", "post_norms=True", "attn_softcap=3.0", "final_softcap=2.5", "sliding_window=5"]),
    ("qwen3", ["family: qwen3", "qk_norm='head'"]),
    ("mixtral", ["family: mixtral", "n_experts=5", "n_experts_used=2"]),
    ("neox", ["family: gptneox", "parallel_residual=True", "rotary_dim=8", "norm='layer'"]),
])
def test_info_names_the_family_and_what_sets_it_apart(tmp_path, family, expected):
    import subprocess
    import sys

    require("torch")
    require("transformers")
    build(family, tmp_path)
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "info", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for text in expected:
        assert text in out.stdout, (text, out.stdout)


def test_readme_lists_every_supported_architecture():
    from conftest import REPO
    from tokentrail.loading.families import FAMILIES

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Supported checkpoints"):]
    section = section[:section.index("\n## ")]
    for f in FAMILIES:
        for arch in f.hf_architectures:
            assert f"`{arch}`" in section, arch
        assert f"`{f.gguf_arch}`" in section, f.gguf_arch
