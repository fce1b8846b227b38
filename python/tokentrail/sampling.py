"""The decoding step: a chain of logits processors, then one draw.

A *processor* is any callable ``proc(logits, history) -> logits``: ``logits``
is a 1-D float array over the vocabulary (float32 from the model, float64
inside a chain), ``history`` the token ids so far (prompt and generated), and
the result a new float64 array in which removed tokens are ``-inf``. Every
built-in processor below is a small class of that shape, and any user
callable of the same signature can be put into a chain.

Processors never modify their input. They work in float64 so that very small
temperatures and very peaked distributions stay exact: softmaxes subtract the
maximum first, and truncation rules compare log-probabilities where the
probabilities themselves would underflow.

Two optional hooks make a processor stateful or random:

* ``accept(token, probs)`` is called by the :class:`Sampler` after each draw
  with the chosen token and the distribution it was drawn from (mirostat
  uses it to steer its target surprise);
* ``bind_rng(generator)`` hands the processor its own
  ``numpy.random.Generator``, derived from the sampler's seed (XTC uses it),
  so that a whole run is reproducible bit for bit from one seed.

Chain order
-----------
:func:`make_chain` builds the processors named in ``order``. The default,
``order="hf"``, follows Hugging Face transformers: penalties and biases act on
the model's logits, then temperature, then the truncation samplers see the
temperature-scaled distribution::

    logit_bias, repetition_penalty, presence_frequency, dry, no_repeat_ngram,
    banned_tokens, temperature, top_n_sigma, top_k, top_p, min_p, typical_p,
    epsilon, eta, xtc, mirostat

``order="llama.cpp"`` follows llama.cpp's default sampler chain, in which the
truncation samplers see the distribution at temperature 1 and temperature is
applied last (so top-p and min-p keep different sets than with "hf" whenever
temperature != 1)::

    logit_bias, banned_tokens, no_repeat_ngram, repetition_penalty,
    presence_frequency, dry, top_n_sigma, top_k, typical_p, top_p, min_p, xtc,
    epsilon, eta, temperature, mirostat

``order`` may also be an explicit sequence of these names and/or processor
callables; an option that is set but whose name is missing from an explicit
order is an error rather than silently ignored.

Conventions where the two reference implementations differ
-----------------------------------------------------------
* Repetition penalty: both transformers and llama.cpp divide a repeated
  token's positive logit by the penalty and multiply a negative one (the fix
  for the rule as first published, which divided every logit and so made
  repeated tokens with negative logits *more* likely; that rule is available
  as ``repetition_negative="divide"``). They differ in which tokens count:
  transformers penalises every token of the whole context, llama.cpp only
  those in the last ``penalty_last_n`` (64). tokentrail's default is the whole
  context; ``repetition_window=64`` gives llama.cpp's.
* Presence and frequency penalties follow llama.cpp: over the last
  ``penalty_window`` tokens, ``logit -= count * frequency + (count > 0) *
  presence``.
* top-k: ``top_k=0`` disables it (llama.cpp). On ties at the k-th logit
  transformers keeps every tied token, llama.cpp keeps exactly k; the default
  is transformers' (``top_k_ties="keep"``), ``top_k_ties="cut"`` keeps
  exactly k (lower token id first among ties).
* top-p keeps the smallest set of most probable tokens whose mass reaches p
  (both implementations agree on the rule); ``top_p=1`` is a no-op.
* min-p keeps tokens with ``p >= min_p * p_max``, evaluated as
  ``logit >= max_logit + log(min_p)`` on the logits it receives; the two
  implementations agree on the rule and differ in where it runs (before or
  after temperature, see the orders above).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

Processor = Callable[[np.ndarray, Sequence[int]], np.ndarray]

NEG_INF = -math.inf


# ---------------------------------------------------------------- validation

def _fail(name: str, message: str) -> None:
    raise ValueError(f"{name}: {message}")


def _real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float, or a ValueError that names the parameter and the valid range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, f"must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        _fail(name, "must not be NaN")
    if math.isinf(v) and not allow_inf:
        _fail(name, f"must be finite, got {v}")
    lo_s = "(" if lo_open else "["
    hi_s = ")" if hi_open else "]"
    rng = f"{lo_s}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_s}"
    if lo is not None and (v < lo or (lo_open and v == lo)):
        _fail(name, f"must be in {rng}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        _fail(name, f"must be in {rng}, got {v}")
    return v


def _integer(name: str, value: Any, *, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, f"must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        _fail(name, f"must be >= {lo}, got {v}")
    return v


def _window(name: str, value: Any) -> int | None:
    return None if value is None else _integer(name, value, lo=0)


def check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """A float64 copy of a 1-D logit vector, refusing NaN, +inf and all-masked input."""
    x = np.array(logits, dtype=np.float64, copy=True)
    if x.ndim != 1 or x.size == 0:
        _fail(name, f"must be a non-empty 1-D array over the vocabulary, got shape {x.shape}")
    if np.isnan(x).any():
        _fail(name, f"contain NaN at positions {np.flatnonzero(np.isnan(x))[:8].tolist()}")
    if np.isposinf(x).any():
        _fail(name, f"contain +inf at positions {np.flatnonzero(np.isposinf(x))[:8].tolist()}")
    if not np.isfinite(x).any():
        _fail(name, "every token is masked (-inf); nothing can be sampled")
    return x


def _f64(logits: np.ndarray) -> np.ndarray:
    return np.array(logits, dtype=np.float64, copy=True)


# ---------------------------------------------------------------- numerics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Exact float64 log-probabilities; -inf logits get -inf."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    if not np.isfinite(m):
        _fail("logits", "every token is masked (-inf); nothing can be sampled")
    z = x - m
    return z - math.log(np.exp(z).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 probabilities, computed with the maximum subtracted.

    When most tokens are masked (after top-k, say), only the survivors are
    exponentiated: a 50k-128k vocabulary then costs a mask, not a pass of exp.
    """
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    if not np.isfinite(m):
        _fail("logits", "every token is masked (-inf); nothing can be sampled")
    live = np.flatnonzero(x > NEG_INF)
    if live.size * 4 < x.size:
        e = np.exp(x[live] - m)
        out = np.zeros_like(x)
        out[live] = e / e.sum()
        return out
    e = np.exp(x - m)
    return e / e.sum()


def _entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def _top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, highest first, lower index first among ties."""
    return np.argsort(-x, kind="stable")[:k]


def _keep_top(remove: np.ndarray, x: np.ndarray, min_keep: int) -> np.ndarray:
    """Never remove the `min_keep` highest logits (and their ties at the boundary)."""
    if min_keep <= 0:
        return remove
    k = min(min_keep, x.size)
    kth = np.partition(x, x.size - k)[x.size - k]
    return remove & (x < kth)


def _masked(x: np.ndarray, remove: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[remove] = NEG_INF
    return out


def greedy_mask(logits: np.ndarray) -> np.ndarray:
    """Keep only the argmax (the first one on ties)."""
    x = _f64(logits)
    i = int(np.argmax(x))
    out = np.full_like(x, NEG_INF)
    out[i] = x[i]
    return out


def _scale(x: np.ndarray, t: float) -> np.ndarray:
    """x / t in float64; when that would overflow (tiny t), the max is subtracted first,
    which leaves the distribution unchanged and keeps it exact."""
    with np.errstate(over="ignore"):
        y = x / t
    if (np.isinf(y) & np.isfinite(x)).any():
        with np.errstate(over="ignore"):
            y = (x - x.max()) / t
    return y


# ---------------------------------------------------------------- processors

class Temperature:
    """Divide logits by T. T = 0 is greedy: only the argmax survives."""

    name = "temperature"

    def __init__(self, temperature: float):
        self.temperature = _real("temperature", temperature, lo=0.0)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.temperature == 0.0:
            return greedy_mask(x)
        return _scale(x, self.temperature)

    def __repr__(self) -> str:
        return f"Temperature({self.temperature})"


class DynamicTemperature:
    """Entropy-scaled temperature (llama.cpp's "dynatemp").

    T = T_min + (T_max - T_min) * (H / H_max) ** exponent with
    T_min = max(0, temperature - range), T_max = temperature + range, H the
    entropy of the incoming distribution and H_max = log(number of unmasked
    tokens): confident distributions are sampled colder, flat ones hotter.
    """

    name = "temperature"

    def __init__(self, temperature: float, range: float, exponent: float = 1.0):
        self.temperature = _real("temperature", temperature, lo=0.0)
        self.range = _real("dynatemp_range", range, lo=0.0)
        self.exponent = _real("dynatemp_exponent", exponent, lo=0.0)
        self.last_temperature: float | None = None

    def temperature_for(self, logits: np.ndarray) -> float:
        x = np.asarray(logits, dtype=np.float64)
        n = int(np.isfinite(x).sum())
        if n <= 1:
            return self.temperature
        t_min = max(0.0, self.temperature - self.range)
        t_max = self.temperature + self.range
        normalized = _entropy(softmax(x)) / math.log(n)
        return t_min + (t_max - t_min) * min(1.0, normalized) ** self.exponent

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        t = self.temperature_for(x)
        self.last_temperature = t
        return greedy_mask(x) if t <= 0.0 else _scale(x, t)

    def __repr__(self) -> str:
        return f"DynamicTemperature({self.temperature}, range={self.range}, exponent={self.exponent})"


class TopK:
    """Keep the k highest logits. k = 0 disables.

    ties="keep" keeps every token tied with the k-th (transformers);
    ties="cut" keeps exactly k (llama.cpp), lower token ids first among ties.
    """

    name = "top_k"

    def __init__(self, k: int, min_keep: int = 1, ties: str = "keep"):
        self.k = _integer("top_k", k, lo=0)
        self.min_keep = _integer("min_keep", min_keep, lo=1)
        if ties not in ("keep", "cut"):
            _fail("top_k_ties", f"must be 'keep' or 'cut', got {ties!r}")
        self.ties = ties

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        k = max(self.k, self.min_keep)
        if self.k == 0 or k >= x.size:
            return x
        if self.ties == "cut":
            remove = np.ones(x.size, dtype=bool)
            remove[_top_indices(x, k)] = False
            return _masked(x, remove)
        kth = np.partition(x, x.size - k)[x.size - k]
        return _masked(x, x < kth)

    def __repr__(self) -> str:
        return f"TopK({self.k}, ties={self.ties!r})"


class TopP:
    """Nucleus sampling: keep the most probable tokens until their mass reaches p.

    Token i (in order of decreasing probability) is kept iff the mass of the
    tokens before it is < p, which is the smallest prefix with mass >= p.
    """

    name = "top_p"

    def __init__(self, p: float, min_keep: int = 1):
        self.p = _real("top_p", p, lo=0.0, hi=1.0, lo_open=True)
        self.min_keep = _integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.p >= 1.0:
            return x
        # Masked tokens have no mass and sort last: only the finite ones are
        # sorted (ascending indices, so ties keep the lower index first).
        live = np.flatnonzero(np.isfinite(x))
        order = live[_top_indices(x[live], live.size)]
        sorted_p = softmax(x[order])
        mass_before = np.cumsum(sorted_p) - sorted_p
        keep_sorted = mass_before < self.p
        keep_sorted[: self.min_keep] = True
        remove = np.ones(x.size, dtype=bool)
        remove[order[keep_sorted]] = False
        return _masked(x, remove)

    def __repr__(self) -> str:
        return f"TopP({self.p})"


class MinP:
    """Keep tokens with p >= min_p * p_max, i.e. logit >= max_logit + log(min_p)."""

    name = "min_p"

    def __init__(self, p: float, min_keep: int = 1):
        self.p = _real("min_p", p, lo=0.0, hi=1.0)
        self.min_keep = _integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.p == 0.0:
            return x
        # The log domain stays exact where probabilities underflow (tiny temperatures).
        remove = (x - x.max()) < math.log(self.p)
        return _masked(x, _keep_top(remove, x, self.min_keep))

    def __repr__(self) -> str:
        return f"MinP({self.p})"


class TypicalP:
    """Locally typical sampling: keep the tokens whose surprise -log p is closest
    to the entropy H, in that order, until their mass reaches `mass`."""

    name = "typical_p"

    def __init__(self, mass: float, min_keep: int = 1):
        self.mass = _real("typical_p", mass, lo=0.0, hi=1.0, lo_open=True)
        self.min_keep = _integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.mass >= 1.0:
            return x
        logp = log_softmax(x)
        p = np.exp(logp)
        h = _entropy(p)
        distance = np.abs(-logp - h)  # inf for masked tokens, so they sort last
        order = np.argsort(distance, kind="stable")
        cum = np.cumsum(p[order])
        last = min(int((cum < self.mass).sum()), x.size - 1)
        remove = distance > distance[order[last]]
        remove[order[: self.min_keep]] = False
        return _masked(x, remove)

    def __repr__(self) -> str:
        return f"TypicalP({self.mass})"


class EpsilonCutoff:
    """Epsilon sampling: remove tokens with probability < epsilon."""

    name = "epsilon"

    def __init__(self, epsilon: float, min_keep: int = 1):
        self.epsilon = _real("epsilon_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        self.min_keep = _integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        remove = softmax(x) < self.epsilon
        return _masked(x, _keep_top(remove, x, self.min_keep))

    def __repr__(self) -> str:
        return f"EpsilonCutoff({self.epsilon})"


class EtaCutoff:
    """Eta sampling: remove tokens with probability < min(eta, sqrt(eta) * exp(-H))."""

    name = "eta"

    def __init__(self, epsilon: float, min_keep: int = 1):
        self.epsilon = _real("eta_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        self.min_keep = _integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        p = softmax(x)
        eta = min(self.epsilon, math.sqrt(self.epsilon) * math.exp(-_entropy(p)))
        return _masked(x, _keep_top(p < eta, x, self.min_keep))

    def __repr__(self) -> str:
        return f"EtaCutoff({self.epsilon})"


class TopNSigma:
    """Keep logits >= max - n * sigma, sigma the (population) standard deviation
    of the unmasked logits. Scaling by a temperature leaves the kept set unchanged."""

    name = "top_n_sigma"

    def __init__(self, n: float):
        self.n = _real("top_n_sigma", n, lo=0.0, lo_open=True)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        live = x[np.isfinite(x)]
        if live.size <= 1:
            return x
        return _masked(x, x < live.max() - self.n * live.std())

    def __repr__(self) -> str:
        return f"TopNSigma({self.n})"


class XTC:
    """Exclude Top Choices: with probability `probability`, when at least two
    tokens have p >= threshold, remove all of them except the least probable.

    One uniform number is drawn per call (when probability > 0) from the
    processor's own generator, which a Sampler binds from its seed.
    """

    name = "xtc"

    def __init__(self, threshold: float, probability: float, min_keep: int = 1,
                 seed: int | np.random.Generator = 0):
        self.threshold = _real("xtc_threshold", threshold, lo=0.0, hi=1.0)
        self.probability = _real("xtc_probability", probability, lo=0.0, hi=1.0)
        self.min_keep = _integer("min_keep", min_keep, lo=1)
        self.bind_rng(seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed))
        self.last_triggered = False

    def bind_rng(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        self.last_triggered = False
        if self.probability <= 0.0 or self.rng.random() >= self.probability:
            return x
        order = _top_indices(x, x.size)
        sorted_p = softmax(x)[order]
        above = np.flatnonzero(sorted_p >= self.threshold)
        if above.size < 2:
            return x
        last = int(above[-1])  # the least probable token above the threshold survives
        if int(np.isfinite(x).sum()) - last < self.min_keep:
            return x
        self.last_triggered = True
        remove = np.zeros(x.size, dtype=bool)
        remove[order[:last]] = True
        return _masked(x, remove)

    def __repr__(self) -> str:
        return f"XTC(threshold={self.threshold}, probability={self.probability})"


def _z_function(s: Sequence[int]) -> list[int]:
    """z[k] = length of the longest common prefix of s and s[k:] (z[0] = len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


class DRY:
    """"Don't Repeat Yourself": penalise tokens that would extend a repetition.

    If the last L tokens of the history also occur earlier followed by token t,
    emitting t would repeat L + 1 tokens; when L >= allowed_length, t's logit is
    lowered by multiplier * base ** (L - allowed_length), with L the longest
    such match for t. Repetitions may not contain a sequence-breaker token.
    `window` limits the history searched (None: all of it).
    """

    name = "dry"

    def __init__(self, multiplier: float, base: float = 1.75, allowed_length: int = 2,
                 window: int | None = None, breakers: Sequence[int] = ()):
        self.multiplier = _real("dry_multiplier", multiplier, lo=0.0)
        self.base = _real("dry_base", base, lo=1.0)
        self.allowed_length = _integer("dry_allowed_length", allowed_length, lo=1)
        self.window = _window("dry_window", window)
        self.breakers = frozenset(_integer("dry_breakers", b, lo=0) for b in breakers)

    def match_lengths(self, history: Sequence[int]) -> dict[int, int]:
        """For each token t that would continue a repetition, its match length L."""
        h = [int(t) for t in history]
        if self.window is not None:
            h = h[len(h) - self.window:] if self.window else []
        n = len(h)
        if n < 2 or h[-1] in self.breakers:
            return {}
        # Matching suffixes of the history = matching prefixes of the reversed history.
        rev = h[::-1]
        z = _z_function(rev)
        # A repetition cannot reach back past the latest breaker.
        tail = next((i for i, t in enumerate(rev) if t in self.breakers), n)
        best: dict[int, int] = {}
        for k in range(1, n):
            length = min(z[k], tail)
            if length == 0:
                continue
            nxt = rev[k - 1]  # the token that followed this earlier occurrence
            if nxt in self.breakers:
                continue
            if length > best.get(nxt, 0):
                best[nxt] = length
        return best

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.multiplier == 0.0:
            return x
        for token, length in self.match_lengths(history).items():
            if length >= self.allowed_length and 0 <= token < x.size:
                exponent = length - self.allowed_length
                # Long matches overflow the power; an infinite penalty is the intended limit.
                penalty = self.multiplier * (self.base ** exponent if exponent * math.log(self.base) < 700
                                             else math.inf)
                x[token] -= penalty
        return x

    def __repr__(self) -> str:
        return f"DRY({self.multiplier}, base={self.base}, allowed_length={self.allowed_length})"


def _recent(history: Sequence[int], window: int | None) -> np.ndarray:
    h = np.asarray(list(history), dtype=np.int64)
    if window is not None:
        h = h[h.size - window:] if window else h[:0]
    return h


class RepetitionPenalty:
    """Penalise every token seen in the history (or its last `window` tokens).

    negative="multiply" (transformers and llama.cpp): positive logits are
    divided by the penalty, negative ones multiplied, so a penalty > 1 always
    lowers the token. negative="divide": every logit is divided, the rule as
    first published. Ids outside the vocabulary are ignored.
    """

    name = "repetition_penalty"

    def __init__(self, penalty: float, window: int | None = None, negative: str = "multiply"):
        self.penalty = _real("repetition_penalty", penalty, lo=0.0, lo_open=True)
        self.window = _window("repetition_window", window)
        if negative not in ("multiply", "divide"):
            _fail("repetition_negative", f"must be 'multiply' or 'divide', got {negative!r}")
        self.negative = negative

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        h = _recent(history, self.window)
        ids = np.unique(h[(h >= 0) & (h < x.size)])
        v = x[ids]
        if self.negative == "multiply":
            x[ids] = np.where(v < 0, v * self.penalty, v / self.penalty)
        else:
            x[ids] = v / self.penalty
        return x

    def __repr__(self) -> str:
        return f"RepetitionPenalty({self.penalty}, window={self.window}, negative={self.negative!r})"


class PresenceFrequencyPenalty:
    """llama.cpp's additive penalties over the last `window` tokens:
    logit -= count * frequency + (count > 0) * presence."""

    name = "presence_frequency"

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, window: int | None = 64):
        self.presence = _real("presence_penalty", presence)
        self.frequency = _real("frequency_penalty", frequency)
        self.window = _window("penalty_window", window)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        h = _recent(history, self.window)
        h = h[(h >= 0) & (h < x.size)]
        counts = np.bincount(h, minlength=x.size).astype(np.float64)
        return x - (counts * self.frequency + (counts > 0) * self.presence)

    def __repr__(self) -> str:
        return f"PresenceFrequencyPenalty(presence={self.presence}, frequency={self.frequency})"


class LogitBias:
    """Add a fixed bias per token id (-inf bans the token)."""

    name = "logit_bias"

    def __init__(self, bias: Mapping[int, float]):
        if not isinstance(bias, Mapping):
            _fail("logit_bias", f"must be a mapping token id -> bias, got {type(bias).__name__}")
        self.bias: dict[int, float] = {}
        for token, b in bias.items():
            token = _integer("logit_bias (token id)", token, lo=0)
            b = _real(f"logit_bias[{token}]", b, allow_inf=True)
            if b == math.inf:
                _fail(f"logit_bias[{token}]", "must not be +inf")
            self.bias[token] = b
        self._ids = np.array(list(self.bias), dtype=np.int64)
        self._values = np.array(list(self.bias.values()), dtype=np.float64)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self._ids.size and self._ids.max() >= x.size:
            _fail("logit_bias", f"token id {int(self._ids.max())} is outside the vocabulary ({x.size})")
        x[self._ids] += self._values
        return x

    def __repr__(self) -> str:
        return f"LogitBias({len(self.bias)} tokens)"


class BanTokens:
    """Mask the given token ids."""

    name = "banned_tokens"

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = np.array(sorted({_integer("banned_tokens", t, lo=0) for t in token_ids}),
                                  dtype=np.int64)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        if self.token_ids.size and self.token_ids[-1] >= x.size:
            _fail("banned_tokens", f"token id {int(self.token_ids[-1])} is outside the vocabulary ({x.size})")
        x[self.token_ids] = NEG_INF
        return x

    def __repr__(self) -> str:
        return f"BanTokens({self.token_ids.tolist()})"


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already in the history."""

    name = "no_repeat_ngram"

    def __init__(self, n: int):
        self.n = _integer("no_repeat_ngram_size", n, lo=1)

    def banned(self, history: Sequence[int]) -> np.ndarray:
        h = np.asarray(list(history), dtype=np.int64)
        n = self.n
        if h.size < n:
            return h[:0]
        windows = np.lib.stride_tricks.sliding_window_view(h, n)
        prefix = h[h.size - (n - 1):] if n > 1 else h[:0]
        hits = (windows[:, : n - 1] == prefix).all(axis=1)
        return np.unique(windows[hits, n - 1])

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        ids = self.banned(history)
        x[ids[(ids >= 0) & (ids < x.size)]] = NEG_INF
        return x

    def __repr__(self) -> str:
        return f"NoRepeatNGram({self.n})"


class Mirostat:
    """Mirostat v1: top-k with k chosen each step from an estimate of the
    Zipf exponent of the distribution, steering the surprise toward tau.

    s = least-squares Zipf exponent from the m most probable tokens,
    k = ((s - 1) * 2**mu / (1 - N**(1 - s))) ** (1 / s); after each draw
    mu -= eta * (surprise - tau), surprise = -log2 p(chosen). mu starts at 2*tau.
    """

    name = "mirostat"

    def __init__(self, tau: float = 5.0, eta: float = 0.1, m: int = 100):
        self.tau = _real("mirostat_tau", tau, lo=0.0)
        self.eta = _real("mirostat_eta", eta, lo=0.0)
        self.m = _integer("mirostat_m", m, lo=2)
        self.reset()

    def reset(self) -> None:
        self.mu = 2.0 * self.tau
        self.last_k: int | None = None

    def k_for(self, logits: np.ndarray) -> int:
        x = np.asarray(logits, dtype=np.float64)
        live = int(np.isfinite(x).sum())
        logp = np.sort(log_softmax(x))[::-1][: min(self.m, live)]
        if logp.size < 2:
            return 1
        i = np.arange(1, logp.size, dtype=np.float64)
        t = np.log((i + 1) / i)
        b = logp[:-1] - logp[1:]
        s = float((t * b).sum() / (t * t).sum())
        eps = s - 1.0
        with np.errstate(all="ignore"):
            k = ((eps * 2.0 ** self.mu) / (1.0 - float(x.size) ** (-eps))) ** (1.0 / s)
        if not np.isfinite(k) or k > live:
            return live
        return max(int(k), 1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        self.last_k = self.k_for(x)
        remove = np.ones(x.size, dtype=bool)
        remove[_top_indices(x, self.last_k)] = False
        return _masked(x, remove)

    def accept(self, token: int, probs: np.ndarray) -> None:
        surprise = -math.log2(float(probs[token]))
        self.mu -= self.eta * (surprise - self.tau)

    def __repr__(self) -> str:
        return f"Mirostat(tau={self.tau}, eta={self.eta})"


class MirostatV2:
    """Mirostat v2: remove tokens whose surprise -log2 p exceeds mu (keeping at
    least the most probable); after each draw mu -= eta * (surprise - tau),
    the surprise measured in the renormalised distribution. mu starts at 2*tau."""

    name = "mirostat"

    def __init__(self, tau: float = 5.0, eta: float = 0.1):
        self.tau = _real("mirostat_tau", tau, lo=0.0)
        self.eta = _real("mirostat_eta", eta, lo=0.0)
        self.reset()

    def reset(self) -> None:
        self.mu = 2.0 * self.tau

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = _f64(logits)
        surprise = -log_softmax(x) / math.log(2.0)
        remove = surprise > self.mu
        remove[int(np.argmax(x))] = False
        return _masked(x, remove)

    def accept(self, token: int, probs: np.ndarray) -> None:
        surprise = -math.log2(float(probs[token]))
        self.mu -= self.eta * (surprise - self.tau)

    def __repr__(self) -> str:
        return f"MirostatV2(tau={self.tau}, eta={self.eta})"


# ---------------------------------------------------------------- chain

def _name_of(proc: Any) -> str:
    return getattr(proc, "name", None) or getattr(proc, "__name__", None) or type(proc).__name__


class Chain:
    """Processors applied in order; the input is checked (NaN, shape) first."""

    def __init__(self, processors: Sequence[Processor] = ()):
        for p in processors:
            if not callable(p):
                _fail("processors", f"{p!r} is not callable")
        self.processors = list(processors)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (),
                 observe: Callable[[Processor, np.ndarray], None] | None = None) -> np.ndarray:
        """The logits after every processor; `observe(proc, x)` sees each stage's output."""
        x = check_logits(logits)
        for proc in self.processors:
            x = np.asarray(proc(x, history), dtype=np.float64)
            if x.ndim != 1 or np.isnan(x).any() or np.isposinf(x).any():
                raise ValueError(f"processor {_name_of(proc)!r} returned NaN, +inf or a wrong shape")
            if observe is not None:
                observe(proc, x)
        return x

    def accept(self, token: int, probs: np.ndarray) -> None:
        for proc in self.processors:
            if hasattr(proc, "accept"):
                proc.accept(token, probs)

    def reset(self) -> None:
        for proc in self.processors:
            if hasattr(proc, "reset"):
                proc.reset()

    @property
    def names(self) -> list[str]:
        return [_name_of(p) for p in self.processors]

    def __iter__(self):
        return iter(self.processors)

    def __len__(self) -> int:
        return len(self.processors)

    def __repr__(self) -> str:
        return "Chain([" + ", ".join(repr(p) for p in self.processors) + "])"


ORDERS: dict[str, tuple[str, ...]] = {
    "hf": ("logit_bias", "repetition_penalty", "presence_frequency", "dry", "no_repeat_ngram",
           "banned_tokens", "temperature", "top_n_sigma", "top_k", "top_p", "min_p", "typical_p",
           "epsilon", "eta", "xtc", "mirostat"),
    "llama.cpp": ("logit_bias", "banned_tokens", "no_repeat_ngram", "repetition_penalty",
                  "presence_frequency", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p",
                  "xtc", "epsilon", "eta", "temperature", "mirostat"),
}
DEFAULT_ORDER = "hf"
STAGES = frozenset(ORDERS["hf"])
_TRUNCATION = ("top_n_sigma", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "xtc")


@dataclass
class SamplingConfig:
    """Every decoding option; the defaults sample from the model's own distribution.

    Validated on construction, so a bad option fails before any model work.
    See the module docstring for `order` and the conventions chosen.
    """

    temperature: float = 1.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 0
    top_k_ties: str = "keep"
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float | None = None
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_window: int | None = None
    dry_breakers: Sequence[int] = ()
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    repetition_penalty: float = 1.0
    repetition_window: int | None = None
    repetition_negative: str = "multiply"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_window: int | None = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    no_repeat_ngram_size: int = 0
    min_keep: int = 1
    order: str | Sequence[str | Processor] = DEFAULT_ORDER
    processors: Sequence[Processor] = ()

    def __post_init__(self) -> None:
        # Building every stage validates its parameters; the chain is rebuilt per use
        # so stateful stages (mirostat) start fresh.
        self.build()

    def _stages(self) -> dict[str, Processor]:
        """The stages the options switch on, by name (validating each)."""
        s: dict[str, Processor] = {}
        mk = self.min_keep
        _integer("min_keep", mk, lo=1)
        if self.logit_bias:
            s["logit_bias"] = LogitBias(self.logit_bias)
        rep = RepetitionPenalty(self.repetition_penalty, self.repetition_window, self.repetition_negative)
        if rep.penalty != 1.0:
            s["repetition_penalty"] = rep
        pf = PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty, self.penalty_window)
        if pf.presence or pf.frequency:
            s["presence_frequency"] = pf
        dry = DRY(self.dry_multiplier, self.dry_base, self.dry_allowed_length, self.dry_window,
                  self.dry_breakers)
        if dry.multiplier:
            s["dry"] = dry
        if _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, lo=0):
            s["no_repeat_ngram"] = NoRepeatNGram(self.no_repeat_ngram_size)
        ban = BanTokens(self.banned_tokens)
        if ban.token_ids.size:
            s["banned_tokens"] = ban
        temp = Temperature(self.temperature)
        if _real("dynatemp_range", self.dynatemp_range, lo=0.0) > 0.0:
            s["temperature"] = DynamicTemperature(self.temperature, self.dynatemp_range,
                                                  self.dynatemp_exponent)
        else:
            _real("dynatemp_exponent", self.dynatemp_exponent, lo=0.0)
            if temp.temperature != 1.0:
                s["temperature"] = temp
        if self.top_n_sigma is not None:
            s["top_n_sigma"] = TopNSigma(self.top_n_sigma)
        top_k = TopK(self.top_k, mk, self.top_k_ties)
        if top_k.k:
            s["top_k"] = top_k
        if TopP(self.top_p, mk).p < 1.0:
            s["top_p"] = TopP(self.top_p, mk)
        if MinP(self.min_p, mk).p > 0.0:
            s["min_p"] = MinP(self.min_p, mk)
        if _real("typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True) < 1.0:
            s["typical_p"] = TypicalP(self.typical_p, mk)
        if _real("epsilon_cutoff", self.epsilon_cutoff, lo=0.0, hi=1.0, hi_open=True) > 0.0:
            s["epsilon"] = EpsilonCutoff(self.epsilon_cutoff, mk)
        if _real("eta_cutoff", self.eta_cutoff, lo=0.0, hi=1.0, hi_open=True) > 0.0:
            s["eta"] = EtaCutoff(self.eta_cutoff, mk)
        xtc = XTC(self.xtc_threshold, self.xtc_probability, mk)
        if xtc.probability > 0.0:
            s["xtc"] = xtc
        version = _integer("mirostat", self.mirostat, lo=0)
        if version == 1:
            s["mirostat"] = Mirostat(self.mirostat_tau, self.mirostat_eta)
        elif version == 2:
            s["mirostat"] = MirostatV2(self.mirostat_tau, self.mirostat_eta)
        elif version != 0:
            _fail("mirostat", f"must be 0 (off), 1 or 2, got {version}")
        else:
            MirostatV2(self.mirostat_tau, self.mirostat_eta)
        if "mirostat" in s:
            clash = [n for n in _TRUNCATION if n in s]
            if clash:
                _fail("mirostat", f"replaces the truncation samplers; do not combine it with {clash}")
        return s

    def build(self) -> Chain:
        """A fresh Chain for these options, in `order`."""
        stages = self._stages()
        for p in self.processors:
            if not callable(p):
                _fail("processors", f"{p!r} is not callable")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                _fail("order", f"must be one of {sorted(ORDERS)} or a sequence of stage names, "
                               f"got {self.order!r}")
            order: list = list(ORDERS[self.order])
        else:
            order = list(self.order)
            for item in order:
                if isinstance(item, str) and item not in STAGES:
                    _fail("order", f"unknown stage {item!r}; known: {sorted(STAGES)}")
                if not isinstance(item, str) and not callable(item):
                    _fail("order", f"{item!r} is neither a stage name nor a processor")
            named = [i for i in order if isinstance(i, str)]
            if len(set(named)) != len(named):
                _fail("order", "names a stage twice")
            missing = [n for n in stages if n not in named]
            if missing:
                _fail("order", f"options are set for {missing} but the order leaves them out")
        procs: list[Processor] = []
        for item in order:
            if not isinstance(item, str):
                procs.append(item)
            elif item == "mirostat":
                continue
            elif item in stages:
                procs.append(stages[item])
        procs.extend(self.processors)
        # Mirostat's truncation must see the final distribution it steers.
        if "mirostat" in stages:
            procs.append(stages["mirostat"])
        return Chain(procs)

    def replace(self, **changes: Any) -> "SamplingConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingConfig(**values)


SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplingConfig))


def make_chain(config: SamplingConfig | None = None, **options: Any) -> Chain:
    """Build the processor chain from a SamplingConfig and/or keyword options."""
    unknown = set(options) - SAMPLING_OPTIONS
    if unknown:
        raise ValueError(f"unknown sampling option(s): {sorted(unknown)}")
    cfg = config.replace(**options) if config is not None else SamplingConfig(**options)
    return cfg.build()


# ---------------------------------------------------------------- sampler

@dataclass
class Draw:
    token: int
    logits: np.ndarray  # after the chain
    probs: np.ndarray   # the distribution the token was drawn from


class Sampler:
    """A chain plus a seeded numpy Generator: the same seed, logits and history
    give the same tokens, bit for bit. Exactly one uniform number is drawn per
    step; random processors (XTC) get their own generators spawned from the
    same seed. seed=None takes fresh OS entropy, recorded in `self.seed` so the
    run can be repeated.
    """

    def __init__(self, chain: Chain | SamplingConfig | Sequence[Processor] | None = None,
                 seed: int | None = None, **options: Any):
        if isinstance(chain, SamplingConfig):
            chain = make_chain(chain, **options)
        elif chain is None:
            chain = make_chain(**options)
        elif options:
            raise ValueError("pass either a chain or sampling options, not both")
        elif not isinstance(chain, Chain):
            chain = Chain(chain)
        self.chain = chain
        if seed is not None:
            _integer("seed", seed, lo=0)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random streams (from `seed`, or the current seed) and the stateful stages."""
        if seed is None:
            seed = getattr(self, "seed", None)
        ss = np.random.SeedSequence(seed)
        self.seed = ss.entropy
        children = ss.spawn(1 + len(self.chain))
        self.rng = np.random.Generator(np.random.PCG64(children[0]))
        for proc, child in zip(self.chain, children[1:]):
            if hasattr(proc, "bind_rng"):
                proc.bind_rng(np.random.Generator(np.random.PCG64(child)))
        self.chain.reset()

    def step(self, logits: np.ndarray, history: Sequence[int] = (),
             observe: Callable[[Processor, np.ndarray], None] | None = None) -> Draw:
        """Run the chain and draw one token; `observe(proc, x)` sees each processor's output
        (the journey records the chain stage by stage through it)."""
        processed = self.chain(logits, history, observe)
        probs = softmax(processed)
        token = draw(probs, self.rng)
        self.chain.accept(token, probs)
        return Draw(token, processed, probs)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        return self.step(logits, history).token

    __call__ = sample


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with one uniform number; zero-probability tokens are never chosen."""
    support = np.flatnonzero(probs > 0)  # the same partial sums as over every token: zeros add nothing
    cdf = np.cumsum(probs[support])
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(support[min(j, support.size - 1)])  # u * total may round up to the total
