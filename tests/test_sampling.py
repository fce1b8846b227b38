"""Logits processors and the sampler, against transformers' processors and
against llama.cpp's documented rules re-derived here in numpy."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from conftest import require
from tokentrail import sampling as S

VOCAB = 97


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 2.5, masked: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(vocab) * scale).astype(np.float32)
    if masked:
        x[rng.choice(vocab, masked, replace=False)] = -np.inf
    return x


def random_history(seed: int, length: int = 40, vocab: int = VOCAB) -> list[int]:
    rng = np.random.default_rng(seed + 1000)
    return rng.integers(0, vocab, length).tolist()


CASES = [(seed, masked) for seed in range(6) for masked in (0, 9)]


def hf(proc, logits: np.ndarray, history=()) -> np.ndarray:
    torch = require("torch")
    ids = torch.tensor([list(history) or [0]], dtype=torch.long)
    scores = torch.tensor(np.asarray(logits, dtype=np.float32)[None, :].copy())
    return proc(ids, scores)[0].numpy()


def assert_same(mine: np.ndarray, ref: np.ndarray) -> None:
    """Same masked set exactly; kept logits equal to float32 rounding."""
    mine = np.asarray(mine)
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_array_equal(np.isneginf(mine), np.isneginf(ref))
    keep = ~np.isneginf(ref)
    np.testing.assert_allclose(mine[keep], ref[keep], rtol=1e-6, atol=1e-6)


def kept(x: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(x)).tolist())


# ------------------------------------------------------ against transformers

@pytest.fixture(scope="module")
def lp():
    require("torch")
    require("transformers")
    import transformers.generation.logits_process as lp

    return lp


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("t", [0.3, 0.7, 1.6])
def test_temperature_matches_transformers(lp, seed, masked, t):
    x = random_logits(seed, masked=masked)
    assert_same(S.Temperature(t)(x), hf(lp.TemperatureLogitsWarper(t), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("k,min_keep", [(1, 1), (5, 1), (20, 1), (3, 8), (500, 1)])
def test_top_k_matches_transformers(lp, seed, masked, k, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.TopK(k, min_keep)(x), hf(lp.TopKLogitsWarper(k, min_tokens_to_keep=min_keep), x))


def test_top_k_ties_keep_matches_transformers(lp):
    x = np.round(random_logits(3)).astype(np.float32)  # integer logits: many ties
    for k in (1, 4, 10, 30):
        assert_same(S.TopK(k)(x), hf(lp.TopKLogitsWarper(k), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("p,min_keep", [(0.05, 1), (0.5, 1), (0.9, 1), (0.97, 1), (0.3, 5)])
def test_top_p_matches_transformers(lp, seed, masked, p, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.TopP(p, min_keep)(x), hf(lp.TopPLogitsWarper(p, min_tokens_to_keep=min_keep), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("p,min_keep", [(0.01, 1), (0.1, 1), (0.5, 1), (0.9, 1), (0.5, 6)])
def test_min_p_matches_transformers(lp, seed, masked, p, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.MinP(p, min_keep)(x), hf(lp.MinPLogitsWarper(p, min_tokens_to_keep=min_keep), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("mass,min_keep", [(0.2, 1), (0.5, 1), (0.9, 1), (0.5, 7)])
def test_typical_p_matches_transformers(lp, seed, masked, mass, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.TypicalP(mass, min_keep)(x), hf(lp.TypicalLogitsWarper(mass, min_tokens_to_keep=min_keep), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("eps,min_keep", [(1e-4, 1), (3e-3, 1), (0.02, 1), (0.2, 1), (0.2, 4)])
def test_epsilon_matches_transformers(lp, seed, masked, eps, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.EpsilonCutoff(eps, min_keep)(x),
                hf(lp.EpsilonLogitsWarper(eps, min_tokens_to_keep=min_keep), x))


@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("eps,min_keep", [(1e-4, 1), (3e-3, 1), (0.02, 1), (0.2, 1), (0.2, 4)])
def test_eta_matches_transformers(lp, seed, masked, eps, min_keep):
    x = random_logits(seed, masked=masked)
    assert_same(S.EtaCutoff(eps, min_keep)(x), hf(lp.EtaLogitsWarper(eps, min_tokens_to_keep=min_keep), x))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalty_matches_transformers(lp, seed, penalty):
    x = random_logits(seed)
    h = random_history(seed)
    assert_same(S.RepetitionPenalty(penalty)(x, h), hf(lp.RepetitionPenaltyLogitsProcessor(penalty), x, h))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(lp, seed, n):
    x = random_logits(seed)
    # A small alphabet makes repeated n-grams likely.
    h = np.random.default_rng(seed).integers(0, 4, 30).tolist()
    mine = S.NoRepeatNGram(n)(x, h)
    assert_same(mine, hf(lp.NoRepeatNGramLogitsProcessor(n), x, h))
    assert np.isneginf(mine).any()


def test_logit_bias_matches_transformers_sequence_bias(lp):
    x = random_logits(1)
    bias = {3: 2.5, 10: -1.25, 50: 7.0, 96: -30.0}
    ref = hf(lp.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}), x, [5, 6])
    assert_same(S.LogitBias(bias)(x), ref)


def test_banned_tokens_match_transformers_suppress_tokens(lp):
    x = random_logits(2)
    banned = [0, 7, 8, 96]
    assert_same(S.BanTokens(banned)(x), hf(lp.SuppressTokensLogitsProcessor(banned), x))


@pytest.mark.parametrize("seed", range(4))
def test_hf_order_chain_matches_transformers_pipeline(lp, seed):
    x = random_logits(seed, vocab=300)
    h = random_history(seed, vocab=300)
    ref = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2),
        lp.NoRepeatNGramLogitsProcessor(3),
        lp.TemperatureLogitsWarper(0.8),
        lp.TopKLogitsWarper(50),
        lp.TopPLogitsWarper(0.9),
        lp.MinPLogitsWarper(0.05),
    ])
    chain = S.make_chain(repetition_penalty=1.2, no_repeat_ngram_size=3, temperature=0.8, top_k=50,
                         top_p=0.9, min_p=0.05)
    assert chain.names == ["repetition_penalty", "no_repeat_ngram", "temperature", "top_k", "top_p", "min_p"]
    assert_same(chain(x, h), hf(ref, x, h))


# ------------------------------------------------------ llama.cpp's rules

def llama_top_k(x: np.ndarray, k: int) -> set[int]:
    # llama.cpp: sort candidates by logit, descending, and keep the first k.
    order = sorted(range(x.size), key=lambda i: (-x[i], i))
    return set(order[:k])


def llama_top_p(x: np.ndarray, p: float) -> set[int]:
    # llama.cpp: softmax, sort descending, keep up to and including the first token
    # at which the cumulative probability reaches p.
    x = np.asarray(x, dtype=np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = sorted(range(x.size), key=lambda i: (-probs[i], i))
    total = 0.0
    for n, i in enumerate(order, start=1):
        total += probs[i]
        if total >= p:
            return set(order[:n])
    return set(order)


def llama_min_p(x: np.ndarray, p: float) -> set[int]:
    # The documented rule: drop tokens whose probability is below p times the top probability.
    x = np.asarray(x, dtype=np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    return {i for i in range(x.size) if probs[i] >= p * probs.max()}


def test_top_k_cut_keeps_exactly_k_on_ties():
    x = np.round(random_logits(3)).astype(np.float32)
    for k in (1, 4, 10, 30):
        out = S.TopK(k, ties="cut")(x)
        assert kept(out) == llama_top_k(x, k)
        assert len(kept(out)) == k
    # where ties straddle the k-th place, the default keeps more than k
    k = next(k for k in range(1, 40) if len(kept(S.TopK(k)(x))) > k)
    assert kept(S.TopK(k)(x)) > llama_top_k(x, k)


def test_top_k_zero_disables_and_large_k_is_a_no_op():
    x = random_logits(4)
    np.testing.assert_array_equal(S.TopK(0)(x), x.astype(np.float64))
    np.testing.assert_array_equal(S.TopK(10 * VOCAB)(x), x.astype(np.float64))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95, 0.999])
def test_top_p_follows_llama_cpp_rule(seed, p):
    x = random_logits(seed)
    assert kept(S.TopP(p)(x)) == llama_top_p(x, p)


def test_top_p_one_keeps_everything_even_underflowing_tokens():
    x = np.array([0.0, -200.0, -800.0, 5.0], dtype=np.float32)  # exp(-800) underflows
    assert kept(S.TopP(1.0)(x)) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.7])
def test_min_p_follows_llama_cpp_rule(seed, p):
    x = random_logits(seed)
    assert kept(S.MinP(p)(x)) == llama_min_p(x, p)


@pytest.mark.parametrize("seed", range(5))
def test_llama_cpp_order_truncates_before_temperature(seed):
    x = random_logits(seed)
    t, p, q = 0.5, 0.2, 0.6
    ours = S.make_chain(order="llama.cpp", temperature=t, min_p=p, top_p=q)(x)
    # llama.cpp: top-p then min-p at temperature 1, then the survivors are divided by T.
    after_top_p = llama_top_p(x, q)
    masked = np.where([i in after_top_p for i in range(x.size)], x.astype(np.float64), -np.inf)
    expect = llama_min_p(masked, p)
    assert kept(ours) == expect
    np.testing.assert_allclose(ours[sorted(expect)], x[sorted(expect)].astype(np.float64) / t)
    hf_order = S.make_chain(temperature=t, min_p=p, top_p=q)(x)
    # Scaling first sharpens the distribution, so the hf order keeps no more tokens.
    assert kept(hf_order) <= kept(ours)


def test_orders_differ_on_some_vector():
    differs = [kept(S.make_chain(order="llama.cpp", temperature=2.0, min_p=0.3)(random_logits(s)))
               != kept(S.make_chain(temperature=2.0, min_p=0.3)(random_logits(s))) for s in range(10)]
    assert any(differs)


def test_repetition_penalty_window_and_sign_rules():
    x = random_logits(7).astype(np.float64)
    x[[1, 2, 3]] = [2.0, -2.0, 0.0]
    h = [1, 2, 3, 4, 5, 6, 1]
    pen = 1.5

    out = S.RepetitionPenalty(pen)(x, h)
    expect = x.copy()
    for t in set(h):
        expect[t] = x[t] / pen if x[t] > 0 else x[t] * pen
    np.testing.assert_allclose(out, expect)
    assert out[2] < x[2] and out[1] < x[1]

    # A window of the last 3 tokens (llama.cpp's penalty_last_n): only 5, 6, 1 count.
    out = S.RepetitionPenalty(pen, window=3)(x, h)
    expect = x.copy()
    for t in {5, 6, 1}:
        expect[t] = x[t] / pen if x[t] > 0 else x[t] * pen
    np.testing.assert_allclose(out, expect)

    # The rule as first published divides every logit: a negative one rises.
    out = S.RepetitionPenalty(pen, negative="divide")(x, h)
    assert out[2] == x[2] / pen and out[2] > x[2]


def test_presence_frequency_follow_llama_cpp_formula():
    x = random_logits(8).astype(np.float64)
    h = [4, 4, 4, 9, 9, 11, 0, 4, 9, 9]
    out = S.PresenceFrequencyPenalty(presence=0.6, frequency=0.25, window=6)(x, h)
    recent = h[-6:]
    expect = x.copy()
    for t in set(recent):
        c = recent.count(t)
        expect[t] -= c * 0.25 + 0.6
    np.testing.assert_allclose(out, expect)


# ------------------------------------------------------ rules without a torch reference

@pytest.mark.parametrize("seed,masked", CASES)
@pytest.mark.parametrize("n", [0.5, 1.0, 2.0])
def test_top_n_sigma_rule(seed, masked, n):
    x = random_logits(seed, masked=masked)
    live = x[np.isfinite(x)].astype(np.float64)
    sigma = math.sqrt(sum((v - live.mean()) ** 2 for v in live) / live.size)
    expect = {i for i in range(x.size) if np.isfinite(x[i]) and x[i] >= live.max() - n * sigma}
    assert kept(S.TopNSigma(n)(x)) == expect
    # invariant to temperature
    assert kept(S.TopNSigma(n)(S.Temperature(0.3)(x))) == expect


@pytest.mark.parametrize("seed,masked", CASES)
def test_dynamic_temperature_rule(seed, masked):
    x = random_logits(seed, masked=masked)
    t, r, e = 0.8, 0.5, 1.7
    live = x[np.isfinite(x)].astype(np.float64)
    p = np.exp(live - live.max())
    p /= p.sum()
    h = -sum(pi * math.log(pi) for pi in p if pi > 0)
    dyn = (t - r) + 2 * r * (h / math.log(live.size)) ** e
    proc = S.DynamicTemperature(t, r, e)
    out = proc(x)
    assert proc.last_temperature == pytest.approx(dyn, rel=1e-12)
    np.testing.assert_allclose(out, x.astype(np.float64) / dyn)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.2])
def test_xtc_rule_when_triggered(seed, threshold):
    x = random_logits(seed, scale=1.5, vocab=30)
    probs = np.exp(x.astype(np.float64) - x.max())
    probs /= probs.sum()
    above = [i for i in range(x.size) if probs[i] >= threshold]
    if len(above) >= 2:
        least = min(above, key=lambda i: probs[i])
        expect = set(range(x.size)) - (set(above) - {least})
    else:
        expect = set(range(x.size))
    proc = S.XTC(threshold, probability=1.0)
    assert kept(proc(x)) == expect
    assert proc.last_triggered == (len(above) >= 2)


def test_xtc_probability_and_off():
    x = random_logits(0, scale=1.5, vocab=30)
    np.testing.assert_array_equal(S.XTC(0.05, probability=0.0)(x), x.astype(np.float64))
    proc = S.XTC(0.05, probability=0.3, seed=123)
    n = 4000
    hits = 0
    for _ in range(n):
        proc(x)
        hits += proc.last_triggered
    # Binomial(n, 0.3): 5 standard deviations
    assert abs(hits - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7)


def dry_reference(history, breakers, allowed, base, mult, vocab):
    """Brute force: for each token t, the longest L such that history[-L:] + [t] already
    occurs in the history, the occurrence holding no sequence breaker."""
    n = len(history)
    penalty = np.zeros(vocab)
    for t in range(vocab):
        best = 0
        for length in range(1, n):
            pattern = history[n - length:] + [t]
            if any(b in pattern for b in breakers):
                break
            found = any(history[i:i + length + 1] == pattern for i in range(0, n - length))
            if found:
                best = length
        if best >= allowed:
            penalty[t] = mult * base ** (best - allowed)
    return penalty


@pytest.mark.parametrize("seed", range(8))
def test_dry_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    vocab = 6
    # Repetitive history: a motif repeated with noise.
    motif = rng.integers(0, vocab, 5).tolist()
    h = (motif * 4 + rng.integers(0, vocab, 3).tolist() + motif[:3])
    x = random_logits(seed, vocab=vocab).astype(np.float64)
    for breakers in ((), (int(motif[1]),)):
        proc = S.DRY(0.8, base=1.75, allowed_length=2, breakers=breakers)
        expect = x - dry_reference(h, breakers, 2, 1.75, 0.8, vocab)
        np.testing.assert_allclose(proc(x, h), expect)
    assert (S.DRY(0.8)(x, h) < x).any()


def test_dry_window_and_breaker_at_end():
    h = [1, 2, 3, 1, 2, 3, 1, 2]
    x = np.zeros(5)
    out = S.DRY(1.0, base=2.0, allowed_length=2)(x, h)
    np.testing.assert_allclose(out, -dry_reference(h, (), 2, 2.0, 1.0, 5))
    # By hand: "1 2 3 1 2" ends the history and occurs at the start followed by 3, so
    # 3 would extend a match of L = 5: penalty 1.0 * 2.0 ** (5 - 2).
    assert out[3] == -(2.0 ** 3)
    np.testing.assert_array_equal(S.DRY(1.0, breakers=[2])(x, h), x)
    np.testing.assert_allclose(S.DRY(1.0, base=2.0, window=4)(x, h), -dry_reference(h[-4:], (), 2, 2.0, 1.0, 5))


def test_mirostat_v2_step_rule_and_update():
    x = random_logits(5)
    proc = S.MirostatV2(tau=3.0, eta=0.2)
    assert proc.mu == 6.0
    logp = x.astype(np.float64) - x.max()
    logp -= math.log(np.exp(logp).sum())
    surprise = -logp / math.log(2)
    expect = {i for i in range(x.size) if surprise[i] <= 6.0}
    out = proc(x)
    assert kept(out) == expect
    p = np.exp(out - out.max())
    p /= p.sum()
    token = int(np.argmax(p))
    proc.accept(token, p)
    assert proc.mu == pytest.approx(6.0 - 0.2 * (-math.log2(p[token]) - 3.0))


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_steers_average_surprise_to_tau(version):
    x = random_logits(11, vocab=400, scale=1.5)
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    # A target below the entropy of the full distribution, so it is reachable.
    tau = 0.6 * float(-(p * np.log2(p)).sum())
    sampler = S.Sampler(seed=5, mirostat=version, mirostat_tau=tau, mirostat_eta=0.1)
    surprises = []
    for _ in range(3000):
        d = sampler.step(x)
        surprises.append(-math.log2(d.probs[d.token]))
    assert abs(np.mean(surprises[500:]) - tau) < 0.1


def test_mirostat_v1_k_rule():
    x = random_logits(6, vocab=300, scale=3.0)
    proc = S.Mirostat(tau=5.0, eta=0.1, m=100)
    probs = np.exp(x.astype(np.float64) - x.max())
    probs = np.sort(probs / probs.sum())[::-1]
    # Least-squares Zipf exponent over the top m: sum(t_i b_i) / sum(t_i^2).
    num = sum(math.log((i + 2) / (i + 1)) * math.log(probs[i] / probs[i + 1]) for i in range(99))
    den = sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(99))
    s = num / den
    k = ((s - 1) * 2 ** proc.mu / (1 - 300 ** (1 - s))) ** (1 / s)
    out = proc(x)
    assert len(kept(out)) == max(1, min(300, int(k)))
    assert kept(out) == llama_top_k(x, len(kept(out)))


# ------------------------------------------------------ sampler

def chi_square_critical(dof: int, alpha: float = 1e-3) -> float:
    # Wilson-Hilferty approximation of the chi-square quantile.
    z = NormalDist().inv_cdf(1 - alpha)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("options", [
    dict(temperature=0.8, top_k=20),
    dict(temperature=1.3, top_p=0.9, repetition_penalty=1.4),
    dict(min_p=0.05),
])
def test_sampling_frequencies_match_processed_distribution(options):
    x = random_logits(21, vocab=60)
    h = [1, 2, 3]
    sampler = S.Sampler(seed=1234, **options)
    probs = S.softmax(sampler.chain(x, h))
    n = 20000
    counts = np.bincount([sampler.sample(x, h) for _ in range(n)], minlength=x.size)
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = probs[support] * n
    # Merge small cells so the chi-square approximation holds.
    big = expected >= 5
    obs = np.append(counts[support][big], counts[support][~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi_square_critical(len(exp) - 1)


def test_same_seed_same_tokens_bit_for_bit():
    xs = [random_logits(s, vocab=200) for s in range(50)]

    def run(seed):
        sampler = S.Sampler(seed=seed, temperature=0.9, top_p=0.95, xtc_probability=0.5, xtc_threshold=0.05,
                            dry_multiplier=0.5)
        hist = []
        for x in xs:
            hist.append(sampler.sample(x, hist))
        return hist

    assert run(7) == run(7)
    assert run(7) != run(8)
    sampler = S.Sampler(seed=None)
    replay = S.Sampler(seed=sampler.seed)
    assert [sampler.sample(x) for x in xs] == [replay.sample(x) for x in xs]


def test_temperature_zero_is_greedy():
    x = random_logits(9)
    x[[10, 20]] = x.max() + 1  # a tie: the first index wins
    sampler = S.Sampler(seed=0, temperature=0)
    assert {sampler.sample(x) for _ in range(50)} == {10}


@pytest.mark.parametrize("t", [1e-3, 1e-30, 1e-200, 1e-320])
def test_tiny_temperature_is_exact(t):
    x = np.array([3.0, 7.5, -1.0, 7.25, -np.inf], dtype=np.float32)
    probs = S.softmax(S.Temperature(t)(x))
    assert not np.isnan(probs).any()
    # exp((x_i - max) / t) with Python's math, normalised: tends to one-hot on the argmax.
    w = [0.0 if v == -math.inf else math.exp(max((float(v) - 7.5) / t, -1e4)) for v in x]
    np.testing.assert_allclose(probs, [v / sum(w) for v in w], rtol=1e-12, atol=0)
    assert probs[1] == 1.0


def test_small_temperature_keeps_exact_ratios():
    # Two logits one float32 step apart, at a temperature of that step: ratio e.
    a = np.float32(10.0)
    b = np.nextafter(a, np.float32(20))
    t = float(b) - float(a)
    probs = S.softmax(S.Temperature(t)(np.array([a, b, 0.0], dtype=np.float32)))
    assert probs[1] / probs[0] == pytest.approx(math.e, rel=1e-12)
    assert probs[2] == 0.0


def test_custom_processors_in_chain():
    def only_even(logits, history):
        out = np.array(logits, dtype=np.float64)
        out[1::2] = -np.inf
        return out

    x = random_logits(13, vocab=40)
    sampler = S.Sampler(seed=3, processors=[only_even], temperature=1.5)
    assert all(sampler.sample(x) % 2 == 0 for _ in range(200))
    chain = S.make_chain(order=["temperature", only_even, "top_k"], temperature=0.5, top_k=3)
    assert chain.names == ["temperature", "only_even", "top_k"]
    assert all(t % 2 == 0 for t in kept(chain(x)))
    assert len(kept(chain(x))) == 3


# ------------------------------------------------------ validation

@pytest.mark.parametrize("options,name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_negative="sideways"), "repetition_negative"),
    (dict(mirostat=3), "mirostat"),
    (dict(mirostat=2, top_k=10), "mirostat"),
    (dict(xtc_probability=2.0), "xtc_probability"),
    (dict(dry_base=0.5), "dry_base"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(order="sideways"), "order"),
    (dict(order=["top_k"], temperature=0.5, top_k=3), "order"),
    (dict(logit_bias={3: float("inf")}), "logit_bias"),
    (dict(min_keep=0), "min_keep"),
])
def test_invalid_options_raise_naming_the_parameter(options, name):
    with pytest.raises(ValueError, match=name):
        S.make_chain(**options)
    with pytest.raises(ValueError, match=name):
        S.Sampler(seed=0, **options)


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="top_q"):
        S.make_chain(top_q=0.5)


def test_nan_logits_raise_before_any_processor_runs():
    calls = []

    def spy(logits, history):
        calls.append(1)
        return logits

    x = random_logits(0)
    x[5] = np.nan
    sampler = S.Sampler(seed=0, processors=[spy])
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(x)
    assert calls == []
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(np.full(5, -np.inf))
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(np.zeros((2, 5)))


def test_bad_token_ids_raise():
    x = random_logits(0)
    with pytest.raises(ValueError, match="banned_tokens"):
        S.BanTokens([VOCAB])(x)
    with pytest.raises(ValueError, match="logit_bias"):
        S.LogitBias({VOCAB + 3: 1.0})(x)
