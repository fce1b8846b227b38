"""The journey: stages in order, the logit lens, direct logit attribution, geometry."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from tokentrail import thermo
from conftest import require
from reference_models import build

IDS = [1, 17, 200, 5, 99, 42, 42, 7]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    require("torch")
    require("transformers")
    d = tmp_path_factory.mktemp(request.param)
    build(request.param, d)
    return tokentrail.load(d)


def test_stages_follow_the_journey(model):
    j = model.journey(IDS)
    kinds = [s.kind for s in j]
    L = model.config.n_layers
    assert kinds[:3] == ["tokenize", "embed", "position"]
    assert kinds[-1] == "choice"
    kinds = kinds[:-1]
    assert kinds[-4:] == ["final_norm", "logits", "softmax", "sampler"]
    assert kinds.count("attention") == L and kinds.count("mlp") == L
    assert [s.layer for s in j if s.kind == "attention"] == list(range(L))
    first = j.step()
    assert first is j.stages[0] and j.step() is j.stages[1]
    # The plain-language line names the head's strongest earlier token with its real probability.
    attn = next(s for s in j if s.kind == "attention")
    for h in attn.data["heads"]:
        row = attn.data["pattern"][h["head"]]
        assert h["prob"] == pytest.approx(row.max()) and np.isclose(row.sum(), 1.0, atol=1e-6)
        assert f"attends {h['prob']:.2f}" in attn.data["lines"][h["head"]]


def test_journey_uses_the_real_logits(model):
    j = model.journey(IDS, temperature=0.7, seed=1)
    # The logits generate starts from: a prefill of the prompt, last position only.
    np.testing.assert_array_equal(j.logits, model.session().feed(IDS))
    np.testing.assert_allclose(j.logits, model.forward(IDS)[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j.stats.probs, thermo.probabilities(j.logits, 1.0), rtol=1e-12)


@pytest.mark.parametrize("n", [len(IDS), 2, 3])
def test_logit_lens_last_layer_is_the_logits(model, n):
    j = model.journey(IDS[:n])
    lens = j.logit_lens()
    assert len(lens["labels"]) == model.config.n_layers + 1
    np.testing.assert_array_equal(lens["logits"][-1], j.logits)


def test_attribution_sums_to_the_logit(model):
    j = model.journey(IDS)
    for token in (None, 3, 77):
        a = j.attribution(token)
        assert a["total"] == pytest.approx(a["logit"], abs=1e-5)
        n_heads = sum(1 for name, _ in a["parts"] if ".H" in name)
        assert n_heads == model.config.n_layers * model.config.n_heads


def test_geometry_dot_is_the_logit(model):
    j = model.journey(IDS)
    for g in j.geometry():
        assert g["dot"] == pytest.approx(g["logit"], abs=1e-5)
        assert -1.0 <= g["cosine"] <= 1.0
    best = j.nearest_tokens(j.unembed[123], k=1)
    assert best[0][0] == j.token(123) and best[0][1] == pytest.approx(1.0)


def test_followed_position_and_sampling(model):
    j = model.journey(IDS, position=3, temperature=1.0, seed=5)
    np.testing.assert_array_equal(j.logits, model.session().feed(IDS[:4]))
    assert j.chosen == model.generate(IDS[:4], max_new_tokens=1, temperature=1.0, seed=5).token_ids[0]
    again = model.journey(IDS, position=3, temperature=1.0, seed=5)
    assert j.chosen == again.chosen and j.sampled
    with pytest.raises(IndexError):
        model.journey(IDS, position=len(IDS))
    with pytest.raises(ValueError, match="temperature"):
        model.journey(IDS, temperature=-1)
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ValueError, match="top"):
            model.journey(IDS, top=bad)
    with pytest.raises(ValueError, match="unknown sampling option"):
        model.journey(IDS, temprature=0.5)


def test_long_prompts_keep_only_the_followed_attention_row(model, monkeypatch):
    import tokentrail.journey as journey_module

    monkeypatch.setattr(journey_module, "FULL_ATTENTION_LIMIT", 4)
    j = model.journey(IDS)
    full = model.journey(IDS[:4])
    assert not j.full_attention and full.full_attention
    L, H, n = model.config.n_layers, model.config.n_heads, len(IDS)
    assert j.cache["blocks.0.attn_pattern"].shape == (1, H, n)
    _, reference = model.run_with_cache(IDS, names="blocks.*.attn_pattern")
    attn = [s for s in j if s.kind == "attention"]
    for layer in range(L):
        np.testing.assert_array_equal(attn[layer].data["pattern"], reference[f"blocks.{layer}.attn_pattern"][-1])
    queries, tables = j.attention_tables(0)
    assert queries == [n - 1] and tables.shape == (H, 1, n)
    assert full.attention_tables(0)[0] == [0, 1, 2, 3]
