"""Reference (numpy) quantization in GGML's block layouts.

These are the layouts GGUF files store and tokentrail's kernels read:

  q8_0  32 values in 34 bytes:  f16 scale d, 32 x int8 q;          x = d * q
  q4_0  32 values in 18 bytes:  f16 scale d, 16 bytes of nibbles;  x = d * (q - 8)
        byte j holds value j in its low nibble and value j + 16 in its high nibble
  q4_k  256 values in 144 bytes: f16 d, f16 dmin, 12 bytes of packed 6-bit
        (scale, min) pairs for eight sub-blocks of 32, 128 bytes of nibbles;
        x = d * scale_s * q - dmin * min_s
  q4_1  32 values in 20 bytes:  f16 d, f16 m, 16 bytes of nibbles (as q4_0);
        x = d * q + m
  q5_0  32 values in 22 bytes:  f16 d, 4 bytes qh, 16 bytes of nibbles; bit j
        of the little-endian 32-bit qh is the fifth bit of value j;
        x = d * (q - 16)
  q5_1  32 values in 24 bytes:  f16 d, f16 m, qh, nibbles as q5_0; x = d * q + m
  iq4_nl 32 values in 18 bytes: f16 d, nibbles as q4_0 indexing 16 fixed
        non-uniform levels; x = d * IQ4_NL_LEVELS[q]
  q4_k  256 values in 144 bytes: f16 d, f16 dmin, 12 bytes of packed 6-bit
        (scale, min) pairs for eight sub-blocks of 32, 128 bytes of nibbles;
        x = d * scale_s * q - dmin * min_s
  q5_k  256 values in 176 bytes: q4_k's fields with 32 bytes qh between the
        scales and the nibbles; bit s of qh byte l is the fifth bit of value l
        of sub-block s
  q6_k  256 values in 210 bytes: 128 bytes of low nibbles, 64 bytes of high
        2-bit pairs, 16 int8 scales (one per 16 values), f16 d;
        x = d * scale_g * (q - 32)

`dequantize` is exact with respect to those formulas; `quantize` produces
valid blocks with a simple scale choice (for q8_0, q4_0, q4_1, q5_0 and q5_1
the same choice GGML's reference makes, so the bytes match; for the k-quants
a plain min/max fit and for iq4_nl the nearest level under a max-based scale,
rather than GGML's searches, so the bytes differ but any GGML reader decodes
them correctly). The slow paths here exist for tests,
conversion and inspection; the engine has its own kernels.
"""
from __future__ import annotations

import numpy as np

from .weights import BLOCK_TYPES
from ..errors import InvalidArgumentError

QK_K = 256
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


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
    out = _DEQUANTIZERS[dtype](blocks)
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


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block to 32 values: low nibbles are values 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes per block (a little-endian uint32) to 32 bits, bit j for value j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d[:, None] * _nibbles(b[:, 4:]).astype(np.float32) + m[:, None]


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    q = (_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)).astype(np.int8) - 16
    return d[:, None] * q.astype(np.float32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return d[:, None] * q.astype(np.float32) + m[:, None]


def _deq_iq4_nl(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    return d[:, None] * IQ4_NL_LEVELS[_nibbles(b[:, 2:])].astype(np.float32)


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


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [N, sub-block, 32]
    q = (low | (high << 4)).astype(np.float32)
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


_DEQUANTIZERS = {"q8_0": _deq_q8_0, "q4_0": _deq_q4_0, "q4_1": _deq_q4_1, "q5_0": _deq_q5_0,
                 "q5_1": _deq_q5_1, "iq4_nl": _deq_iq4_nl, "q4_k": _deq_q4_k, "q5_k": _deq_q5_k,
                 "q6_k": _deq_q6_k}


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
    return _QUANTIZERS[dtype](blocks).reshape(rows, bpr)


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


def _q_min_max(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4_1 / q5_1: x = d * q + m over [min, max] (GGML's reference choice): d, m, q."""
    lo = x.min(axis=1)
    d = ((x.max(axis=1) - lo) / np.float32(levels - 1)).astype(np.float32)
    q = np.minimum(levels - 1, np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)))
    return d, lo, q.astype(np.uint8)


def _fifth_bit_bytes(q: np.ndarray) -> np.ndarray:
    return np.packbits(q >> 4, axis=1, bitorder="little")


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _q_min_max(x, 16)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)], axis=1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _q_min_max(x, 32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _fifth_bit_bytes(q), _pack_nibbles(q)], axis=1)


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    # As q4_0: the value of largest magnitude (sign kept) maps to level -16.
    idx = np.abs(x).argmax(axis=1)
    d = (x[np.arange(x.shape[0]), idx] / np.float32(-16)).astype(np.float32)
    v = x * _inverse(d)[:, None] + np.float32(16.5)
    q = np.minimum(31, np.trunc(v).astype(np.int32)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _fifth_bit_bytes(q), _pack_nibbles(q)], axis=1)


def _q_iq4_nl(x: np.ndarray) -> np.ndarray:
    # The value of largest magnitude maps to the outermost level of its sign;
    # every value then takes the nearest level.
    idx = np.abs(x).argmax(axis=1)
    extreme = x[np.arange(x.shape[0]), idx]
    d = (extreme / np.where(extreme < 0, np.float32(-127), np.float32(113))).astype(np.float16).astype(np.float32)
    scaled = x * _inverse(d)[:, None]
    q = np.abs(scaled[:, :, None] - IQ4_NL_LEVELS.astype(np.float32)).argmin(axis=2).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    return _q_k_quant(x, 16)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    return _q_k_quant(x, 32)


def _q_k_quant(x: np.ndarray, levels: int) -> np.ndarray:
    """q4_k (16 levels) or q5_k (32): a min/max fit per sub-block of 32."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0).astype(np.float32)   # x = scale * q - min, min >= 0
    hi = sub.max(axis=2)
    scale = ((hi - lo) / np.float32(levels - 1)).astype(np.float32)
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
    q = np.clip(q, 0, levels - 1).astype(np.uint8)
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(n, 128)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    fields = [_f16_bytes(d), _f16_bytes(dmin), packed]
    if levels > 16:  # q5_k: bit s of qh byte l is the fifth bit of value l of sub-block s
        fifth = (q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
        fields.append(np.bitwise_or.reduce(fifth, axis=1))
    return np.concatenate(fields + [qs], axis=1)


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


_QUANTIZERS = {"q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1, "q5_0": _q_q5_0, "q5_1": _q_q5_1,
               "iq4_nl": _q_iq4_nl, "q4_k": _q_q4_k, "q5_k": _q_q5_k, "q6_k": _q_q6_k}
