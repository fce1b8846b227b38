"""The prompt cache: a prompt that begins as an earlier sequence did reuses its KV cache, and
everything then equals a run that computed the whole prompt (stories260K, the real model)."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from tokentrail import PromptCache
from tokentrail.errors import InvalidArgumentError, OptionError
from tokentrail.generation import start_run
from tokentrail.prompt_cache import bytes_per_position
from conftest import require_stories

STORY = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def model(request):
    return tokentrail.load(require_stories() / "stories260K.bin", dtype=request.param)


def _fresh_logits(model, ids):
    return model.session().feed(ids)


def _cache_holding(model, ids):
    """A prompt cache (blocks of one id) holding a session fed `ids`, and that session."""
    cache = PromptCache(model, block_tokens=1)
    held = model.session()
    held.feed(ids)
    cache.put(held)
    return cache, held


def test_a_cached_beginning_gives_the_logits_of_the_whole_prompt_computed(model):
    first = model.encode(STORY)
    cache, held = _cache_holding(model, first)
    longer = first + model.encode(" with her dog")[1:]
    session, reused = cache.take(longer)
    assert reused == len(first) == session.pos
    assert len(cache) == 0  # used whole: handed over, not copied
    np.testing.assert_allclose(session.feed(longer[reused:]), _fresh_logits(model, longer), rtol=1e-5, atol=1e-5)


def test_the_last_prompt_token_is_always_fed_and_a_partial_match_is_copied(model):
    ids = model.encode(STORY)
    cache, held = _cache_holding(model, ids)
    # The same prompt again: all but its last position are reused, that one is fed for its logits.
    session, reused = cache.take(ids)
    assert reused == len(ids) - 1 and session.tokens == ids[:-1]
    assert len(cache) == 1 and held.pos == len(ids)  # a copy: the cached sequence is kept whole
    np.testing.assert_allclose(session.feed(ids[-1:]), _fresh_logits(model, ids), rtol=1e-5, atol=1e-5)
    # A prompt that leaves the cached one part way reuses only the shared beginning.
    other = ids[:5] + model.encode(" a big red ball")[1:]
    assert other[5] != ids[5]
    session, reused = cache.take(other)
    assert reused == 5
    np.testing.assert_allclose(session.feed(other[5:]), _fresh_logits(model, other), rtol=1e-5, atol=1e-5)
    # Nothing shared: a fresh session.
    session, reused = cache.take([ids[0] + 1, 7, 9])
    assert reused == 0 and session.pos == 0
    assert cache.stats.hits == 2 and cache.stats.misses == 1 and cache.stats.reused_tokens == len(ids) - 1 + 5


def test_a_conversation_through_generate_reuses_its_turns_and_gives_the_same_tokens(model):
    cache = PromptCache(model, block_tokens=1)
    turn1 = model.encode(STORY)
    g1 = model.generate(turn1, max_new_tokens=12, prompt_cache=cache)
    assert g1.timings.cached_tokens == 0
    turn2 = turn1 + g1.token_ids + model.encode(". Then she")[1:]
    g2 = model.generate(turn2, max_new_tokens=12, prompt_cache=cache)
    # The last generated token was never fed: the cached sequence ends just before it.
    assert g2.timings.cached_tokens == len(turn1) + len(g1.token_ids) - 1
    assert "cached" in g2.timings.summary()
    alone = model.generate(turn2, max_new_tokens=12)
    assert g2.token_ids == alone.token_ids
    np.testing.assert_allclose([s.logprob for s in model.generate(turn2, max_new_tokens=6, logprobs=True,
                                                                      prompt_cache=cache).steps],
                               [s.logprob for s in model.generate(turn2, max_new_tokens=6, logprobs=True).steps],
                               rtol=1e-5, atol=1e-6)
    # Streaming and seeded sampling too: the same draws as without the cache.
    opts = dict(temperature=0.9, top_k=40, seed=5, max_new_tokens=10)
    streamed = [s.token for s in model.generate(turn2, stream=True, prompt_cache=cache, **opts)]
    assert streamed == model.generate(turn2, **opts).token_ids


def test_a_list_of_prompts_and_the_models_own_cache(model):
    ids = model.encode(STORY)
    prompts = [ids, ids[:8] + [ids[8] % 500 + 3], ids]
    before = model.prompt_cache.stats.reused_tokens
    out = model.generate(prompts, max_new_tokens=6, prompt_cache=True)
    assert [g.token_ids for g in out] == [model.generate(p, max_new_tokens=6).token_ids for p in prompts]
    again = model.generate(ids, max_new_tokens=6, prompt_cache=True)
    assert again.timings.cached_tokens == len(ids) - 1 and again.token_ids == out[0].token_ids
    assert model.prompt_cache.stats.reused_tokens > before
    assert model.prompt_cache is model.prompt_cache  # one per model


def test_put_keeps_one_entry_per_line_of_conversation(model):
    cache = PromptCache(model, block_tokens=1)
    ids = model.encode(STORY)

    def fed(n):
        s = model.session()
        s.feed(ids[:n])
        return s

    cache.put(fed(6))
    cache.put(fed(10))   # the 6 are its beginning: replaced
    assert len(cache) == 1
    cache.put(fed(4))    # already the beginning of the 10: not kept
    assert len(cache) == 1
    session, reused = cache.take(ids)
    assert reused == 10


def test_the_memory_budget_drops_the_least_recently_used(model):
    per = bytes_per_position(model)
    assert per == 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4
    # Each session below grows to 64 positions (the cache's first allocation): room for two.
    cache = PromptCache(model, max_mb=2.5 * 64 * per / 2**20, block_tokens=1)
    a, b, c = ([t] + model.encode(STORY)[1:6] for t in (1, 7, 9))
    for ids in (a, b, c):
        s = model.session()
        s.feed(ids)
        cache.put(s)
    assert len(cache) == 2 and cache.stats.bytes <= cache.max_bytes
    assert cache.take(a)[1] == 0 and cache.take(b)[1] == len(b) - 1 and cache.take(c)[1] == len(c) - 1
    small = PromptCache(model, max_mb=per / 2**20, block_tokens=1)  # less than one allocation: nothing fits
    s = model.session()
    s.feed(a)
    small.put(s)
    assert len(small) == 0
    cache.clear()
    assert len(cache) == 0 and cache.stats.bytes == 0


def test_beginnings_are_found_in_whole_blocks_then_followed_exactly(model):
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 500, 60).tolist()
    cache = PromptCache(model)  # blocks of 16 ids
    assert cache.block_tokens == 16
    s = model.session()
    s.feed(ids)
    cache.put(s)
    # 40 shared ids: found through the two whole blocks, then followed to the 40th.
    session, reused = cache.take(ids[:40] + [2, 3, 4])
    assert reused == 40
    np.testing.assert_allclose(session.feed([2, 3, 4]), _fresh_logits(model, ids[:40] + [2, 3, 4]),
                               rtol=1e-5, atol=1e-5)
    assert cache.take(ids[:10] + [2, 3])[1] == 0  # less than a block: not looked for
    short = model.session()
    short.feed(ids[:10])
    cache.put(short)  # shorter than a block: not kept
    assert len(cache) == 1
    # Other session limits and KV types hold other numbers: never mixed.
    assert cache.take(ids, kv_dtype="f16")[1] == 0
    session, reused = cache.take(ids, limit=100)
    assert reused == 0 and session.limit == 100
    assert cache.take(ids)[1] == len(ids) - 1


def test_a_lookup_among_many_cached_sequences_finds_the_longest(model):
    rng = np.random.default_rng(1)
    system = [1] + rng.integers(3, 500, 47).tolist()  # a shared beginning of three blocks
    cache = PromptCache(model)
    convs = [system + rng.integers(3, 500, 20 + i).tolist() for i in range(40)]
    for ids in convs:
        s = model.session()
        s.feed(ids)
        cache.put(s)
    assert len(cache) == 40
    for i in (0, 17, 39):
        session, reused = cache.take(convs[i] + [5])
        assert reused == len(convs[i]) and session.tokens == convs[i]
    session, reused = cache.take(system + [7, 7, 7])
    assert reused == len(system)


def test_session_fork_of_a_beginning(model):
    ids = model.encode(STORY)
    s = model.session()
    s.feed(ids)
    part = s.fork(5)
    assert part.pos == 5 and part.tokens == ids[:5] and s.pos == len(ids)
    np.testing.assert_allclose(part.feed(ids[5:]), _fresh_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert s.fork(0).pos == 0
    with pytest.raises(InvalidArgumentError, match="positions"):
        s.fork(len(ids) + 1)
    with pytest.raises(InvalidArgumentError, match="positions"):
        s.fork(-1)
    with pytest.raises(ValueError, match="positions must be within"):
        s._cache.clone(len(ids) + 1)


def test_bad_uses_are_refused_clearly(model):
    ids = model.encode(STORY)
    with pytest.raises(InvalidArgumentError, match="max_mb"):
        PromptCache(model, max_mb=-1)
    with pytest.raises(InvalidArgumentError, match="block_tokens"):
        PromptCache(model, block_tokens=0)
    with pytest.raises(OptionError, match="prompt_cache: must be"):
        model.generate(ids, max_new_tokens=2, prompt_cache="yes")
    with pytest.raises(InvalidArgumentError, match="hooks"):
        model.generate(ids, max_new_tokens=2, prompt_cache=True, hooks=model.hooks())
    with pytest.raises(InvalidArgumentError, match="beam"):
        model.generate(ids, max_new_tokens=2, prompt_cache=True, num_beams=2)
    with pytest.raises(InvalidArgumentError, match="speculative"):
        model.generate(ids, max_new_tokens=2, prompt_cache=True, draft="prompt-lookup")
    with pytest.raises(OptionError, match="prompt_cache"):
        start_run(model, ids, 2, prompt_cache=True)
    other = tokentrail.load(require_stories() / "stories260K.bin")
    with pytest.raises(InvalidArgumentError, match="another model"):
        model.generate(ids, max_new_tokens=2, prompt_cache=PromptCache(other))
    with pytest.raises(InvalidArgumentError, match="another model"):
        PromptCache(model).put(other.session())
    # A session that does not hold the prompt's beginning cannot start its run.
    run = start_run(model, ids, 2)
    wrong = model.session()
    wrong.feed([ids[0], ids[1] + 1])
    with pytest.raises(InvalidArgumentError, match="not a beginning of this prompt"):
        run.begin(wrong, 0.0)


def test_a_batch_sharing_a_beginning_computes_it_once(model):
    # Few-shot style: five prompts behind one 40-id beginning, generated together. The first computes
    # the beginning; the others wait one step and copy it from the first's cache.
    rng = np.random.default_rng(2)
    shots = [1] + rng.integers(3, 500, 39).tolist()
    prompts = [shots + rng.integers(3, 500, 4 + i).tolist() for i in range(5)]
    cache = PromptCache(model)  # blocks of 16: the shared 40 are found as 32, then followed to 40
    out = model.generate(prompts, max_new_tokens=6, prompt_cache=cache, temperature=0.7, seed=4)
    plain = model.generate(prompts, max_new_tokens=6, temperature=0.7, seed=4)
    assert [g.token_ids for g in out] == [g.token_ids for g in plain]
    assert [g.timings.cached_tokens for g in out] == [0] + [len(shots)] * 4
    for g, p in zip(out, plain):
        np.testing.assert_allclose([s.logprob for s in model.generate(g.prompt_ids, max_new_tokens=3,
                                                                         logprobs=True).steps],
                                   [s.logprob for s in model.generate(p.prompt_ids, max_new_tokens=3,
                                                                         logprobs=True, prompt_cache=cache).steps],
                                   rtol=1e-5, atol=1e-6)


def test_a_kept_session_lets_go_of_its_forward_scratch(model):
    # The session that leads a batched step holds the step's activations as scratch; kept in a prompt
    # cache it holds its keys and values only, and works as before when it is taken again.
    ids = model.encode(STORY)
    sessions = [model.session() for _ in range(3)]
    model.forward_batch(sessions, [ids, ids[:5], ids[:7]])
    leader = sessions[0]
    assert leader._cache.scratch_bytes >= len(ids) * model.config.hidden_size * 4
    cache = PromptCache(model, block_tokens=1)
    cache.put(leader)
    assert leader._cache.scratch_bytes == 0
    session, reused = cache.take(ids + [5])
    assert session is leader and reused == len(ids)
    np.testing.assert_allclose(session.feed([5]), _fresh_logits(model, ids + [5]), rtol=1e-5, atol=1e-5)
