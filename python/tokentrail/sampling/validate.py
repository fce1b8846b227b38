"""The one set of option and logit checks every part of the sampling package uses.

Each check names the parameter and the valid range in an InvalidArgumentError.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError


def fail(name: str, message: str) -> None:
    raise InvalidArgumentError(f"{name}: {message}")


def check_real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float, or a ValueError that names the parameter and the valid range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, f"must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        fail(name, "must not be NaN")
    if math.isinf(v) and not allow_inf:
        fail(name, f"must be finite, got {v}")
    lo_s = "(" if lo_open else "["
    hi_s = ")" if hi_open else "]"
    rng = f"{lo_s}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_s}"
    if lo is not None and (v < lo or (lo_open and v == lo)):
        fail(name, f"must be in {rng}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        fail(name, f"must be in {rng}, got {v}")
    return v


def check_integer(name: str, value: Any, *, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, f"must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        fail(name, f"must be >= {lo}, got {v}")
    return v


def check_window(name: str, value: Any) -> int | None:
    return None if value is None else check_integer(name, value, lo=0)


def check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """A float64 copy of a 1-D logit vector, refusing NaN, +inf and all-masked input."""
    x = np.array(logits, dtype=np.float64, copy=True)
    if x.ndim != 1 or x.size == 0:
        fail(name, f"must be a non-empty 1-D array over the vocabulary, got shape {x.shape}")
    if np.isnan(x).any():
        fail(name, f"contain NaN at positions {np.flatnonzero(np.isnan(x))[:8].tolist()}")
    if np.isposinf(x).any():
        fail(name, f"contain +inf at positions {np.flatnonzero(np.isposinf(x))[:8].tolist()}")
    if not np.isfinite(x).any():
        fail(name, "every token is masked (-inf); nothing can be sampled")
    return x

