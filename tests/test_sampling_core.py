"""The core sampling path against the Python processors it must agree with.

For many random logit vectors and option combinations (ties, -inf, k beyond
the vocabulary, p = 1, min_p = 0, penalties in every order), a Sampler on the
C++ core and one on the Python processors, seeded alike, must keep the same
tokens with the same probabilities (to 1e-6) and draw the same tokens.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import require_stories
from tokentrail import _core
from tokentrail import sampling as S
from tokentrail.errors import InvalidArgumentError
from tokentrail.sampling.core import compile_chain


def logits_for(rng: np.random.Generator, vocab: int, kind: str) -> np.ndarray:
    x = rng.standard_normal(vocab) * rng.choice([0.5, 3.0, 12.0])
    if kind == "ties":  # few distinct values: ties at every boundary
        x = np.round(x)
    elif kind == "masked":  # most of the vocabulary banned by the model
        x[rng.random(vocab) < 0.7] = -np.inf
        x[rng.integers(vocab)] = 1.0
    elif kind == "peaked":
        x[rng.integers(vocab)] += 60.0
    elif kind == "flat":
        x = np.zeros(vocab)
    return x.astype(np.float32)


OPTION_CHOICES = dict(
    temperature=[1.0, 0.0, 0.8, 0.8, 0.3, 2.5, 1e-6],
    top_k=[0, 1, 5, 40, 40, 10**6],
    top_k_ties=["keep", "cut"],
    top_p=[1.0, 0.95, 0.5, 0.8, 1e-9],
    min_p=[0.0, 0.0, 0.05, 0.5, 1.0],
    repetition_penalty=[1.0, 1.3, 0.7],
    repetition_window=[None, 0, 3, 500],
    repetition_negative=["multiply", "divide"],
    presence_penalty=[0.0, 0.5, -0.4],
    frequency_penalty=[0.0, 0.3],
    penalty_window=[None, 0, 4, 64],
    min_keep=[1, 1, 3],
    order=["hf", "llama.cpp"],
)


def random_options(rng: np.random.Generator) -> dict:
    return {name: values[int(rng.integers(len(values)))] for name, values in OPTION_CHOICES.items()}


def assert_same_step(core: S.Draw, ref: S.Draw) -> None:
    ref_ids = np.flatnonzero(ref.logits > -np.inf)
    np.testing.assert_array_equal(core.kept_ids, ref_ids)
    np.testing.assert_allclose(core.kept_logits, ref.logits[ref_ids], rtol=1e-12, atol=0)
    np.testing.assert_allclose(core.kept_probs, ref.probs[ref_ids], rtol=0, atol=1e-6)
    assert core.token == ref.token


@pytest.mark.parametrize("case", range(300))
def test_core_matches_python_processors(case):
    rng = np.random.default_rng(case)
    vocab = int(rng.choice([1, 2, 7, 64, 1000, 30000]))
    kind = ["plain", "ties", "masked", "peaked", "flat"][case % 5]
    options = random_options(rng)
    core = S.Sampler(seed=case, core=True, **options)
    ref = S.Sampler(seed=case, core=False, **options)
    assert core.core_chain is not None and ref.core_chain is None
    history = rng.integers(-3, vocab + 3, int(rng.integers(0, 80))).tolist()  # ids outside are ignored
    for _ in range(4):
        x = logits_for(rng, vocab, kind)
        a, b = core.step(x, history), ref.step(x, history)
        assert_same_step(a, b)
        history.append(b.token)


def test_draw_rule_matches_reference_over_many_uniforms():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        probs = rng.random(n) * (rng.random(n) < 0.7)
        probs[int(rng.integers(n))] += 0.1
        probs /= probs.sum()
        ids = np.sort(rng.choice(1000, n, replace=False)).astype(np.int64)
        for u in (0.0, float(rng.random()), 1.0 - 2**-53):
            full = np.zeros(1000)
            full[ids] = probs

            class Fixed:  # a generator that returns u, for the reference draw
                def random(self):
                    return u

            assert _core.draw_token(ids, probs, u) == S.draw(full, Fixed())


def test_full_vocabulary_arrays_match():
    x = logits_for(np.random.default_rng(3), 5000, "plain")
    a = S.Sampler(seed=1, core=True, temperature=0.7, top_k=50, top_p=0.9).step(x, [1, 2, 3])
    b = S.Sampler(seed=1, core=False, temperature=0.7, top_k=50, top_p=0.9).step(x, [1, 2, 3])
    np.testing.assert_array_equal(a.logits == -np.inf, b.logits == -np.inf)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6, rtol=0)
    assert a.logits.shape == b.logits.shape == (5000,)


def test_stories_logits_same_tokens_on_both_paths():
    import tokentrail

    model = tokentrail.load(require_stories() / "stories260K.bin", progress=False)
    options = dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, min_p=0.02)
    core, ref = S.Sampler(seed=7, core=True, **options), S.Sampler(seed=7, core=False, **options)
    session = model.session()
    history = [1]
    logits = session.feed(history)
    assert logits.dtype == np.float32
    for _ in range(40):
        a, b = core.step(logits, history), ref.step(logits, history)
        assert_same_step(a, b)
        history.append(a.token)
        logits = session.feed([a.token])


@pytest.mark.parametrize("bad, message", [(np.nan, "NaN"), (np.inf, r"\+inf")])
def test_bad_logits_refused_alike(bad, message):
    x = logits_for(np.random.default_rng(0), 100, "plain")
    x[17] = bad
    for core in (True, False):
        with pytest.raises(InvalidArgumentError, match=message):
            S.Sampler(seed=0, core=core, top_k=5).step(x)


def test_all_masked_refused_alike():
    x = np.full(50, -np.inf, dtype=np.float32)
    for core in (True, False):
        with pytest.raises(InvalidArgumentError, match="every token is masked"):
            S.Sampler(seed=0, core=core, top_k=5).step(x)


def test_chains_the_core_does_not_run_stay_in_python():
    for options in (dict(typical_p=0.9), dict(mirostat=2), dict(dynatemp_range=0.5), dict(xtc_probability=0.5),
                    dict(dry_multiplier=0.8), dict(logit_bias={3: 1.0}), dict(temperature=1e-40)):
        sampler = S.Sampler(seed=0, **options)
        assert sampler.core_chain is None, options
        with pytest.raises(InvalidArgumentError, match="core=True"):
            S.Sampler(seed=0, core=True, **options)
    custom = S.Sampler([lambda x, h: x], seed=0)
    assert custom.core_chain is None
    # Two stages of one kind (possible with explicit processors) also stay in Python.
    assert compile_chain(S.Chain([S.TopK(5), S.TopK(3)])) is None


def test_float64_and_observed_steps_take_the_reference_path():
    x = logits_for(np.random.default_rng(1), 300, "plain")
    seen = []
    a = S.Sampler(seed=2, top_k=10, temperature=0.5).step(x.astype(np.float64), [])
    b = S.Sampler(seed=2, top_k=10, temperature=0.5).step(x, [], observe=lambda p, v: seen.append(p.name))
    c = S.Sampler(seed=2, top_k=10, temperature=0.5).step(x, [])
    assert seen == ["temperature", "top_k"]
    assert a.token == b.token == c.token


def test_core_bindings_validate_their_arguments():
    with pytest.raises(ValueError, match="kind"):
        _core.SamplerChain([(9, 0.0, 0.0, 0, 1, -1, False)])
    for stage, message in [((2, 0.0, 0.0, 0, 1, -1, False), "temperature"),
                           ((2, float("nan"), 0.0, 0, 1, -1, False), "finite"),
                           ((0, 1e40, 0.0, 0, 1, -1, False), "repetition_penalty"),
                           ((1, 0.0, 1e31, 0, 1, -1, False), "frequency"),
                           ((3, 0.0, 0.0, -1, 1, -1, False), "top_k"),
                           ((3, 0.0, 0.0, 5, 0, -1, False), "min_keep"),
                           ((4, 0.0, 0.0, 0, 1, -1, False), "top_p"),
                           ((4, 1.5, 0.0, 0, 1, -1, False), "top_p"),
                           ((5, -0.1, 0.0, 0, 1, -1, False), "min_p"),
                           ((0, 1.2, 0.0, 0, 1, -2, False), "window")]:
        with pytest.raises(ValueError, match=message):
            _core.SamplerChain([stage])
    with pytest.raises(ValueError, match="at most one temperature"):
        _core.SamplerChain([(2, 0.5, 0.0, 0, 1, -1, False)] * 2)
    with pytest.raises(TypeError):
        _core.SamplerChain([(2, 0.5)])
    chain = _core.SamplerChain([(3, 0.0, 0.0, 3, 1, -1, False)])
    with pytest.raises(TypeError, match="float32"):
        chain.keep(np.zeros(10), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        chain.keep(np.zeros((2, 5), dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        chain.keep(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        chain.keep(np.zeros(20, dtype=np.float32)[::2], np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="history"):
        chain.keep(np.zeros(10, dtype=np.float32), np.zeros((2, 2), dtype=np.int64))
    ids, probs = np.array([1, 4], dtype=np.int64), np.array([0.5, 0.5])
    for u in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="uniform"):
            _core.draw_token(ids, probs, u)
    with pytest.raises(ValueError, match="same"):
        _core.draw_token(ids, probs[:1], 0.5)
    with pytest.raises(ValueError, match="positive"):
        _core.draw_token(ids, np.zeros(2), 0.5)
    with pytest.raises(ValueError, match="finite"):
        _core.draw_token(ids, np.array([np.nan, 1.0]), 0.5)


def test_window_longer_than_history_counts_all_of_it():
    # A window of 10 over 3 tokens of history penalises all 3 (the whole history).
    x = np.zeros(8)
    out = S.RepetitionPenalty(2.0, window=10)(x + 1.0, [1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(out != 1.0), [1, 2, 3])
    out = S.PresenceFrequencyPenalty(presence=1.0, window=10)(x, [5, 6, 7])
    np.testing.assert_array_equal(np.flatnonzero(out != 0.0), [5, 6, 7])


@pytest.mark.parametrize("order", list(itertools.permutations(
    ["repetition_penalty", "presence_frequency", "temperature", "top_k", "top_p", "min_p"]))[::37])
def test_any_order_of_the_hot_stages(order):
    rng = np.random.default_rng(len(order) + hash(order) % 1000)
    options = dict(temperature=0.6, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.4,
                   presence_penalty=0.3, frequency_penalty=0.2, order=list(order))
    core, ref = S.Sampler(seed=5, core=True, **options), S.Sampler(seed=5, core=False, **options)
    history = rng.integers(0, 500, 30).tolist()
    for _ in range(5):
        x = logits_for(rng, 500, "plain")
        assert_same_step(core.step(x, history), ref.step(x, history))


@pytest.mark.parametrize("kind", ["plain", "ties", "masked", "flat"])
@pytest.mark.parametrize("options", [
    dict(min_p=0.05), dict(min_p=0.3, min_keep=5, temperature=0.7, repetition_penalty=1.5),
    dict(top_p=0.9), dict(top_p=0.999, temperature=1.7, presence_penalty=0.5, frequency_penalty=0.1),
    dict(temperature=0.9), dict(min_p=0.01, order="llama.cpp", temperature=0.5, repetition_penalty=0.8),
])
def test_first_truncation_without_top_k_on_a_large_vocabulary(options, kind):
    # Without top-k the first truncation is top-p or min-p over the whole vocabulary (or none at all).
    rng = np.random.default_rng(11)
    core, ref = S.Sampler(seed=3, core=True, **options), S.Sampler(seed=3, core=False, **options)
    history = rng.integers(0, 40000, 100).tolist()
    for _ in range(3):
        x = logits_for(rng, 40000, kind)
        a, b = core.step(x, history), ref.step(x, history)
        assert_same_step(a, b)
        history.append(a.token)
