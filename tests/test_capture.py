"""Capture points and interventions: against transformers, identities, and numpy references."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from conftest import greedy, require
from reference_models import build

IDS = [1, 17, 200, 5, 99, 42, 42, 7]


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def pair(request, tmp_path_factory):
    torch = require("torch")
    tf = require("transformers")
    d = tmp_path_factory.mktemp(request.param)
    build(request.param, d)
    ref = tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(torch.tensor([IDS]), output_attentions=True, output_hidden_states=True)
    return tokentrail.load(d), out


def test_attention_and_hidden_states_match_transformers(pair):
    model, out = pair
    logits, cache = model.run_with_cache(IDS)
    L = model.config.n_layers
    for layer in range(L):
        np.testing.assert_allclose(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer][0].numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer][0].numpy(),
                                   atol=1e-6)
    # transformers' last hidden state is taken after the final norm.
    np.testing.assert_allclose(cache["ln_final.hook_normalized"], out.hidden_states[L][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["logits"], out.logits[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, out.logits[0].numpy(), atol=1e-4)


def test_identities(pair):
    model, _ = pair
    _, cache = model.run_with_cache(IDS)
    L, n = model.config.n_layers, len(IDS)
    for layer in range(L):
        p = cache[f"blocks.{layer}.attn_pattern"]  # [q, heads, k]
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
        above = np.triu(np.ones((n, n), bool), 1)
        assert np.all(p.transpose(1, 0, 2)[:, above] == 0.0)
        assert np.all(np.isneginf(cache[f"blocks.{layer}.attn_scores"].transpose(1, 0, 2)[:, above]))
    total = cache["embed"].astype(np.float64)
    if "pos_embed" in cache:
        total = total + cache["pos_embed"]
    for layer in range(L):
        total = total + cache[f"blocks.{layer}.attn_out"] + cache[f"blocks.{layer}.mlp_out"]
    np.testing.assert_allclose(cache[f"blocks.{L - 1}.resid_post"], total, atol=1e-5)


def test_positions_limit_what_is_kept(pair):
    model, _ = pair
    _, full = model.run_with_cache(IDS, names="blocks.*.attn_pattern")
    _, last = model.run_with_cache(IDS, names="blocks.*.attn_pattern", positions=[len(IDS) - 1])
    assert set(full) == {f"blocks.{l}.attn_pattern" for l in range(model.config.n_layers)}
    assert last.nbytes * len(IDS) == full.nbytes
    np.testing.assert_array_equal(last["blocks.0.attn_pattern"][0], full["blocks.0.attn_pattern"][-1])
    assert list(last.positions("blocks.0.attn_pattern")) == [len(IDS) - 1]


def test_capture_changes_nothing(pair):
    model, _ = pair

    plain, lp = greedy(model, IDS[:4], 10)
    hooks = model.hooks().capture("*")
    traced, lt = greedy(model, IDS[:4], 10, hooks=hooks)
    assert plain == traced
    np.testing.assert_array_equal(lp, lt)
    # Records accumulate over the prompt and every generated token, attention padded to the longest context.
    pat = hooks.cache["blocks.0.attn_pattern"]
    assert pat.shape == (14, model.config.n_heads, 14)
    np.testing.assert_allclose(pat.sum(-1), 1.0, atol=1e-6)


def _numpy_attn_out(model, cache, layer, head_scale):
    """Attention output of `layer` recomputed in numpy from captured z and the o weights."""
    z = cache[f"blocks.{layer}.attn_z"].reshape(len(IDS), model.config.n_heads, -1) * head_scale[None, :, None]
    w = model.weights[f"blocks.{layer}.attn.o.weight"].to_float32()
    b = model.weights.get(f"blocks.{layer}.attn.o.bias")
    out = z.reshape(len(IDS), -1) @ w.T
    return out + (b.to_float32() if b is not None else 0)


def test_head_ablation_matches_numpy_reference(pair):
    model, _ = pair
    layer, head = model.config.n_layers - 1, 1
    _, clean = model.run_with_cache(IDS)
    hooks = model.hooks().ablate_head(layer, head)
    logits, ablated = model.run_with_cache(IDS, hooks=hooks)
    scale = np.ones(model.config.n_heads)
    scale[head] = 0.0
    # The captured z is after the intervention; recompute from the clean z.
    want = _numpy_attn_out(model, clean, layer, scale)
    np.testing.assert_allclose(ablated[f"blocks.{layer}.attn_out"], want, atol=1e-5)
    assert np.all(ablated[f"blocks.{layer}.attn_z"].reshape(len(IDS), model.config.n_heads, -1)[:, head] == 0)
    # Earlier layers are untouched, the output changes.
    np.testing.assert_array_equal(ablated[f"blocks.{layer}.resid_pre"], clean[f"blocks.{layer}.resid_pre"])
    assert not np.allclose(logits, clean["logits"])


def test_patching_with_own_value_changes_nothing(pair):
    model, _ = pair
    logits, cache = model.run_with_cache(IDS)
    for name in ("blocks.0.resid_mid", "blocks.1.mlp_post", "blocks.0.v"):
        hooks = model.hooks().replace(name, {p: cache[name][p] for p in range(len(IDS))})
        np.testing.assert_array_equal(model.forward(IDS, hooks=hooks), logits)


def test_patching_and_steering_change_the_right_positions(pair):
    model, _ = pair
    logits, cache = model.run_with_cache(IDS)
    d = model.config.hidden_size
    hooks = model.hooks().replace("blocks.1.resid_pre", {5: np.zeros(d)})
    patched = model.forward(IDS, hooks=hooks)
    np.testing.assert_array_equal(patched[:5], logits[:5])  # causal: earlier positions cannot see it
    assert not np.allclose(patched[5], logits[5])
    steer = np.random.default_rng(0).standard_normal(d)
    hooks = model.hooks().add("blocks.0.resid_post", steer).capture("blocks.1.resid_pre")
    model.forward(IDS, hooks=hooks)
    np.testing.assert_allclose(hooks.cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"] + steer, atol=1e-5)


def test_bad_names_and_shapes_raise(pair):
    model, _ = pair
    with pytest.raises(KeyError, match="unknown capture point"):
        model.hooks().capture("blocks.0.nonsense")
    with pytest.raises(KeyError, match="layer 99"):
        model.hooks().capture("blocks.99.resid_pre")
    with pytest.raises(ValueError, match="expected"):
        model.hooks().add("blocks.0.resid_pre", np.zeros(3))
    with pytest.raises(KeyError, match="was not captured"):
        model.run_with_cache(IDS, names="embed")[1]["logits"]


def test_interventions_and_capture_during_generation(pair):
    model, _ = pair
    hooks = model.hooks().ablate_head(0, 0).capture("blocks.0.attn_z")
    g = model.generate(IDS[:4], max_new_tokens=6, temperature=0, hooks=hooks, ignore_eos=True)
    want, _ = greedy(model, IDS[:4], 6, hooks=model.hooks().ablate_head(0, 0))
    assert g.token_ids == want
    z = hooks.cache["blocks.0.attn_z"].reshape(-1, model.config.n_heads, model.config.head_dim)
    assert z.shape[0] == 4 + 5  # the prompt, then each generated token but the last (never fed)
    assert np.all(z[:, 0] == 0) and np.any(z[:, 1] != 0)
