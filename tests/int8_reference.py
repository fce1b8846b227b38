"""Numpy reference of the int8-activation products (cpp/src/kernels/int8_impl.h).

Activations are rounded to int8 as llama.cpp rounds the inputs of quantized
products: in blocks of 32 with scale = float16(max|x| / 127) and
q = round-half-even(x * (127 / max|x|)) (its Q8_0) for the 32-value weight
types; in blocks of 256 with the value of largest magnitude mapped to -127
(its Q8_K) for the k-quants. The product of the rounded activations
(q * scale, exactly) with the dequantized weights is then taken in float64,
so it differs from the kernels' only by their float rounding: the kernels'
integer sums are exact.
"""
from __future__ import annotations

import numpy as np

from tokentrail.loading.quant import dequantize

K_QUANTS = ("q4_k", "q5_k", "q6_k")


def activation_block(dtype: str) -> int:
    """Values per activation block in products with `dtype` weights."""
    return 256 if dtype in K_QUANTS else 32


def quantize_activations(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x [n, K] (K a multiple of `block`) to int8 q [n, K] and float32 scales [n, K / block]."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    b = x.reshape(n, k // block, block)
    if block == 32:
        amax = np.abs(b).max(axis=2)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(np.clip(b * inv[:, :, None], -127, 127))
        scales = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    else:
        extreme = np.take_along_axis(b, np.abs(b).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
        with np.errstate(divide="ignore"):
            iscale = np.where(extreme == 0, np.float32(0), np.float32(-127) / extreme).astype(np.float32)
            scales = np.where(extreme == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
        q = np.minimum(127, np.rint(b * iscale[:, :, None]))
    return q.astype(np.int8).reshape(n, k), scales


def rounded_activations(x: np.ndarray, dtype: str) -> np.ndarray:
    """The activations the int8 path multiplies `dtype` weights with, as float64 (q * scale)."""
    block = activation_block(dtype)
    q, scales = quantize_activations(x, block)
    return (q.reshape(q.shape[0], -1, block).astype(np.float64) * scales[:, :, None]).reshape(q.shape)


def int8_matmul(w_blocks: np.ndarray, dtype: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """y [n, rows] = (activations as the int8 path rounds them) . (dequantized w)^T, in float64."""
    w = dequantize(w_blocks, dtype, (rows, cols)).astype(np.float64)
    return rounded_activations(x, dtype) @ w.T


def error_bound(w_blocks: np.ndarray, dtype: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """What float32 rounding can add to int8_matmul's result: a small multiple of sum |a| |w|."""
    w = np.abs(dequantize(w_blocks, dtype, (rows, cols)).astype(np.float64))
    return 1e-5 * (np.abs(rounded_activations(x, dtype)) @ w.T) + 1e-30
