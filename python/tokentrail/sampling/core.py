"""The core path: a chain made only of the hot stages runs in the C++ core.

:func:`compile_chain` turns a :class:`~tokentrail.sampling.chain.Chain` into a
``_core.SamplerChain`` when every processor is one the core implements
(repetition and presence/frequency penalties, temperature, top-k, top-p,
min-p, each at most once, with parameters in the ranges where the core's
arithmetic is the reference's), and returns None otherwise: the Python
processors then run, as they always can. The core follows the Python
processors operation for operation in float64, but reads the model's float32
logits in place, scans the vocabulary once (validation and the first
truncation) and hands only the surviving candidates to the later stages.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _core
from .chain import Chain
from .processors import MinP, PresenceFrequencyPenalty, RepetitionPenalty, Temperature, TopK, TopP

# Stage kinds of cpp/include/tokentrail/sampler.h.
REPETITION, PRESENCE_FREQUENCY, TEMPERATURE, TOP_K, TOP_P, MIN_P = range(6)
# Within these bounds no logit can overflow or lose its order when divided by the temperature.
SAFE_LOW, SAFE_HIGH = 1e-30, 1e30

_NO_HISTORY = np.empty(0, dtype=np.int64)


def _stage(proc) -> tuple | None:
    """The core stage tuple (kind, a, b, k, min_keep, window, flag) of `proc`, or None."""
    kind = type(proc)
    if kind is Temperature:
        t = proc.temperature
        if t == 0.0:  # greedy: the argmax, the first one on ties = top-k 1 keeping exactly one
            return (TOP_K, 0.0, 0.0, 1, 1, -1, True)
        return (TEMPERATURE, t, 0.0, 0, 1, -1, False) if SAFE_LOW <= t <= SAFE_HIGH else None
    if kind is TopK:
        return (TOP_K, 0.0, 0.0, proc.k, proc.min_keep, -1, proc.ties == "cut")
    if kind is TopP:
        return (TOP_P, proc.p, 0.0, 0, proc.min_keep, -1, False)
    if kind is MinP:
        return (MIN_P, proc.p, 0.0, 0, proc.min_keep, -1, False)
    if kind is RepetitionPenalty:
        if not SAFE_LOW <= proc.penalty <= SAFE_HIGH:
            return None
        window = -1 if proc.window is None else proc.window
        return (REPETITION, proc.penalty, 0.0, 0, 1, window, proc.negative == "divide")
    if kind is PresenceFrequencyPenalty:
        if abs(proc.presence) > SAFE_HIGH or abs(proc.frequency) > SAFE_HIGH:
            return None
        window = -1 if proc.window is None else proc.window
        return (PRESENCE_FREQUENCY, proc.presence, proc.frequency, 0, 1, window, False)
    return None


class CoreChain:
    """A chain compiled for the core, with the part of the history its penalties read."""

    def __init__(self, stages: list[tuple]):
        self.stages = stages
        self._chain = _core.SamplerChain(stages)
        windows = [s[5] for s in stages if s[0] in (REPETITION, PRESENCE_FREQUENCY)]
        # None: no penalty reads the history; -1: the whole of it; else the last n tokens.
        self.history_needed: int | None = (None if not windows else -1 if -1 in windows else max(windows))

    def history(self, history: Sequence[int]) -> np.ndarray:
        n = self.history_needed
        if n is None or n == 0:
            return _NO_HISTORY
        return np.asarray(history if n < 0 else history[max(0, len(history) - n):], dtype=np.int64)

    def keep(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept ids ascending, their logits after the chain, their probabilities); ValueError on bad logits."""
        return self._chain.keep(logits, self.history(history))


def compile_chain(chain: Chain) -> CoreChain | None:
    """`chain` for the core, or None when one of its processors runs only in Python."""
    stages = []
    seen = set()
    for proc in chain:
        stage = _stage(proc)
        if stage is None or type(proc) in seen:
            return None
        seen.add(type(proc))
        stages.append(stage)
    return CoreChain(stages)


def draw_kept(ids: np.ndarray, probs: np.ndarray, u: float) -> int:
    """The core's inverse-CDF draw (the same rule as :func:`tokentrail.sampling.sampler.draw`)."""
    return int(_core.draw_token(ids, probs, u))
