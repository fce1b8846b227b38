"""The shared numerics of the sampling package: one softmax, one log-softmax,
and the small helpers the processors build on (float64 throughout)."""
from __future__ import annotations

import math

import numpy as np

from .validate import fail

NEG_INF = -math.inf


def as_f64(logits: np.ndarray) -> np.ndarray:
    return np.array(logits, dtype=np.float64, copy=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Exact float64 log-probabilities; -inf logits get -inf."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    if not np.isfinite(m):
        fail("logits", "every token is masked (-inf); nothing can be sampled")
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
        fail("logits", "every token is masked (-inf); nothing can be sampled")
    live = np.flatnonzero(x > NEG_INF)
    if live.size * 4 < x.size:
        e = np.exp(x[live] - m)
        out = np.zeros_like(x)
        out[live] = e / e.sum()
        return out
    e = np.exp(x - m)
    return e / e.sum()


def entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, highest first, lower index first among ties."""
    return np.argsort(-x, kind="stable")[:k]


def keep_top(remove: np.ndarray, x: np.ndarray, min_keep: int) -> np.ndarray:
    """Never remove the `min_keep` highest logits (and their ties at the boundary)."""
    if min_keep <= 0:
        return remove
    k = min(min_keep, x.size)
    kth = np.partition(x, x.size - k)[x.size - k]
    return remove & (x < kth)


def masked(x: np.ndarray, remove: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[remove] = NEG_INF
    return out


def greedy_mask(logits: np.ndarray) -> np.ndarray:
    """Keep only the argmax (the first one on ties)."""
    x = as_f64(logits)
    i = int(np.argmax(x))
    out = np.full_like(x, NEG_INF)
    out[i] = x[i]
    return out


def divide_by_temperature(x: np.ndarray, t: float) -> np.ndarray:
    """x / t in float64; when that would overflow (tiny t), the max is subtracted first,
    which leaves the distribution unchanged and keeps it exact."""
    with np.errstate(over="ignore"):
        y = x / t
    if (np.isinf(y) & np.isfinite(x)).any():
        with np.errstate(over="ignore"):
            y = (x - x.max()) / t
    return y

