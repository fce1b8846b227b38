"""The processors, one class per sampler: the readable reference of every stage.

A processor is a callable ``proc(logits, history) -> logits`` over the whole
vocabulary (see the package docstring). The classes that the options of
:class:`~tokentrail.sampling.SamplingConfig` switch on are registered by their
stage name with :func:`register`; each says how it is built from the options
(``from_config``, which validates them and returns None when the stage is
off) and whether it truncates the distribution (``truncates``). Adding a
sampler is adding one such class, its options to SamplingConfig and its name
to the orders in :mod:`tokentrail.sampling.chain`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .numerics import (NEG_INF, as_f64, divide_by_temperature, entropy, greedy_mask, keep_top, log_softmax,
                       masked, softmax, top_indices)
from .validate import check_integer, check_real, check_window, fail

if TYPE_CHECKING:
    from .chain import SamplingConfig

Processor = Callable[[np.ndarray, Sequence[int]], np.ndarray]

# Stage name -> the class that builds that stage from a SamplingConfig.
REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Register `cls` as the builder of the stage `cls.name` (a class decorator)."""
    if cls.name in REGISTRY:
        raise RuntimeError(f"stage {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


@register
class Temperature:
    """Divide logits by T. T = 0 is greedy: only the argmax survives."""

    name = "temperature"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        """Temperature, or DynamicTemperature when dynatemp_range > 0; None at T = 1."""
        temp = cls(cfg.temperature)
        if check_real("dynatemp_range", cfg.dynatemp_range, lo=0.0) > 0.0:
            return DynamicTemperature(cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent)
        check_real("dynatemp_exponent", cfg.dynatemp_exponent, lo=0.0)
        return temp if temp.temperature != 1.0 else None

    def __init__(self, temperature: float):
        self.temperature = check_real("temperature", temperature, lo=0.0)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self.temperature == 0.0:
            return greedy_mask(x)
        return divide_by_temperature(x, self.temperature)

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
    truncates = False

    def __init__(self, temperature: float, range: float, exponent: float = 1.0):
        self.temperature = check_real("temperature", temperature, lo=0.0)
        self.range = check_real("dynatemp_range", range, lo=0.0)
        self.exponent = check_real("dynatemp_exponent", exponent, lo=0.0)
        self.last_temperature: float | None = None

    def temperature_for(self, logits: np.ndarray) -> float:
        x = np.asarray(logits, dtype=np.float64)
        n = int(np.isfinite(x).sum())
        if n <= 1:
            return self.temperature
        t_min = max(0.0, self.temperature - self.range)
        t_max = self.temperature + self.range
        normalized = entropy(softmax(x)) / math.log(n)
        return t_min + (t_max - t_min) * min(1.0, normalized) ** self.exponent

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        t = self.temperature_for(x)
        self.last_temperature = t
        return greedy_mask(x) if t <= 0.0 else divide_by_temperature(x, t)

    def __repr__(self) -> str:
        return f"DynamicTemperature({self.temperature}, range={self.range}, exponent={self.exponent})"


@register
class TopK:
    """Keep the k highest logits. k = 0 disables.

    ties="keep" keeps every token tied with the k-th (transformers);
    ties="cut" keeps exactly k (llama.cpp), lower token ids first among ties.
    """

    name = "top_k"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        top_k = cls(cfg.top_k, cfg.min_keep, cfg.top_k_ties)
        return top_k if top_k.k else None

    def __init__(self, k: int, min_keep: int = 1, ties: str = "keep"):
        self.k = check_integer("top_k", k, lo=0)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)
        if ties not in ("keep", "cut"):
            fail("top_k_ties", f"must be 'keep' or 'cut', got {ties!r}")
        self.ties = ties

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        k = max(self.k, self.min_keep)
        if self.k == 0 or k >= x.size:
            return x
        if self.ties == "cut":
            remove = np.ones(x.size, dtype=bool)
            remove[top_indices(x, k)] = False
            return masked(x, remove)
        kth = np.partition(x, x.size - k)[x.size - k]
        return masked(x, x < kth)

    def __repr__(self) -> str:
        return f"TopK({self.k}, ties={self.ties!r})"


@register
class TopP:
    """Nucleus sampling: keep the most probable tokens until their mass reaches p.

    Token i (in order of decreasing probability) is kept iff the mass of the
    tokens before it is < p, which is the smallest prefix with mass >= p.
    """

    name = "top_p"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        top_p = cls(cfg.top_p, cfg.min_keep)
        return top_p if top_p.p < 1.0 else None

    def __init__(self, p: float, min_keep: int = 1):
        self.p = check_real("top_p", p, lo=0.0, hi=1.0, lo_open=True)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self.p >= 1.0:
            return x
        # Masked tokens have no mass and sort last: only the finite ones are
        # sorted (ascending indices, so ties keep the lower index first).
        live = np.flatnonzero(np.isfinite(x))
        order = live[top_indices(x[live], live.size)]
        sorted_p = softmax(x[order])
        mass_before = np.cumsum(sorted_p) - sorted_p
        keep_sorted = mass_before < self.p
        keep_sorted[: self.min_keep] = True
        remove = np.ones(x.size, dtype=bool)
        remove[order[keep_sorted]] = False
        return masked(x, remove)

    def __repr__(self) -> str:
        return f"TopP({self.p})"


@register
class MinP:
    """Keep tokens with p >= min_p * p_max, i.e. logit >= max_logit + log(min_p)."""

    name = "min_p"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        min_p = cls(cfg.min_p, cfg.min_keep)
        return min_p if min_p.p > 0.0 else None

    def __init__(self, p: float, min_keep: int = 1):
        self.p = check_real("min_p", p, lo=0.0, hi=1.0)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self.p == 0.0:
            return x
        # The log domain stays exact where probabilities underflow (tiny temperatures).
        remove = (x - x.max()) < math.log(self.p)
        return masked(x, keep_top(remove, x, self.min_keep))

    def __repr__(self) -> str:
        return f"MinP({self.p})"


@register
class TypicalP:
    """Locally typical sampling: keep the tokens whose surprise -log p is closest
    to the entropy H, in that order, until their mass reaches `mass`."""

    name = "typical_p"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        if check_real("typical_p", cfg.typical_p, lo=0.0, hi=1.0, lo_open=True) < 1.0:
            return cls(cfg.typical_p, cfg.min_keep)
        return None

    def __init__(self, mass: float, min_keep: int = 1):
        self.mass = check_real("typical_p", mass, lo=0.0, hi=1.0, lo_open=True)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self.mass >= 1.0:
            return x
        logp = log_softmax(x)
        p = np.exp(logp)
        h = entropy(p)
        distance = np.abs(-logp - h)  # inf for masked tokens, so they sort last
        order = np.argsort(distance, kind="stable")
        cum = np.cumsum(p[order])
        last = min(int((cum < self.mass).sum()), x.size - 1)
        remove = distance > distance[order[last]]
        remove[order[: self.min_keep]] = False
        return masked(x, remove)

    def __repr__(self) -> str:
        return f"TypicalP({self.mass})"


@register
class EpsilonCutoff:
    """Epsilon sampling: remove tokens with probability < epsilon."""

    name = "epsilon"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        if check_real("epsilon_cutoff", cfg.epsilon_cutoff, lo=0.0, hi=1.0, hi_open=True) > 0.0:
            return cls(cfg.epsilon_cutoff, cfg.min_keep)
        return None

    def __init__(self, epsilon: float, min_keep: int = 1):
        self.epsilon = check_real("epsilon_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        remove = softmax(x) < self.epsilon
        return masked(x, keep_top(remove, x, self.min_keep))

    def __repr__(self) -> str:
        return f"EpsilonCutoff({self.epsilon})"


@register
class EtaCutoff:
    """Eta sampling: remove tokens with probability < min(eta, sqrt(eta) * exp(-H))."""

    name = "eta"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        if check_real("eta_cutoff", cfg.eta_cutoff, lo=0.0, hi=1.0, hi_open=True) > 0.0:
            return cls(cfg.eta_cutoff, cfg.min_keep)
        return None

    def __init__(self, epsilon: float, min_keep: int = 1):
        self.epsilon = check_real("eta_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        p = softmax(x)
        eta = min(self.epsilon, math.sqrt(self.epsilon) * math.exp(-entropy(p)))
        return masked(x, keep_top(p < eta, x, self.min_keep))

    def __repr__(self) -> str:
        return f"EtaCutoff({self.epsilon})"


@register
class TopNSigma:
    """Keep logits >= max - n * sigma, sigma the (population) standard deviation
    of the unmasked logits. Scaling by a temperature leaves the kept set unchanged."""

    name = "top_n_sigma"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        return cls(cfg.top_n_sigma) if cfg.top_n_sigma is not None else None

    def __init__(self, n: float):
        self.n = check_real("top_n_sigma", n, lo=0.0, lo_open=True)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        live = x[np.isfinite(x)]
        if live.size <= 1:
            return x
        return masked(x, x < live.max() - self.n * live.std())

    def __repr__(self) -> str:
        return f"TopNSigma({self.n})"


@register
class XTC:
    """Exclude Top Choices: with probability `probability`, when at least two
    tokens have p >= threshold, remove all of them except the least probable.

    One uniform number is drawn per call (when probability > 0) from the
    processor's own generator, which a Sampler binds from its seed.
    """

    name = "xtc"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        xtc = cls(cfg.xtc_threshold, cfg.xtc_probability, cfg.min_keep)
        return xtc if xtc.probability > 0.0 else None

    def __init__(self, threshold: float, probability: float, min_keep: int = 1,
                 seed: int | np.random.Generator = 0):
        self.threshold = check_real("xtc_threshold", threshold, lo=0.0, hi=1.0)
        self.probability = check_real("xtc_probability", probability, lo=0.0, hi=1.0)
        self.min_keep = check_integer("min_keep", min_keep, lo=1)
        self.bind_rng(seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed))
        self.last_triggered = False

    def bind_rng(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        self.last_triggered = False
        if self.probability <= 0.0 or self.rng.random() >= self.probability:
            return x
        order = top_indices(x, x.size)
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
        return masked(x, remove)

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


@register
class DRY:
    """"Don't Repeat Yourself": penalise tokens that would extend a repetition.

    If the last L tokens of the history also occur earlier followed by token t,
    emitting t would repeat L + 1 tokens; when L >= allowed_length, t's logit is
    lowered by multiplier * base ** (L - allowed_length), with L the longest
    such match for t. Repetitions may not contain a sequence-breaker token.
    `window` limits the history searched (None: all of it).
    """

    name = "dry"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        dry = cls(cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length, cfg.dry_window, cfg.dry_breakers)
        return dry if dry.multiplier else None

    def __init__(self, multiplier: float, base: float = 1.75, allowed_length: int = 2,
                 window: int | None = None, breakers: Sequence[int] = ()):
        self.multiplier = check_real("dry_multiplier", multiplier, lo=0.0)
        self.base = check_real("dry_base", base, lo=1.0)
        self.allowed_length = check_integer("dry_allowed_length", allowed_length, lo=1)
        self.window = check_window("dry_window", window)
        self.breakers = frozenset(check_integer("dry_breakers", b, lo=0) for b in breakers)

    def match_lengths(self, history: Sequence[int]) -> dict[int, int]:
        """For each token t that would continue a repetition, its match length L."""
        h = [int(t) for t in history]
        if self.window is not None:
            h = h[max(0, len(h) - self.window):] if self.window else []
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
        x = as_f64(logits)
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
        h = h[max(0, h.size - window):] if window else h[:0]
    return h


@register
class RepetitionPenalty:
    """Penalise every token seen in the history (or its last `window` tokens).

    negative="multiply" (transformers and llama.cpp): positive logits are
    divided by the penalty, negative ones multiplied, so a penalty > 1 always
    lowers the token. negative="divide": every logit is divided, the rule as
    first published. Ids outside the vocabulary are ignored.
    """

    name = "repetition_penalty"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        rep = cls(cfg.repetition_penalty, cfg.repetition_window, cfg.repetition_negative)
        return rep if rep.penalty != 1.0 else None

    def __init__(self, penalty: float, window: int | None = None, negative: str = "multiply"):
        self.penalty = check_real("repetition_penalty", penalty, lo=0.0, lo_open=True)
        self.window = check_window("repetition_window", window)
        if negative not in ("multiply", "divide"):
            fail("repetition_negative", f"must be 'multiply' or 'divide', got {negative!r}")
        self.negative = negative

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
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


@register
class PresenceFrequencyPenalty:
    """llama.cpp's additive penalties over the last `window` tokens:
    logit -= count * frequency + (count > 0) * presence."""

    name = "presence_frequency"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        pf = cls(cfg.presence_penalty, cfg.frequency_penalty, cfg.penalty_window)
        return pf if pf.presence or pf.frequency else None

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, window: int | None = 64):
        self.presence = check_real("presence_penalty", presence)
        self.frequency = check_real("frequency_penalty", frequency)
        self.window = check_window("penalty_window", window)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        h = _recent(history, self.window)
        h = h[(h >= 0) & (h < x.size)]
        counts = np.bincount(h, minlength=x.size).astype(np.float64)
        return x - (counts * self.frequency + (counts > 0) * self.presence)

    def __repr__(self) -> str:
        return f"PresenceFrequencyPenalty(presence={self.presence}, frequency={self.frequency})"


@register
class LogitBias:
    """Add a fixed bias per token id (-inf bans the token)."""

    name = "logit_bias"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        return cls(cfg.logit_bias) if cfg.logit_bias else None

    def __init__(self, bias: Mapping[int, float]):
        if not isinstance(bias, Mapping):
            fail("logit_bias", f"must be a mapping token id -> bias, got {type(bias).__name__}")
        self.bias: dict[int, float] = {}
        for token, b in bias.items():
            token = check_integer("logit_bias (token id)", token, lo=0)
            b = check_real(f"logit_bias[{token}]", b, allow_inf=True)
            if b == math.inf:
                fail(f"logit_bias[{token}]", "must not be +inf")
            self.bias[token] = b
        self._ids = np.array(list(self.bias), dtype=np.int64)
        self._values = np.array(list(self.bias.values()), dtype=np.float64)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self._ids.size and self._ids.max() >= x.size:
            fail("logit_bias", f"token id {int(self._ids.max())} is outside the vocabulary ({x.size})")
        x[self._ids] += self._values
        return x

    def __repr__(self) -> str:
        return f"LogitBias({len(self.bias)} tokens)"


@register
class BanTokens:
    """Mask the given token ids."""

    name = "banned_tokens"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        ban = cls(cfg.banned_tokens)
        return ban if ban.token_ids.size else None

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = np.array(sorted({check_integer("banned_tokens", t, lo=0) for t in token_ids}),
                                  dtype=np.int64)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        if self.token_ids.size and self.token_ids[-1] >= x.size:
            fail("banned_tokens", f"token id {int(self.token_ids[-1])} is outside the vocabulary ({x.size})")
        x[self.token_ids] = NEG_INF
        return x

    def __repr__(self) -> str:
        return f"BanTokens({self.token_ids.tolist()})"


@register
class NoRepeatNGram:
    """Ban every token that would complete an n-gram already in the history."""

    name = "no_repeat_ngram"
    truncates = False

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        if check_integer("no_repeat_ngram_size", cfg.no_repeat_ngram_size, lo=0):
            return cls(cfg.no_repeat_ngram_size)
        return None

    def __init__(self, n: int):
        self.n = check_integer("no_repeat_ngram_size", n, lo=1)

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
        x = as_f64(logits)
        ids = self.banned(history)
        x[ids[(ids >= 0) & (ids < x.size)]] = NEG_INF
        return x

    def __repr__(self) -> str:
        return f"NoRepeatNGram({self.n})"


@register
class Mirostat:
    """Mirostat v1: top-k with k chosen each step from an estimate of the
    Zipf exponent of the distribution, steering the surprise toward tau.

    s = least-squares Zipf exponent from the m most probable tokens,
    k = ((s - 1) * 2**mu / (1 - N**(1 - s))) ** (1 / s); after each draw
    mu -= eta * (surprise - tau), surprise = -log2 p(chosen). mu starts at 2*tau.
    """

    name = "mirostat"
    truncates = True

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> Processor | None:
        """Mirostat (v1) or MirostatV2 by `cfg.mirostat`; None when it is 0."""
        version = check_integer("mirostat", cfg.mirostat, lo=0)
        if version == 1:
            return cls(cfg.mirostat_tau, cfg.mirostat_eta)
        if version == 2:
            return MirostatV2(cfg.mirostat_tau, cfg.mirostat_eta)
        if version != 0:
            fail("mirostat", f"must be 0 (off), 1 or 2, got {version}")
        MirostatV2(cfg.mirostat_tau, cfg.mirostat_eta)  # validates tau and eta even when off
        return None

    def __init__(self, tau: float = 5.0, eta: float = 0.1, m: int = 100):
        self.tau = check_real("mirostat_tau", tau, lo=0.0)
        self.eta = check_real("mirostat_eta", eta, lo=0.0)
        self.m = check_integer("mirostat_m", m, lo=2)
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
        x = as_f64(logits)
        self.last_k = self.k_for(x)
        remove = np.ones(x.size, dtype=bool)
        remove[top_indices(x, self.last_k)] = False
        return masked(x, remove)

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
    truncates = True

    def __init__(self, tau: float = 5.0, eta: float = 0.1):
        self.tau = check_real("mirostat_tau", tau, lo=0.0)
        self.eta = check_real("mirostat_eta", eta, lo=0.0)
        self.reset()

    def reset(self) -> None:
        self.mu = 2.0 * self.tau

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        x = as_f64(logits)
        surprise = -log_softmax(x) / math.log(2.0)
        remove = surprise > self.mu
        remove[int(np.argmax(x))] = False
        return masked(x, remove)

    def accept(self, token: int, probs: np.ndarray) -> None:
        surprise = -math.log2(float(probs[token]))
        self.mu -= self.eta * (surprise - self.tau)

    def __repr__(self) -> str:
        return f"MirostatV2(tau={self.tau}, eta={self.eta})"

