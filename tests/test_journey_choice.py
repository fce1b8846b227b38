"""The journey chooses the way generate chooses: same seed and options, same token, through the same chain."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from tokentrail.journey import follow_generation
from tokentrail.sampling import softmax

PROMPT = "The storm is"
# Long enough that the prefill takes the GEMM path (GEMM_MIN_ROWS) rather than the GEMV.
LONG = "The storm is near the lake. The cat sat on the mat and the dog ran to the farm. " * 3
OPTION_SETS = [
    {},
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 0.9, "min_p": 0.2, "order": "llama.cpp"},
    {"temperature": 1.1, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3},
    {"temperature": 0.0},
    {"temperature": 2.0, "typical_p": 0.7},
    {"temperature": 1.0, "xtc_probability": 0.5, "xtc_threshold": 0.05},
]


@pytest.fixture(scope="module")
def model():
    return tokentrail.load()


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("prompt", [PROMPT, LONG], ids=["short", "long"])
def test_same_seed_same_token_as_generate(model, options, prompt):
    assert len(model.encode(LONG)) >= tokentrail._core.GEMM_MIN_ROWS
    chosen, generated = [], []
    for seed in range(40):
        j = model.journey(prompt, seed=seed, **options)
        chosen.append(j.chosen)
        generated.append(model.generate(prompt, max_new_tokens=1, seed=seed, **options).token_ids[0])
    assert chosen == generated
    # Without a temperature both take the model's default (generation_config.json: greedy for the demo).
    greedy = options.get("temperature", 0.0 if model.generation_defaults.greedy else 1.0) == 0
    if greedy:
        assert set(chosen) == {int(np.argmax(model.forward(prompt, all_positions=False)))}
    elif not options.get("top_k"):
        assert len(set(chosen)) > 1  # the seeds really drew different tokens


def test_several_tokens_follow_generate(model):
    for seed in (0, 7, 19):
        journeys = follow_generation(model, PROMPT, 10, seed=seed, temperature=0.9, top_k=20)
        want = model.generate(PROMPT, max_new_tokens=10, seed=seed, temperature=0.9, top_k=20).token_ids
        assert [j.chosen for j in journeys] == want
        # Journey k follows the token before the k-th new one and saw the tokens chosen so far.
        n = len(model.encode(PROMPT))
        for k, j in enumerate(journeys):
            assert j.position == n - 1 + k and j.ids[n:] == want[:k]
        # Each step's logits are generate's (prefill, then one token at a time).
        session = model.session()
        logits = session.feed(model.encode(PROMPT))
        for j, token in zip(journeys, want):
            np.testing.assert_array_equal(j.logits, logits)
            logits = session.feed([token])


def test_each_processor_is_shown_with_what_it_removed(model):
    j = model.journey(PROMPT, seed=3, temperature=0.5, top_k=6, top_p=0.7)
    stages = [s for s in j if s.kind == "sampler"]
    assert [s.data["name"] for s in stages] == ["temperature", "top_k", "top_p"]
    logits = j.logits.astype(np.float64)
    # Independent of the chain: temperature removes nothing, top-k keeps the 6 highest logits,
    # top-p then keeps the smallest prefix (by probability at T=0.5) whose mass reaches 0.7.
    assert stages[0].data["removed"] == 0
    top6 = np.argsort(-logits, kind="stable")[:6]
    assert set(stages[1].data["removed_ids"]) == set(range(logits.size)) - set(top6.tolist())
    p = softmax(logits[top6] / 0.5)
    keep = int(np.searchsorted(np.cumsum(p), 0.7) + 1)
    assert stages[2].data["kept"] == keep
    assert set(stages[2].data["removed_ids"]) == set(top6[keep:].tolist())
    # Before/after distributions of each stage chain together, and the last one is the drawn-from one.
    for a, b in zip(stages, stages[1:]):
        assert [c["after"] for c in a.data["candidates"]] == pytest.approx(
            [dict((d["id"], d["before"]) for d in b.data["candidates"]).get(c["id"], c["after"])
             for c in a.data["candidates"]])
    last = {c["id"]: c["after"] for c in stages[-1].data["candidates"]}
    for token, prob in last.items():
        assert prob == pytest.approx(float(j.draw.probs[token]), abs=1e-15)
    assert j.draw.probs[j.chosen] > 0 and j.chosen in top6[:keep]
    assert "removes" in stages[1].text and str(stages[1].data["removed"]) in stages[1].text


def test_greedy_and_empty_chain_are_told(model):
    greedy = model.journey(PROMPT, temperature=0)
    assert greedy.chosen == int(np.argmax(greedy.logits)) and not greedy.sampled
    assert "greedy" in greedy.stages[-1].text
    plain = model.journey(PROMPT, temperature=1.0, seed=2)
    assert [s.data["name"] for s in plain if s.kind == "sampler"] == [None]
    assert "no processors" in [s for s in plain if s.kind == "sampler"][0].text


def test_reprs(model):
    j = model.journey(PROMPT, temperature=0)
    assert repr(j).startswith("Journey(' is' at position 3 of 4 tokens -> ")
    assert repr(j.stages[0]).startswith("Stage('tokenize'")


def test_byte_tokens_show_as_escapes(model):
    j = model.journey("日本 is", temperature=0)
    assert "\ufffd" not in "".join(j.tokens)
    assert j.tokens[1:4] == ["<0xE6>", "<0x97>", "<0xA5>"]  # 日 is E6 97 A5 in UTF-8
    assert "".join(model.tokenizer.token_bytes(i).decode("latin-1") for i in j.ids[1:4]).encode("latin-1") \
        .decode("utf-8") == "日"
