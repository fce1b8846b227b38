"""Reference (numpy) quantization in GGML's block layouts.

These are the layouts GGUF files store and tokentrail's kernels read:

  q8_0  32 values in 34 bytes:  f16 scale d, 32 x int8 q;          x = d * q
  q4_0  32 values in 18 bytes:  f16 scale d, 16 bytes of nibbles;  x = d * (q - 8)
        byte j holds value j in its low nibble and value j + 16 in its high nibble
  q4_k  256 values in 144 bytes: f16 d, f16 dmin, 12 bytes of packed 6-bit
        (scale, min) pairs for eight sub-blocks of 32, 128 bytes of nibbles;
        x = d * scale_s * q - dmin * min_s
  q6_k  256 values in 210 bytes: 128 bytes of low nibbles, 64 bytes of high
        2-bit pairs, 16 int8 scales (one per 16 values), f16 d;
        x = d * scale_g * (q - 32)

`dequantize` is exact with respect to those formulas; `quantize` produces
valid blocks with a simple scale choice (for q8_0 and q4_0 the same choice
GGML's reference makes, so the bytes match; for the k-quants a plain
min/max fit rather than GGML's iterative search, so the bytes differ but any
GGML reader decodes them correctly). The slow paths here exist for tests,
conversion and inspection; the engine has its own kernels.
"""
from __future__ import annotations

import numpy as np

from .weights import BLOCK_TYPES
from ..errors import InvalidArgumentError

QK_K = 256


def block_info(dtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a block-quantized dtype."""
    try:
        return BLOCK_TYPES[dtype]
    except KeyError:
        raise InvalidArgumentError(f"{dtype!r} is not a block-quantized type; expected one of {tuple(BLOCK_TYPES)}") from None


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes one row of `cols` values takes; `cols` must fill whole blocks."""
    per_block, nbytes = block_info(dtype)
    if cols % per_block:
        raise InvalidArgumentError(f"{dtype} needs rows that are a multiple of {per_block} values, got {cols}")
    return cols // per_block * nbytes


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian f16 from pairs of bytes (last axis of size 2) to float32."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero), exact for float32 input."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= 0.5), v)


# --------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------

def dequantize(data: np.ndarray, dtype: str, shape) -> np.ndarray:
    """Decode blocks (uint8, any shape holding whole rows) to float32 of `shape`."""
    shape = tuple(int(s) for s in shape)
    per_block, nbytes = block_info(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(data, dtype=np.uint8).reshape(-1)
    if n % per_block or raw.size != n // per_block * nbytes:
        raise InvalidArgumentError(f"{raw.size} bytes of {dtype} cannot hold shape {shape}")
    blocks = raw.reshape(-1, nbytes)
    out = {"q8_0": _deq_q8_0, "q4_0": _deq_q4_0, "q4_k": _deq_q4_k, "q6_k": _deq_q6_k}[dtype](blocks)
    return out.reshape(shape)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return d[:, None] * q


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return d[:, None] * q.astype(np.float32)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack q4_k's 12 bytes into 8 six-bit scales and 8 six-bit mins."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    # Each 32-byte chunk holds two sub-blocks: low nibbles first, then high.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    scale = (d[:, None] * sc.astype(np.float32))[:, :, None]
    offset = (dmin[:, None] * mn.astype(np.float32))[:, :, None]
    return (scale * q - offset).reshape(-1, QK_K)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
    q = (lo | (hi << 4)).astype(np.int16) - 32  # [N, 2 halves, 4 segments, 32]
    q = q.reshape(-1, 16, 16).astype(np.float32)
    return ((d[:, None] * sc)[:, :, None] * q).reshape(-1, QK_K)


# --------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------

def quantize(array: np.ndarray, dtype: str) -> np.ndarray:
    """Encode float values to blocks: uint8 [rows, bytes_per_row] (1-D input is one row)."""
    x = np.asarray(array, dtype=np.float32)
    if x.ndim == 0:
        raise InvalidArgumentError("cannot quantize a scalar")
    x2 = x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])
    rows, cols = x2.shape
    bpr = row_bytes(dtype, cols)
    if not np.all(np.isfinite(x2)):
        raise InvalidArgumentError("cannot quantize non-finite values")
    per_block, _ = block_info(dtype)
    blocks = np.ascontiguousarray(x2).reshape(-1, per_block)
    fn = {"q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_k": _q_q4_k, "q6_k": _q_q6_k}[dtype]
    return fn(blocks).reshape(rows, bpr)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    q = _round_half_away(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    # The scale maps the value of largest magnitude (sign kept) to -8, the
    # one level that has no positive counterpart.
    idx = np.abs(x).argmax(axis=1)
    extreme = x[np.arange(x.shape[0]), idx]
    d = (extreme / np.float32(-8)).astype(np.float32)
    v = x * _inverse(d)[:, None] + np.float32(8.5)
    q = np.minimum(15, np.trunc(v).astype(np.int32)).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16_bytes(d), packed], axis=1)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0).astype(np.float32)   # x = scale * q - min, min >= 0
    hi = sub.max(axis=2)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    neg_min = -lo
    d = (scale.max(axis=1) / np.float32(63)).astype(np.float32)
    dmin = (neg_min.max(axis=1) / np.float32(63)).astype(np.float32)
    # Round the super-block scales to f16 first, so the 6-bit factors are
    # chosen against the values a reader will actually use.
    d = d.astype(np.float16).astype(np.float32)
    dmin = dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(_round_half_away(scale * _inverse(d)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(_round_half_away(neg_min * _inverse(dmin)[:, None]), 0, 63).astype(np.uint8)
    eff_scale = d[:, None] * sc.astype(np.float32)
    eff_min = dmin[:, None] * mn.astype(np.float32)
    q = _round_half_away((sub + eff_min[:, :, None]) * _inverse(eff_scale)[:, :, None])
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    groups = x.reshape(n, 16, 16)
    idx = np.abs(groups).argmax(axis=2)
    extreme = np.take_along_axis(groups, idx[:, :, None], axis=2)[:, :, 0]
    scale = (extreme / np.float32(-32)).astype(np.float32)   # extreme -> level -32
    # int8 group scales relative to d: the largest-magnitude one maps to -128.
    sidx = np.abs(scale).argmax(axis=1)
    big = scale[np.arange(n), sidx]
    d = (big / np.float32(-128)).astype(np.float16).astype(np.float32)
    sc = np.clip(_round_half_away(scale * _inverse(d)[:, None]), -128, 127).astype(np.int8)
    eff = d[:, None] * sc.astype(np.float32)
    q = np.clip(_round_half_away(groups * _inverse(eff)[:, :, None]), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 4, 32)   # halves of 128, four segments of 32
    ql = np.concatenate([q[:, :, 0] & 0x0F | ((q[:, :, 2] & 0x0F) << 4),
                         q[:, :, 1] & 0x0F | ((q[:, :, 3] & 0x0F) << 4)], axis=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
