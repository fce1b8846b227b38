"""The short cuts of generate's per-step work give exactly what the general path gives on the same inputs.

* Plain greedy runs (temperature 0 alone, no logprobs) take the logits' first argmax without the
  sampler; the general path is forced by adding a processor that changes nothing, which sends the
  chain through the sampler's Python processors.
* Runs whose steps are read only at the end, with no stop strings, make their texts then; the
  texts made step by step are a streamed run's (a Stream reads every step as it is made).
* Session._checked_ids checks lists of Python ints without numpy; arrays take the numpy checks.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import tokentrail
from conftest import greedy
from test_generation import TOK, bigram_model, ids_of, scripted
from tokentrail.errors import ContextFullError, InvalidArgumentError
from tokentrail.generation import generate, start_run
from tokentrail.sampling import Sampler, Temperature

PROMPTS = ["The storm is", "Once upon a time", "A dog ran to the", "Lila", "Tom had a big"]


def unchanged(logits, history):
    """A processor that changes nothing: its only effect is that the chain runs in Python."""
    return logits


@pytest.fixture(scope="module")
def demo():
    return tokentrail.load()


def same_generation(got, want, what=""):
    """Every field a caller sees, compared exactly (timings aside)."""
    assert got.prompt_ids == want.prompt_ids, what
    assert got.token_ids == want.token_ids, what
    assert got.text == want.text, what
    assert (got.finish_reason, got.seed, got.stop_string) == (want.finish_reason, want.seed, want.stop_string), what
    assert len(got.steps) == len(want.steps), what
    for gs, ws in zip(got.steps, want.steps):
        assert (gs.index, gs.token, gs.text, gs.finish_reason) == (ws.index, ws.token, ws.text, ws.finish_reason), what
        assert (gs.logprob, gs.rank, gs.sampled_logprob) == (ws.logprob, ws.rank, ws.sampled_logprob), what
        assert [(a.token, a.logprob) for a in gs.top_model] == [(a.token, a.logprob) for a in ws.top_model], what
        assert [(a.token, a.logprob) for a in gs.top_sampled] == [(a.token, a.logprob) for a in ws.top_sampled], what


def test_which_runs_take_the_argmax(demo):
    assert start_run(demo, "A", 4, do_sample=False).argmax_only
    assert start_run(demo, "A", 4, temperature=0.0).argmax_only
    for options in ({"do_sample": False, "logprobs": True}, {"do_sample": False, "top_n": 2},
                    {"do_sample": False, "processors": [unchanged]}, {"do_sample": False, "repetition_penalty": 1.3},
                    {"do_sample": False, "logit_bias": {5: 2.0}}, {"do_sample": False, "banned_tokens": [5]},
                    {"temperature": 0.7}, {"temperature": 0.7, "dynatemp_range": 0.5}):
        assert not start_run(demo, "A", 4, **options).argmax_only, options


def test_plain_greedy_batch_equals_the_sampler_path(demo):
    fast = demo.generate(PROMPTS, max_new_tokens=24, do_sample=False, seed=5)
    general = demo.generate(PROMPTS, max_new_tokens=24, do_sample=False, seed=5, processors=[unchanged])
    for prompt, got, want in zip(PROMPTS, fast, general):
        same_generation(got, want, prompt)
        # And the argmax continuation fed one token at a time, outside generate.
        assert got.token_ids == greedy(demo, got.prompt_ids, len(got.token_ids))[0]


def test_mixed_batch_equals_the_general_path(demo):
    """Plain greedy runs share steps with sampled ones, ones with logprobs and stop strings, and
    leave at different steps (length, stop, eos); only the greedy ones change path between the two."""
    per = [{"do_sample": False},
           {"temperature": 0.9, "seed": 3, "top_k": 30},
           {"do_sample": False, "max_new_tokens": 5},
           {"do_sample": False, "logprobs": True, "top_n": 3},
           {"do_sample": False, "stop": [" the", "."]},
           {"do_sample": False, "ignore_eos": True},
           {"temperature": 1.1, "seed": 8, "stop": "a"}]
    prompts = PROMPTS + PROMPTS[:2]
    general_per = [dict(o, processors=[unchanged]) if o.get("do_sample") is False else o for o in per]
    fast = demo.generate(prompts, max_new_tokens=30, seed=5, per_prompt=per)
    general = demo.generate(prompts, max_new_tokens=30, seed=5, per_prompt=general_per)
    for i, (got, want) in enumerate(zip(fast, general)):
        same_generation(got, want, f"prompt {i}: {per[i]}")
    assert len({len(g.token_ids) for g in fast}) > 2
    assert {g.finish_reason for g in fast} >= {"length", "stop"}
    # Each is also what the prompt gives alone, streamed (its texts made step by step).
    for prompt, options, got in zip(prompts, per, fast):
        streamed = list(demo.generate(prompt, **{"max_new_tokens": 30, "seed": 5, "stream": True, **options}))
        assert [s.token for s in streamed] == got.token_ids
        assert [s.text for s in streamed] == [s.text for s in got.steps]
        assert streamed[-1].finish_reason == got.finish_reason


def test_greedy_until_end_of_sequence_and_context(demo):
    """Runs that end on an end-of-sequence id or a full context, in one batch."""
    small = tokentrail.load(context=24)
    fast = small.generate(PROMPTS, max_new_tokens=40, do_sample=False, seed=5)
    general = small.generate(PROMPTS, max_new_tokens=40, do_sample=False, seed=5, processors=[unchanged])
    for got, want in zip(fast, general):
        same_generation(got, want)
    assert "context" in {g.finish_reason for g in fast}
    eos = fast[0].token_ids[3]  # a token the first prompt reaches: make it the end of sequence
    fast = demo.generate(PROMPTS, max_new_tokens=20, do_sample=False, eos_token_id=eos, seed=5)
    general = demo.generate(PROMPTS, max_new_tokens=20, do_sample=False, eos_token_id=eos, seed=5,
                            processors=[unchanged])
    for got, want in zip(fast, general):
        same_generation(got, want)
    assert fast[0].finish_reason == "eos" and fast[0].token_ids[-1] == eos


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_takes_the_first_of_ties_as_the_sampler_does(demo, dtype):
    rng = np.random.default_rng(0)
    vocab = demo.config.vocab_size
    cases = []
    for _ in range(20):
        x = rng.integers(-3, 4, vocab).astype(dtype)  # many ties at the top
        x[rng.integers(0, vocab, 40)] = -np.inf
        cases.append(x)
    only = np.full(vocab, -np.inf, dtype)
    only[vocab - 1] = -1e30
    cases.append(only)
    for x in cases:
        run = start_run(demo, "A", 4, do_sample=False)
        run.begin(demo.session(), time.perf_counter())
        token = run.advance(x).token
        assert token == int(np.flatnonzero(x == x.max())[0])
        for core in (None, False):
            assert token == Sampler([Temperature(0.0)], seed=1, core=core).sample(x)


@pytest.mark.parametrize("bad, message", [("nan", "NaN"), ("inf", r"\+inf"), ("masked", "every token is masked")])
def test_bad_logits_get_the_sampler_error(demo, bad, message):
    x = np.random.default_rng(1).standard_normal(demo.config.vocab_size).astype(np.float32)
    if bad == "nan":
        x[[7, 9]] = np.nan
    elif bad == "inf":
        x[11] = np.inf
    else:
        x[:] = -np.inf
    run = start_run(demo, "A", 4, do_sample=False)
    run.begin(demo.session(), time.perf_counter())
    with pytest.raises(InvalidArgumentError, match=message):
        run.advance(x)
    with pytest.raises(InvalidArgumentError, match=message):
        Sampler([Temperature(0.0)], seed=1).step(x)
    assert run.made == []


# ------------------------------------------------------- texts made at the end of a run

def streamed_and_whole(model, prompt, **options):
    steps = list(generate(model, prompt, stream=True, **options))
    return steps, generate(model, prompt, **options)


@pytest.mark.parametrize("text, options", [
    ("h\u00e9llo w\u00f6rld \u2014 \u4f60\u597d!", {}),                       # ends on <eos>
    ("\u4f60\u597d\u4e16\u754c", {"max_new_tokens": 5}),                       # length, inside a character
    ("caf\u00e9 \U0001f600 ok", {"max_new_tokens": 9}),                        # length, inside an emoji
    ("ab\u00e9", {"eos_token_id": []}),                                        # runs past the script
])
def test_texts_made_at_the_end_equal_texts_made_step_by_step(text, options):
    """Characters spanning several tokens, cut by the end of the run or not: the texts made when
    the run is over are those a streamed run makes step by step, and they join into the text."""
    model, prompt = scripted(text)
    steps, whole = streamed_and_whole(model, prompt, **{"do_sample": False, "max_new_tokens": 40, **options})
    assert [s.token for s in steps] == whole.token_ids
    assert [s.text for s in steps] == [s.text for s in whole.steps]
    assert [s.finish_reason for s in steps] == [s.finish_reason for s in whole.steps]
    assert "".join(s.text for s in whole.steps) == whole.text
    generated = [t for t in whole.token_ids if t != 256]
    assert whole.text == TOK.decode(generated)  # the bytes decoded at once (U+FFFD for a cut character)


def test_texts_at_the_end_in_a_batch_of_fake_sessions():
    """A model without forward_batch (its sessions fed one by one), sampled and greedy, ending on
    length and on a full context: each result is the streamed run's."""
    model = bigram_model(tokenizer=TOK, max_seq_len=30)
    prompts = [ids_of("Hi"), ids_of("\u00e9t\u00e9"), ids_of("a long prompt, yes")]
    per = [{"temperature": 0.8, "seed": 1}, {"do_sample": False, "max_new_tokens": 3}, {"do_sample": False}]
    many = generate(model, prompts, max_new_tokens=25, eos_token_id=[], per_prompt=per)
    for prompt, options, got in zip(prompts, per, many):
        steps = list(generate(model, prompt, **{"max_new_tokens": 25, "eos_token_id": [], "stream": True, **options}))
        assert [s.token for s in steps] == got.token_ids
        assert [s.text for s in steps] == [s.text for s in got.steps]
        assert steps[-1].finish_reason == got.finish_reason
    assert [g.finish_reason for g in many] == ["length", "length", "context"]


# ------------------------------------------------------- the ids of a step, checked

def test_lists_and_arrays_of_ids_are_checked_alike(demo):
    vocab = demo.config.vocab_size
    for bad, message in [([5, -1, 7], "token id -1 is outside"), ([5, vocab, -2], f"token id {vocab} is outside"),
                         ([True], "token ids must be integers"), ([3, 4.0], "token ids must be integers")]:
        for ids in (bad, np.asarray(bad)):
            session = demo.session()
            with pytest.raises(InvalidArgumentError, match=message):
                session.feed(ids)
            with pytest.raises(InvalidArgumentError, match="sequence 1: " + message):
                demo.forward_batch([demo.session(), session], [[1], ids])
            assert session.pos == 0 and session.tokens == []
    with pytest.raises(ContextFullError, match="context is full"):
        demo.session(limit=2).feed([1, 2, 3])
    a, b = demo.session(), demo.session()
    got = demo.forward_batch([a, b], [[1, 2, 3], np.array([1, 2, 3], np.int64)])
    np.testing.assert_array_equal(got[0], got[1])
    assert a.tokens == b.tokens == [1, 2, 3] and all(type(t) is int for t in a.tokens + b.tokens)
