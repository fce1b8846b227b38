"""The softmax seen as a Boltzmann distribution.

For a logit vector l and a temperature T, sampling uses p_i = exp(l_i / T) / Z.
Reading E_i = -l_i as the energy of token i, that is exactly the Boltzmann
distribution of statistical physics at temperature T, and the usual
quantities describe how a model's choice looks:

* entropy H = -sum p log p (nats, or bits), and exp(H), the effective number
  of choices (the perplexity of this one step);
* mean energy <E> = -sum p l and its variance Var(E);
* log partition function log Z = log sum exp(l / T); free energy F = -T log Z;
  heat capacity C = Var(E) / T^2 = d<E>/dT.

They are tied together by H = (<E> - F) / T and d log Z / d(1/T) = -<E>.

Everything is computed in float64 with the maximum subtracted, so it is exact
at small T. T = 0 is the limit T -> 0: all mass on the argmax (split evenly
between exactly tied maxima). T = inf is the limit T -> inf: uniform over the
tokens that are not masked; masked (-inf) logits have probability 0 at every
temperature.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .sampling import check_logits

DEFAULT_TEMPERATURES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, math.inf)
LN2 = math.log(2.0)


def _temperature(t) -> float:
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"temperature: must be a number, got {t!r}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"temperature: must be >= 0 (0 and inf are the limits), got {v}")
    return v


def log_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """log p_i at temperature T (log-softmax of l / T); -inf where p_i = 0."""
    x = check_logits(logits)
    t = _temperature(temperature)
    live = np.isfinite(x)
    top = x.max()
    if t == 0.0:
        winners = x == top
        return np.where(winners, -math.log(int(winners.sum())), -np.inf)
    if math.isinf(t):
        return np.where(live, -math.log(int(live.sum())), -np.inf)
    with np.errstate(over="ignore"):
        z = (x - top) / t  # <= 0, the maximum exactly 0: no overflow in exp
    return z - math.log(np.exp(z).sum())


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """p_i = exp(l_i / T) / Z, in float64."""
    return np.exp(log_probabilities(logits, temperature))


def entropy(logits, temperature: float = 1.0, bits: bool = False) -> float:
    """H = -sum p log p, in nats (or bits)."""
    logp = log_probabilities(logits, temperature)
    p = np.exp(logp)
    h = _entropy(p, logp)
    return h / LN2 if bits else h


def _entropy(p: np.ndarray, logp: np.ndarray) -> float:
    """-sum p log p, never below 0 (a certain outcome sums -0.0, which would print as -0.00)."""
    on = p > 0
    return max(0.0, float(-(p[on] * logp[on]).sum()))


def log_partition(logits, temperature: float = 1.0) -> float:
    """log Z = log sum_i exp(l_i / T) (the limits at T = 0 and T = inf are returned there)."""
    x = check_logits(logits)
    t = _temperature(temperature)
    top = float(x.max())
    if t == 0.0:
        return math.inf if top > 0 else -math.inf if top < 0 else math.log(int((x == top).sum()))
    if math.isinf(t):
        return math.log(int(np.isfinite(x).sum()))
    with np.errstate(over="ignore"):
        z = (x - top) / t
    return top / t + math.log(np.exp(z).sum())


@dataclass(frozen=True)
class ThermoStats:
    """The statistics of one logit vector at one temperature."""

    temperature: float
    probs: np.ndarray
    entropy: float            # nats
    entropy_bits: float
    effective_choices: float  # exp(entropy)
    mean_energy: float        # <E>, E = -logit
    energy_variance: float    # Var(E)
    log_partition: float      # log Z
    free_energy: float        # F = -T log Z
    heat_capacity: float      # Var(E) / T^2
    argmax: int
    p_max: float

    def row(self) -> dict:
        """The scalar fields, for tables."""
        return {k: v for k, v in self.__dict__.items() if k != "probs"}


def stats(logits, temperature: float = 1.0) -> ThermoStats:
    """All the quantities of the module docstring for `logits` at `temperature`."""
    x = check_logits(logits)
    t = _temperature(temperature)
    logp = log_probabilities(x, t)
    p = np.exp(logp)
    on = p > 0
    h = _entropy(p, logp)
    top = float(x.max())
    # Energies relative to the lowest one keep the moments exact for large logits.
    d = np.where(on, x - top, 0.0)
    mean_d = float((p * d).sum())
    var = float((p * (d - mean_d) ** 2).sum())
    log_z = log_partition(x, t)
    if t == 0.0:
        free, heat = -top, 0.0
    elif math.isinf(t):
        free = -math.inf if int(np.isfinite(x).sum()) > 1 else -top
        heat = 0.0
    else:
        with np.errstate(over="ignore"):
            free = -top - t * math.log(np.exp((x - top) / t).sum())
        with np.errstate(over="ignore"):
            heat = 0.0 if var == 0.0 else float(np.float64(var) / t / t)
    i = int(np.argmax(p))
    return ThermoStats(
        temperature=t, probs=p, entropy=h, entropy_bits=h / LN2, effective_choices=math.exp(h),
        mean_energy=-(top + mean_d), energy_variance=var, log_partition=log_z, free_energy=free,
        heat_capacity=heat, argmax=i, p_max=float(p[i]),
    )


def sweep(logits, temperatures: Iterable[float] = DEFAULT_TEMPERATURES) -> list[ThermoStats]:
    """stats() at each temperature, in the order given."""
    x = check_logits(logits)
    temps = [_temperature(t) for t in temperatures]
    return [stats(x, t) for t in temps]


def table(records: Iterable[ThermoStats]) -> str:
    """A plain-text table of a sweep."""
    cols = ("temperature", "p_max", "entropy_bits", "effective_choices", "mean_energy",
            "energy_variance", "free_energy", "heat_capacity")
    lines = ["  ".join(f"{c:>17}" for c in cols)]
    for r in records:
        row = r.row()
        lines.append("  ".join(f"{row[c]:>17.6g}" for c in cols))
    return "\n".join(lines)


@dataclass(frozen=True)
class Identity:
    """A numerical demonstration of an identity: the largest discrepancy seen."""

    name: str
    max_abs_difference: float
    tolerance: float

    @property
    def holds(self) -> bool:
        return self.max_abs_difference <= self.tolerance


def shift_invariance(logits, shift: float = 1000.0, temperature: float = 1.0,
                     tolerance: float = 1e-12) -> Identity:
    """softmax(l + c) == softmax(l): adding a constant to every logit (a change of the
    energy zero) leaves the distribution unchanged; only log Z moves, by c / T."""
    x = check_logits(logits)
    t = _temperature(temperature)
    p0 = probabilities(x, t)
    p1 = probabilities(x + float(shift), t)
    return Identity(f"softmax(l + {shift}) == softmax(l) at T={t}",
                    float(np.abs(p1 - p0).max()), tolerance)


def log_softmax_identity(logits, temperature: float = 1.0, tolerance: float = 1e-12) -> Identity:
    """log_softmax(l / T) == log(p): the log-probabilities are the logits scaled by
    1/T minus log Z, i.e. l_i / T - log Z, compared over the tokens with p_i > 0."""
    x = check_logits(logits)
    t = _temperature(temperature)
    if t == 0.0 or math.isinf(t):
        raise ValueError("temperature: the identity is stated for 0 < T < inf")
    p = probabilities(x, t)
    on = p > 0
    direct = x[on] / t - log_partition(x, t)
    return Identity(f"log_softmax(l / T) == log p at T={t}",
                    float(np.abs(direct - np.log(p[on])).max()), tolerance)
