"""The Boltzmann view of the softmax, against direct numpy formulas and its limits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tokentrail import thermo


def logits(seed: int, n: int = 64, scale: float = 3.0, masked: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    if masked:
        x[rng.choice(n, masked, replace=False)] = -np.inf
    return x


def direct(x: np.ndarray, t: float) -> dict:
    """The textbook formulas, written straight from the definitions (moderate T only)."""
    x = x.astype(np.float64)
    live = np.isfinite(x)
    w = np.where(live, np.exp(np.where(live, x, 0.0) / t), 0.0)
    z = w.sum()
    p = w / z
    e = np.where(live, -x, 0.0)
    mean = (p * e).sum()
    var = (p * e * e).sum() - mean ** 2
    h = -sum(pi * math.log(pi) for pi in p if pi > 0)
    return dict(p=p, z=z, mean=mean, var=var, h=h)


CASES = [(s, m, t) for s in range(4) for m in (0, 7) for t in (0.3, 1.0, 2.5)]


@pytest.mark.parametrize("seed,masked,t", CASES)
def test_quantities_match_direct_formulas(seed, masked, t):
    x = logits(seed, masked=masked)
    ref = direct(x, t)
    s = thermo.stats(x, t)
    np.testing.assert_allclose(s.probs, ref["p"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(thermo.probabilities(x, t), ref["p"], rtol=1e-12, atol=1e-300)
    assert s.entropy == pytest.approx(ref["h"], rel=1e-12)
    assert thermo.entropy(x, t) == pytest.approx(ref["h"], rel=1e-12)
    assert s.entropy_bits == pytest.approx(ref["h"] / math.log(2), rel=1e-12)
    assert thermo.entropy(x, t, bits=True) == pytest.approx(ref["h"] / math.log(2), rel=1e-12)
    assert s.effective_choices == pytest.approx(math.exp(ref["h"]), rel=1e-12)
    assert s.mean_energy == pytest.approx(ref["mean"], rel=1e-10, abs=1e-12)
    assert s.energy_variance == pytest.approx(ref["var"], rel=1e-8, abs=1e-12)
    assert s.log_partition == pytest.approx(math.log(ref["z"]), rel=1e-12)
    assert s.free_energy == pytest.approx(-t * math.log(ref["z"]), rel=1e-12)
    assert s.heat_capacity == pytest.approx(ref["var"] / t ** 2, rel=1e-8, abs=1e-12)
    assert s.argmax == int(np.argmax(x)) and s.p_max == pytest.approx(ref["p"].max(), rel=1e-12)
    np.testing.assert_array_equal(s.probs[np.isneginf(x)], 0.0)


@pytest.mark.parametrize("seed,t", [(0, 0.5), (1, 1.0), (2, 3.0)])
def test_thermodynamic_relations(seed, t):
    x = logits(seed)
    s = thermo.stats(x, t)
    # H = (<E> - F) / T
    assert s.entropy == pytest.approx((s.mean_energy - s.free_energy) / t, rel=1e-10)
    # d log Z / d(1/T) = -<E>, by a central difference in beta = 1/T
    b, db = 1 / t, 1e-5
    slope = (thermo.log_partition(x, 1 / (b + db)) - thermo.log_partition(x, 1 / (b - db))) / (2 * db)
    assert slope == pytest.approx(-s.mean_energy, rel=1e-6)
    # C = d<E>/dT
    dt = 1e-5 * t
    d_mean = (thermo.stats(x, t + dt).mean_energy - thermo.stats(x, t - dt).mean_energy) / (2 * dt)
    assert s.heat_capacity == pytest.approx(d_mean, rel=1e-5)


def test_zero_temperature_is_one_hot_on_the_argmax():
    x = logits(3)
    s = thermo.stats(x, 0.0)
    expect = np.zeros(x.size)
    expect[np.argmax(x)] = 1.0
    np.testing.assert_array_equal(s.probs, expect)
    assert s.entropy == 0.0 and s.effective_choices == 1.0 and s.energy_variance == 0.0
    assert s.mean_energy == -float(x.max())
    # exact ties share the mass: the T -> 0 limit
    y = np.array([1.0, 4.0, 4.0, -2.0])
    np.testing.assert_array_equal(thermo.probabilities(y, 0.0), [0, 0.5, 0.5, 0])
    assert thermo.entropy(y, 0.0) == pytest.approx(math.log(2))


@pytest.mark.parametrize("t", [1e-3, 1e-30, 1e-200, 1e-310])
def test_tiny_temperature_is_exact_and_tends_to_one_hot(t):
    x = np.array([2.0, 5.0, 4.999, -3.0, -np.inf])
    p = thermo.probabilities(x, t)
    assert not np.isnan(p).any()
    r = math.exp(max(-0.001 / t, -1e4))  # p[2] / p[1], from the definition
    assert p[2] == pytest.approx(r / (1 + r + math.exp(max(-3.0 / t, -1e4))), rel=1e-9, abs=0)
    assert p[1] == pytest.approx(1 / (1 + r), rel=1e-12)
    s = thermo.stats(x, t)
    assert not math.isnan(s.entropy) and not math.isnan(s.energy_variance)
    # F = -T log Z = -5 - T log(1 + r + ...)
    assert s.free_energy == pytest.approx(-5.0 - t * math.log1p(r), rel=1e-12)


def test_limits_approach_smoothly():
    x = logits(4)
    one_hot = thermo.probabilities(x, 0.0)
    uniform = np.full(x.size, 1 / x.size)
    np.testing.assert_allclose(thermo.probabilities(x, math.inf), uniform)
    cold = [np.abs(thermo.probabilities(x, t) - one_hot).max() for t in (0.5, 0.1, 0.02, 0.004)]
    hot = [np.abs(thermo.probabilities(x, t) - uniform).max() for t in (2.0, 20.0, 200.0, 2000.0)]
    assert cold == sorted(cold, reverse=True) and cold[-1] < 1e-12
    assert hot == sorted(hot, reverse=True) and hot[-1] < 1e-4
    s = thermo.stats(x, 1e9)
    assert s.entropy == pytest.approx(math.log(x.size), rel=1e-9)
    assert thermo.stats(x, math.inf).effective_choices == pytest.approx(x.size)


def test_log_partition_limits():
    assert thermo.log_partition([1.0, 0.5], 0.0) == math.inf
    assert thermo.log_partition([-1.0, -0.5], 0.0) == -math.inf
    assert thermo.log_partition([0.0, 0.0, -1.0], 0.0) == pytest.approx(math.log(2))
    assert thermo.log_partition([3.0, 1.0, -np.inf], math.inf) == pytest.approx(math.log(2))


def test_sweep_and_table():
    x = logits(5, masked=5)
    temps = [0.0, 0.2, 0.7, 1.0, 3.0, 10.0, math.inf]
    records = thermo.sweep(x, temps)
    assert [r.temperature for r in records] == temps
    for r, t in zip(records, temps):
        assert r.entropy == pytest.approx(thermo.stats(x, t).entropy)
    h = [r.entropy for r in records]
    assert h == sorted(h)  # entropy grows with temperature
    assert h[-1] == pytest.approx(math.log(x.size - 5))
    text = thermo.table(records)
    assert len(text.splitlines()) == len(temps) + 1 and "entropy_bits" in text
    assert set(records[0].row()) == set(records[0].__dict__) - {"probs"}


@pytest.mark.parametrize("t", [0.1, 1.0, 4.0])
def test_identities_hold(t):
    x = logits(6, masked=3)
    shift = thermo.shift_invariance(x, shift=1234.5, temperature=t)
    assert shift.holds, shift
    assert thermo.log_partition(x.astype(np.float64) + 64.0, t) == pytest.approx(thermo.log_partition(x, t) + 64.0 / t,
                                                                           rel=1e-12)
    ident = thermo.log_softmax_identity(x, t, tolerance=1e-9)
    assert ident.holds, ident


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "hot"])
def test_invalid_temperature_raises(bad):
    with pytest.raises(ValueError, match="temperature"):
        thermo.stats(logits(0), bad)


def test_invalid_logits_raise():
    with pytest.raises(ValueError, match="logits"):
        thermo.stats([1.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match="logits"):
        thermo.probabilities([-np.inf, -np.inf], 1.0)
