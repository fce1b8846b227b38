"""Several samples of one prompt (num_return_sequences > 1): each returned sequence is exactly the
single run with its own seed (the first the given seed, the others spawned from it by numpy's
SeedSequence), while the prompt is prefilled once and every sequence starts from a copy of its
KV cache, the sequences advancing together. Checked on the real stories260K model and on a random
Llama built by transformers."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from conftest import require_stories
from tokentrail.errors import InvalidArgumentError


def spawned_seeds(seed: int, n: int) -> list[int]:
    """The seed of each returned sequence, from numpy itself: the given seed, then the first
    32-bit word of each of SeedSequence(seed).spawn(n - 1)."""
    return [seed] + [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n - 1)]


def assert_each_is_its_single_run(model, prompt, n: int, seed: int, distinct: bool = True, **options):
    """generate(prompt, num_return_sequences=n, seed=seed) against n separate single runs, each with
    the seed numpy derives for it: same seeds, tokens, text, end, and per-step log-probabilities."""
    options = {"do_sample": True, "logprobs": True, "top_n": 3, **options}
    many = model.generate(prompt, num_return_sequences=n, seed=seed, **options)
    assert isinstance(many, list) and len(many) == n
    seeds = spawned_seeds(seed, n)
    assert [g.seed for g in many] == seeds
    for i, (got, own_seed) in enumerate(zip(many, seeds)):
        alone = model.generate(prompt, seed=own_seed, **options)
        assert got.token_ids == alone.token_ids, f"sequence {i}"
        assert got.text == alone.text and got.finish_reason == alone.finish_reason, f"sequence {i}"
        assert got.prompt_ids == alone.prompt_ids
        assert [s.text for s in got.steps] == [s.text for s in alone.steps]
        for gs, ws in zip(got.steps, alone.steps):
            assert gs.rank == ws.rank
            assert gs.logprob == pytest.approx(ws.logprob, abs=1e-5)
            assert gs.sampled_logprob == pytest.approx(ws.sampled_logprob, abs=1e-5)
            assert [a.token for a in gs.top_model] == [a.token for a in ws.top_model]
    if distinct:  # independent samples, not one sample copied n times
        assert len({tuple(g.token_ids) for g in many}) == n
    return many


def rows_run_by(model, call) -> int:
    """Tokens the model runs through its forward pass during call()."""
    before = model.tokens_run
    call()
    return model.tokens_run - before


# ------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def stories():
    return tokentrail.load(require_stories() / "stories260K.bin")


def test_stories_samples_equal_single_runs(stories):
    many = assert_each_is_its_single_run(stories, "One day", 5, seed=42,
                                         max_new_tokens=30, temperature=1.0, stop=".")
    # Sequences left the batch at different steps, some on the stop string.
    assert len({len(g.token_ids) for g in many}) > 1
    assert "stop" in {g.finish_reason for g in many}


def test_stories_samples_with_penalties_and_the_python_chain(stories):
    # A repetition penalty reads each sequence's own history; typical_p runs in the Python processors.
    assert_each_is_its_single_run(stories, "Lily went to the park", 4, seed=7, max_new_tokens=20,
                                  temperature=0.9, repetition_penalty=1.3, typical_p=0.9)


def test_stories_prompt_prefilled_once(stories):
    prompt = "Once upon a time, there was a little girl named Lily"
    length, n, new = len(stories.encode(prompt)), 6, 9
    rows = rows_run_by(stories, lambda: stories.generate(prompt, do_sample=True, num_return_sequences=n, seed=3,
                                                         max_new_tokens=new, ignore_eos=True))
    # The prompt once, then every sequence's tokens but the last (which is chosen, never fed).
    assert rows == length + n * (new - 1)
    alone = rows_run_by(stories, lambda: stories.generate(prompt, do_sample=True, seed=3, max_new_tokens=new,
                                                          ignore_eos=True))
    assert alone == length + new - 1


def test_stories_full_context_ends_every_sample(stories):
    prompt = "Once upon a time"
    length = len(stories.encode(prompt))
    small = tokentrail.load(require_stories() / "stories260K.bin", context=length + 4)
    many = assert_each_is_its_single_run(small, prompt, 3, seed=9, distinct=False, max_new_tokens=20,
                                         ignore_eos=True)
    assert [g.finish_reason for g in many] == ["context"] * 3
    assert [len(g.token_ids) for g in many] == [5] * 3


# ------------------------------------------------------------------ a random model

@pytest.fixture(scope="module")
def llama(llama_dir):
    return tokentrail.load(llama_dir)


@pytest.fixture(scope="module")
def llama_f16(llama_dir):
    return tokentrail.load(llama_dir, kv_dtype="f16")


PROMPT_IDS = [1, 17, 92, 5, 230, 44, 61, 8, 120, 33]


def test_random_model_samples_equal_single_runs(llama):
    many = assert_each_is_its_single_run(llama, PROMPT_IDS, 4, seed=123, max_new_tokens=16, temperature=1.5,
                                         top_k=40, eos_token_id=[7, 11, 200])
    assert len({len(g.token_ids) for g in many}) > 1


def test_random_model_samples_with_a_half_precision_cache(llama_f16):
    assert_each_is_its_single_run(llama_f16, PROMPT_IDS, 3, seed=5, max_new_tokens=12, temperature=1.2)


def test_random_model_prompt_list(llama):
    """A list of prompts, each with several samples: the list gives what each prompt gives alone, and
    each prompt is prefilled once (a prompt given twice, once in all)."""
    other = [1, 9, 9, 140, 71]
    prompts, n, new = [PROMPT_IDS, other, PROMPT_IDS], 3, 6
    options = dict(do_sample=True, temperature=1.3, max_new_tokens=new, ignore_eos=True)
    got = []
    rows = rows_run_by(llama, lambda: got.extend(llama.generate(prompts, num_return_sequences=n, seed=77,
                                                                **options)))
    assert rows == len(PROMPT_IDS) + len(other) + len(prompts) * n * (new - 1)
    for prompt, samples in zip(prompts, got):
        alone = llama.generate(prompt, num_return_sequences=n, seed=77, **options)
        assert [g.token_ids for g in samples] == [g.token_ids for g in alone]
        assert [g.seed for g in samples] == spawned_seeds(77, n)
    assert [g.token_ids for g in got[0]] == [g.token_ids for g in got[2]]
    # per_prompt seeds and counts apply to each prompt's own samples.
    per = [{"seed": 1, "num_return_sequences": 2}, {"seed": 2}, {"seed": 3, "num_return_sequences": 4}]
    mixed = llama.generate(prompts, per_prompt=per, **options)
    for prompt, own, samples in zip(prompts, per, mixed):
        want = llama.generate(prompt, **own, **options)
        assert ([g.token_ids for g in samples] if isinstance(samples, list) else samples.token_ids) == \
            ([g.token_ids for g in want] if isinstance(want, list) else want.token_ids)


def test_random_model_prompt_prefilled_once(llama):
    n, new = 5, 7
    rows = rows_run_by(llama, lambda: llama.generate(PROMPT_IDS, do_sample=True, num_return_sequences=n, seed=1,
                                                     max_new_tokens=new, ignore_eos=True))
    assert rows == len(PROMPT_IDS) + n * (new - 1)


def test_tokens_run_counts_every_forward(llama):
    """The counter itself: every token fed, alone or in a batched step, once."""
    a, b = llama.session(), llama.session()
    assert rows_run_by(llama, lambda: a.feed(PROMPT_IDS)) == len(PROMPT_IDS)
    assert rows_run_by(llama, lambda: llama.forward_batch([a, b], [[5], [6, 7, 8]])) == 4
    assert rows_run_by(llama, lambda: a.fork()) == 0
    assert rows_run_by(llama, lambda: llama.forward([3, 4])) == 2


def test_shared_hooks_still_record_each_sequence(llama):
    """With hooks, the samples run one after another as separate calls would, each recording its prompt."""
    shared = llama.hooks().capture("blocks.0.resid_post", positions=[0])
    many = llama.generate(PROMPT_IDS, do_sample=True, num_return_sequences=2, seed=4, max_new_tokens=3,
                          hooks=shared)
    alone = llama.hooks().capture("blocks.0.resid_post", positions=[0])
    for g, s in zip(many, spawned_seeds(4, 2)):
        assert llama.generate(PROMPT_IDS, do_sample=True, seed=s, max_new_tokens=3, hooks=alone).token_ids == g.token_ids
    np.testing.assert_allclose(shared.cache["blocks.0.resid_post"], alone.cache["blocks.0.resid_post"], rtol=1e-6)


def test_streaming_several_sequences_is_refused(llama):
    with pytest.raises(InvalidArgumentError, match="num_return_sequences"):
        llama.generate(PROMPT_IDS, do_sample=True, num_return_sequences=2, stream=True)
