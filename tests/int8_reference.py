"""Numpy reference of the int8-activation products (cpp/src/kernels/int8_impl.h).

Activations are rounded per 32-value block: scale = max|x| / 127 and
q = round-half-even(x * (127 / max|x|)) in float32. The product of the rounded
activations (q * scale, exactly) with the dequantized weights is then taken
in float64, so it differs from the kernels' only by their float rounding: the
kernels' integer sums are exact.
"""
from __future__ import annotations

import numpy as np

from tokentrail.loading.quant import dequantize


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [n, K] (K a multiple of 32) to int8 q [n, K] and float32 scales [n, K / 32]."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    blocks = x.reshape(n, k // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    v = np.clip(blocks * inv[:, :, None], -127, 127)
    q = np.rint(v).astype(np.int8).reshape(n, k)
    return q, (amax / np.float32(127)).astype(np.float32)


def int8_matmul(w_blocks: np.ndarray, dtype: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """y [n, rows] = (activations as the int8 path rounds them) . (dequantized w)^T, in float64."""
    q, scales = quantize_activations(x)
    acts = (q.reshape(q.shape[0], -1, 32).astype(np.float64) * scales[:, :, None].astype(np.float64)).reshape(q.shape)
    w = dequantize(w_blocks, dtype, (rows, cols)).astype(np.float64)
    return acts @ w.T


def error_bound(w_blocks: np.ndarray, dtype: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """What float32 rounding can add to int8_matmul's result: a small multiple of sum |a| |w|."""
    q, scales = quantize_activations(x)
    acts = (np.abs(q.reshape(q.shape[0], -1, 32)).astype(np.float64) * scales[:, :, None]).reshape(q.shape)
    w = np.abs(dequantize(w_blocks, dtype, (rows, cols)).astype(np.float64))
    return 1e-5 * (acts @ w.T) + 1e-30
