"""Many sequences in one step: Model.forward_batch and the list forms of generate, score and
run_with_cache give what each sequence gives alone (itself checked against transformers in
test_parity), with every family feature, per-sequence positions, hooks and logits."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from conftest import family_pair, require
from reference_models import build, reference_logits, reference_logits_in_pieces
from tokentrail import _core
from tokentrail.errors import ContextFullError, OptionError

# Features that each need the batch to keep per-sequence state: windows and softcaps (gemma2),
# local/global rotary tables and q/k norms (gemma3), LongRoPE's table chosen by each sequence's
# own reach (phi3_longrope), partial rotary and parallel residual (neox), experts fed by the rows
# of several sequences (mixtral), learned positions and biases (gpt2), whole-projection q/k norms (olmo2).
FAMILIES = ("gemma2", "gemma3", "phi3_longrope", "neox", "mixtral", "gpt2", "olmo2")
RNG = np.random.default_rng(7)
# Each sequence: (tokens already cached, tokens fed in the batched step). Ragged on purpose:
# a long prompt, a chunk after a prefix, decode tokens at different positions, a first token.
PLAN = [([], list(RNG.integers(3, 250, 12))),
        (list(RNG.integers(3, 250, 7)), list(RNG.integers(3, 250, 5))),
        (list(RNG.integers(3, 250, 3)), [int(RNG.integers(3, 250))]),
        ([], [int(RNG.integers(3, 250))]),
        (list(RNG.integers(3, 250, 10)), [int(RNG.integers(3, 250))])]


def close(got, want, what=""):
    """Logits equal within 1e-5 relative to their scale."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), what


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    return family_pair(request.param, tmp_path_factory)


def prefilled(model, prefixes, kv_dtype=None):
    sessions = [model.session(kv_dtype=kv_dtype) for _ in prefixes]
    for s, prefix in zip(sessions, prefixes):
        if prefix:
            s.feed(prefix)
    return sessions


def test_ragged_step_equals_each_sequence_alone(pair):
    family, model, ref = pair
    prefixes, feeds = [p for p, _ in PLAN], [f for _, f in PLAN]
    batch = prefilled(model, prefixes)
    got = model.forward_batch(batch, feeds, logits="all")
    for i, (prefix, feed) in enumerate(PLAN):
        alone = prefilled(model, [prefix])[0]
        close(got[i], alone.feed(feed, all_logits=True), f"{family} sequence {i}")
        assert batch[i].pos == len(prefix) + len(feed) and batch[i].tokens == [int(t) for t in prefix + feed]
    # And against transformers itself, fed the same pieces (LongRoPE's table depends on them).
    for i, (prefix, feed) in enumerate(PLAN):
        want = reference_logits_in_pieces(ref, [p for p in (prefix, feed) if p])[len(prefix):]
        np.testing.assert_allclose(got[i], want, atol=1e-4, rtol=1e-4, err_msg=f"{family} sequence {i}")


def test_greedy_decoding_together_equals_alone(pair):
    family, model, _ = pair
    prompts = [feed if not prefix else prefix + feed for prefix, feed in PLAN]
    sessions = [model.session() for _ in prompts]
    logits = model.forward_batch(sessions, prompts)
    together = [[] for _ in prompts]
    for _ in range(6):
        nxt = [int(np.argmax(row)) for row in logits]
        for out, t in zip(together, nxt):
            out.append(t)
        last = logits
        logits = model.forward_batch(sessions, [[t] for t in nxt])
    for i, prompt in enumerate(prompts):
        s = model.session()
        row = s.feed(prompt)
        alone = []
        for _ in range(6):
            alone.append(int(np.argmax(row)))
            before, row = row, s.feed([alone[-1]])
        assert together[i] == alone, f"{family} sequence {i}"
        close(last[i], before, f"{family} sequence {i}")
        close(logits[i], row, f"{family} sequence {i}")


def test_wide_step_through_the_gemm_equals_alone(pair):
    """More rows than GEMM_MIN_ROWS in the step, while each sequence alone stays on the GEMV path."""
    family, model, ref = pair
    rng = np.random.default_rng(3)
    feeds = [list(rng.integers(3, 250, n)) for n in (11, 9, 13, 1, 10, 8)]
    assert sum(map(len, feeds)) >= _core.GEMM_MIN_ROWS > max(map(len, feeds))
    got = model.forward_batch([model.session() for _ in feeds], feeds, logits="all")
    for i, feed in enumerate(feeds):
        close(got[i], model.session().feed(feed, all_logits=True), f"{family} sequence {i}")
        np.testing.assert_allclose(got[i], reference_logits(ref, feed), atol=1e-4, rtol=1e-4)


def test_logits_modes_per_sequence(pair):
    _, model, _ = pair
    prefixes, feeds = [p for p, _ in PLAN], [f for _, f in PLAN]
    modes = ["all", "last", "none", "last", "none"]
    batch = prefilled(model, prefixes)
    got = model.forward_batch(batch, feeds, logits=modes)
    for i, mode in enumerate(modes):
        want = prefilled(model, [prefixes[i]])[0].feed(feeds[i], all_logits=True)
        if mode == "none":
            assert got[i] is None
        else:
            close(got[i], want if mode == "all" else want[-1])
    # A sequence that asked for no logits still advanced: its next token sees the whole history.
    after = model.forward_batch([batch[2]], [[5]])[0]
    alone = prefilled(model, [prefixes[2] + feeds[2]])[0]
    close(after, alone.feed([5]))


def test_mixed_cache_types_in_one_step(pair):
    _, model, _ = pair
    f32 = prefilled(model, [PLAN[1][0]])[0]
    f16 = prefilled(model, [PLAN[2][0]], kv_dtype="f16")[0]
    got = model.forward_batch([f32, f16], [PLAN[1][1], PLAN[2][1]])
    close(got[0], prefilled(model, [PLAN[1][0]])[0].feed(PLAN[1][1]))
    close(got[1], prefilled(model, [PLAN[2][0]], kv_dtype="f16")[0].feed(PLAN[2][1]))


def test_longrope_table_is_chosen_per_sequence(tmp_path):
    """phi3_longrope switches to its long factors when a call reaches past 8 positions: in one step,
    a sequence that reaches past them and one that does not each rotate as they would alone."""
    require("torch")
    require("transformers")
    ref = build("phi3_longrope", tmp_path)
    model = tokentrail.load(tmp_path)
    short, long = [5, 9, 11, 40], list(range(20, 32))
    got = model.forward_batch([model.session(), model.session()], [short, long], logits="all")
    np.testing.assert_allclose(got[0], reference_logits(ref, short), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], reference_logits(ref, long), atol=1e-4, rtol=1e-4)
    # The short prompt's logits under the long table would differ: the test can tell them apart.
    assert not np.allclose(got[0], reference_logits(ref, short + long)[:4], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ hooks per sequence

@pytest.fixture(scope="module")
def demo():
    return tokentrail.load()


def test_captures_stay_with_their_sequence(demo):
    m = demo
    prompts = [m.encode("The storm is"), m.encode("Once upon a time there"), m.encode("A dog")]
    own = [m.hooks().capture("*"), None, m.hooks().capture(["blocks.1.attn_pattern", "logits"], positions=[1])]
    sessions = [m.session() for _ in prompts]
    m.forward_batch(sessions, prompts, hooks=own)
    m.forward_batch(sessions, [[5], [6], [7]], hooks=own)  # decode steps record too
    for prompt, hooks, nxt in zip(prompts, own, (5, 6, 7)):
        if hooks is None:
            continue
        alone = m.hooks().capture("*") if hooks is own[0] else \
            m.hooks().capture(["blocks.1.attn_pattern", "logits"], positions=[1])
        s = m.session()
        s.feed(prompt, hooks=alone)
        s.feed([nxt], hooks=alone)
        assert sorted(hooks.cache) == sorted(alone.cache)
        for name in alone.cache:
            np.testing.assert_allclose(hooks.cache[name], alone.cache[name], rtol=1e-5, atol=1e-6, err_msg=name)
            assert list(hooks.cache.positions(name)) == list(alone.cache.positions(name))


def test_interventions_change_only_their_sequence(demo):
    m = demo
    a, b = m.encode("The storm is"), m.encode("The storm was")
    steer = np.full(m.config.hidden_size, 0.5, np.float32)
    hooks = m.hooks().add("blocks.1.resid_pre", steer).ablate_head(0, 1)
    got = m.forward_batch([m.session(), m.session()], [a, b], hooks=[hooks, None])
    close(got[0], m.session().feed(a, hooks=m.hooks().add("blocks.1.resid_pre", steer).ablate_head(0, 1)))
    close(got[1], m.session().feed(b))
    assert not np.allclose(got[0], m.session().feed(a), atol=1e-3)


# ------------------------------------------------------------------ generate, score, run_with_cache

PROMPTS = ["The storm is", "Once upon a time", "A dog ran to the", "Lila"]


def test_generate_list_equals_each_prompt_alone(demo):
    m = demo
    per = [{"seed": 1, "temperature": 0.8, "top_k": 20}, {"seed": 2, "temperature": 1.2, "max_new_tokens": 5},
           {"do_sample": False, "stop": "."}, {"seed": 4, "temperature": 0.7, "top_p": 0.9, "logprobs": True,
                                               "top_n": 3}]
    many = m.generate(PROMPTS, max_new_tokens=25, per_prompt=per)
    assert isinstance(many, list) and len(many) == len(PROMPTS)
    for prompt, options, got in zip(PROMPTS, per, many):
        want = m.generate(prompt, **{"max_new_tokens": 25, **options})
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason
        if "seed" in options:
            assert got.seed == want.seed == options["seed"]
        assert [s.text for s in got.steps] == [s.text for s in want.steps]
        for gs, ws in zip(got.steps, want.steps):
            assert gs.rank == ws.rank and [a.token for a in gs.top_model] == [a.token for a in ws.top_model]
            if ws.logprob is not None:
                assert gs.logprob == pytest.approx(ws.logprob, abs=1e-5)
    # Sequences left the batch at different steps.
    assert len({len(g.token_ids) for g in many}) > 1
    assert {g.finish_reason for g in many} >= {"length", "stop"}


def test_generate_list_with_shared_options_and_ids(demo):
    m = demo
    prompts = [m.encode(p) for p in PROMPTS]
    many = m.generate(prompts, max_new_tokens=12, temperature=0.9, seed=11)
    for p, got in zip(prompts, many):
        assert got.token_ids == m.generate(p, max_new_tokens=12, temperature=0.9, seed=11).token_ids
    greedy = m.generate(PROMPTS, max_new_tokens=12)
    assert [g.token_ids for g in greedy] == [m.generate(p, max_new_tokens=12).token_ids for p in PROMPTS]


def test_generate_list_with_samples_beams_and_hooks(demo):
    m = demo
    per = [{"num_return_sequences": 3, "temperature": 1.0, "seed": 5}, {"num_beams": 3},
           {"hooks": m.hooks().capture("blocks.0.attn_pattern")}, {"max_new_tokens": 0}]
    many = m.generate(PROMPTS, max_new_tokens=8, per_prompt=per)
    samples = m.generate(PROMPTS[0], max_new_tokens=8, num_return_sequences=3, temperature=1.0, seed=5)
    assert [g.token_ids for g in many[0]] == [g.token_ids for g in samples]
    assert many[1].token_ids == m.generate(PROMPTS[1], max_new_tokens=8, num_beams=3).token_ids
    alone = m.hooks().capture("blocks.0.attn_pattern")
    assert many[2].token_ids == m.generate(PROMPTS[2], max_new_tokens=8, hooks=alone).token_ids
    np.testing.assert_allclose(per[2]["hooks"].cache["blocks.0.attn_pattern"], alone.cache["blocks.0.attn_pattern"],
                               rtol=1e-5, atol=1e-6)
    assert many[3].token_ids == [] and many[3].finish_reason == "length"


def test_shared_hooks_keep_the_order_of_separate_calls(demo):
    m = demo
    shared = m.hooks().capture("blocks.0.resid_post", positions=[0])
    m.generate(PROMPTS[:2], max_new_tokens=3, hooks=shared)
    alone = m.hooks().capture("blocks.0.resid_post", positions=[0])
    for p in PROMPTS[:2]:
        m.generate(p, max_new_tokens=3, hooks=alone)
    np.testing.assert_allclose(shared.cache["blocks.0.resid_post"], alone.cache["blocks.0.resid_post"], rtol=1e-5)


def test_score_list_equals_each_text_alone(demo):
    m = demo
    from tokentrail.generation import SCORE_CHUNK

    long = " ".join(["The storm is coming near the lake and the dog ran to the farm."] * 12)
    assert 2 * SCORE_CHUNK > len(m.encode(long)) > SCORE_CHUNK  # scored in chunks, beside the short ones
    texts = [PROMPTS[0], long, PROMPTS[1] + " there was a cat.", [1, 40, 50]]
    many = m.score(texts, top_n=2)
    for text, got in zip(texts, many):
        want = m.score(text, top_n=2)
        assert got.token_ids == want.token_ids
        # Ranks deep in the tail may swap with a near-tie (the batch's wider products round differently).
        ranks = np.array([t.rank for t in got.tokens[1:]]) - np.array([t.rank for t in want.tokens[1:]])
        assert np.abs(ranks).max() <= 1
        np.testing.assert_allclose([t.logprob for t in got.tokens[1:]], [t.logprob for t in want.tokens[1:]],
                                   rtol=1e-5, atol=1e-5)
        assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)
        assert [[a.token for a in t.top] for t in got.tokens] == [[a.token for a in t.top] for t in want.tokens]


def test_run_with_cache_list_is_ragged(demo):
    m = demo
    logits, caches = m.run_with_cache(PROMPTS, names=["blocks.1.attn_pattern", "blocks.0.mlp_out"],
                                      positions=[0, -1])
    for prompt, lg, cache in zip(PROMPTS, logits, caches):
        want_logits, want = m.run_with_cache(prompt, names=["blocks.1.attn_pattern", "blocks.0.mlp_out"],
                                             positions=[0, -1])
        n = len(m.encode(prompt))
        assert lg.shape == (n, m.config.vocab_size)  # no padding
        close(lg, want_logits)
        assert cache["blocks.1.attn_pattern"].shape == (2, m.config.n_heads, n)
        assert list(cache.positions("blocks.0.mlp_out")) == [0, n - 1]
        for name in want:
            np.testing.assert_allclose(cache[name], want[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ errors

def test_bad_batches_are_refused_before_anything_changes(demo):
    m = demo
    a, b = m.session(), m.session()
    a.feed([1, 2, 3])
    other = tokentrail.load()
    cases = [
        (([a, a], [[1], [2]]), {}, ValueError, "sequence 1: is the same session as sequence 0"),
        (([a, b], [[1]]), {}, ValueError, "2 sessions but 1 token lists"),
        (([a, b], [[1], [10**6]]), {}, ValueError, "sequence 1: token id 1000000 is outside the vocabulary"),
        (([a, b], [[1], []]), {}, ValueError, "sequence 1: feed needs a non-empty"),
        (([a, b], [[1], [1.5]]), {}, ValueError, "sequence 1: token ids must be integers"),
        (([a, other.session()], [[1], [2]]), {}, ValueError, "sequence 1: the session belongs to another model"),
        (([a, "x"], [[1], [2]]), {}, OptionError, "sequence 1: expected a Session"),
        (([a, b], [[1], [2]]), {"logits": ["last", "first"]}, ValueError, "logits must be one of"),
        (([a, b], [[1], [2]]), {"logits": ["last"]}, ValueError, "logits has 1 entries for 2 sessions"),
        (([a, b], [[1], [2]]), {"hooks": [other.hooks(), None]}, OptionError, "another model"),
        (([], []), {}, ValueError, "at least one session"),
    ]
    shared = m.hooks().capture("embed")
    cases.append((([a, b], [[1], [2]]), {"hooks": [shared, shared]}, ValueError, "shares its hooks with sequence 0"))
    small = m.session(limit=4)
    cases.append((([b, small], [[1], [1, 2, 3, 4, 5]]), {}, ContextFullError, "sequence 1: context is full"))
    for args, kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            m.forward_batch(*args, **kwargs)
    assert (a.pos, b.pos, small.pos) == (3, 0, 0) and a.tokens == [1, 2, 3] and b.tokens == []
    assert "embed" not in shared.cache


def test_the_core_checks_its_own_arguments(demo):
    """Below the Python checks, the core refuses what would read out of bounds or mix up caches."""
    m = demo
    other = tokentrail.load()
    a = m.session()
    core = m._core
    ids = np.array([1, 2], np.int32)
    with pytest.raises(ValueError, match="made for another model"):
        core.forward_batch([other.session()._cache], [ids], ["last"], [None])
    with pytest.raises(ValueError, match="sequence 1: uses the same KV cache as sequence 0"):
        core.forward_batch([a._cache, a._cache], [ids, ids], ["last", "last"], [None, None])
    with pytest.raises(IndexError, match="sequence 1: token id 999"):
        core.forward_batch([a._cache, m.session()._cache], [ids, np.array([999], np.int32)], ["last"] * 2,
                           [None, None])
    with pytest.raises(ValueError, match="context is full"):
        core.forward_batch([m.session(limit=1)._cache], [ids], ["last"], [None])
    with pytest.raises(ValueError, match="logits mode must be"):
        core.forward_batch([a._cache], [ids], ["every"], [None])
    with pytest.raises(ValueError, match="one token array, logits mode and hooks entry"):
        core.forward_batch([a._cache], [ids, ids], ["last"], [None])
    with pytest.raises(TypeError, match="sequence 0: expected a KVCache"):
        core.forward_batch(["cache"], [ids], ["last"], [None])
    with pytest.raises(ValueError, match="made for another model"):
        core.forward(other.session()._cache, ids)
    assert a.pos == 0


def test_bad_batched_calls_of_the_api(demo):
    m = demo
    with pytest.raises(ValueError, match="per_prompt: has 1 dicts of options for 2 prompts"):
        m.generate(PROMPTS[:2], per_prompt=[{}])
    with pytest.raises(OptionError, match="did you mean 'temperature'"):
        m.generate(PROMPTS[:2], per_prompt=[{}, {"temp": 0.5}])
    with pytest.raises(OptionError, match="per_prompt: gives each prompt"):
        m.generate(PROMPTS[0], per_prompt=[{}])
    with pytest.raises(ValueError, match="stream: a list of prompts"):
        m.generate(PROMPTS[:2], stream=True)
    with pytest.raises(ValueError, match="prompt 1: top_p: acts only when sampling"):
        m.generate(PROMPTS[:2], per_prompt=[{}, {"top_p": 0.5}])
    with pytest.raises(ContextFullError, match="prompt 1: context is full"):
        tokentrail.load(context=4).generate([[1, 2], list(range(1, 10))], max_new_tokens=1)
    with pytest.raises(OptionError, match="give a list of as many Hooks"):
        m.run_with_cache(PROMPTS[:2], hooks=m.hooks())
    with pytest.raises(OptionError, match="its own Hooks"):
        h = m.hooks()
        m.run_with_cache(PROMPTS[:2], hooks=[h, h])
    with pytest.raises(IndexError, match="positions apply to every prompt"):
        m.run_with_cache(["The storm is", "Lila"], positions=[3])
    with pytest.raises(ValueError, match="needs at least 2 tokens"):
        m.score(["The storm is", [1]])



def test_long_sequences_side_by_side_or_split_equal_alone(tmp_path):
    # Heads wide enough that one sequence's attention at 400 positions is worth splitting over the
    # threads (ATTENTION_PARALLEL_WORK). Several such sequences in one step each run on one thread,
    # side by side; a prompt chunk that dominates the step, or one of two sequences, splits alone.
    # Either way every sequence gets exactly the logits it gets alone; transformers checks one.
    require("torch")
    require("transformers")
    import torch
    import transformers as tf

    torch.manual_seed(3)
    heads, head_dim = 4, 64
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=2, head_dim=head_dim, vocab_size=260, max_position_embeddings=512,
                         rope_theta=10000.0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path, safe_serialization=True)
    ref = tf.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    model = tokentrail.load(tmp_path, threads=2)
    assert heads * 400 * head_dim > _core.ATTENTION_PARALLEL_WORK  # one decode row at 400 positions
    rng = np.random.default_rng(11)
    prefixes = [[int(t) for t in rng.integers(3, 250, n)] for n in (400, 420, 380, 450, 300, 410)]
    one = [[int(rng.integers(3, 250))] for _ in prefixes]
    steps = {"six decoding side by side": (prefixes, one),
             "a prompt chunk split alone beside five decoding": (prefixes, one[:5] + [[int(t) for t in rng.integers(3, 250, 40)]]),
             "two decoding, each split": (prefixes[:2], one[:2])}
    for what, (starts, feeds) in steps.items():
        got = model.forward_batch(prefilled(model, starts), feeds, logits="last")
        for i, (prefix, feed) in enumerate(zip(starts, feeds)):
            assert np.array_equal(got[i], prefilled(model, [prefix])[0].feed(feed)), f"{what}: sequence {i}"
        want = reference_logits(ref, starts[-1] + feeds[-1])[-1]
        np.testing.assert_allclose(got[-1], want, atol=1e-4, rtol=1e-4, err_msg=what)
