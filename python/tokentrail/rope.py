"""Rotary position embedding: the frequency tables every rope scaling scheme reduces to.

A rotary layer turns pair i of each head's first `rotary_dim` elements by the angle
position * inv_freq[i]. Every scaling scheme in use (linear, Llama 3, YaRN,
LongRoPE, dynamic NTK) only changes that table, and YaRN and LongRoPE also scale
cos and sin by an attention factor, so the core takes tables, not schemes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Scaling types and the parameters each one reads (beyond `type`); what is required has no default.
SCALING_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"factor": None},
    "dynamic": {"factor": None, "original_max_position_embeddings": 0},
    "llama3": {"factor": None, "low_freq_factor": None, "high_freq_factor": None,
               "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "attention_factor": None,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, "truncate": True},
    "longrope": {"short_factor": None, "long_factor": None, "original_max_position_embeddings": None,
                 "factor": None, "attention_factor": None},
    # Each frequency divided by its own factor: how GGUF files store Llama 3 scaling (rope_freqs).
    "factors": {"factors": None},
}


@dataclass
class RopeTables:
    inv_freq: np.ndarray                    # full-attention layers (and all layers without a local base)
    inv_freq_local: np.ndarray | None       # sliding-window layers with their own base (Gemma 3)
    inv_freq_long: np.ndarray | None        # LongRoPE: calls reaching past `long_after` positions
    long_after: int
    attn_factor: float                      # multiplies cos and sin (YaRN, LongRoPE)


def base_frequencies(theta: float, rotary_dim: int) -> np.ndarray:
    """theta ** (-2i / rotary_dim), computed in float32 as the reference implementations do."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def tables(theta: float, rotary_dim: int, scaling: dict | None, max_positions: int,
           local_theta: float = 0.0) -> RopeTables:
    """The frequency tables of a model whose rotary layers use base `theta` and `scaling`."""
    inv = base_frequencies(theta, rotary_dim)
    local = base_frequencies(local_theta, rotary_dim) if local_theta else None
    if not scaling:
        return RopeTables(inv, local, None, 0, 1.0)
    kind = scaling["type"]
    if kind == "linear":
        return RopeTables((inv / np.float32(scaling["factor"])).astype(np.float32), local, None, 0, 1.0)
    if kind == "dynamic":
        # Dynamic NTK raises the base only for sequences longer than max_positions, which a
        # session's context limit never allows (see ModelConfig.max_seq_len): within it the
        # table is the plain one.
        return RopeTables(inv, local, None, 0, 1.0)
    if kind == "llama3":
        return RopeTables(_llama3(inv, scaling), local, None, 0, 1.0)
    if kind == "factors":
        f = np.asarray(scaling["factors"], dtype=np.float32)
        if f.shape != inv.shape:
            raise ValueError(f"rope factors must have rotary_dim / 2 = {inv.size} entries, got {f.shape}")
        return RopeTables((inv / f).astype(np.float32), local, None, 0, 1.0)
    if kind == "yarn":
        table, factor = _yarn(theta, rotary_dim, scaling, max_positions)
        return RopeTables(table, local, None, 0, factor)
    if kind == "longrope":
        return _longrope(theta, rotary_dim, scaling, max_positions, local)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def _llama3(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, s: dict, max_positions: int) -> tuple[np.ndarray, float]:
    factor = s["factor"]
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    pos = np.power(np.float32(theta), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv.astype(np.float32), float(attn)


def _longrope(theta: float, dim: int, s: dict, max_positions: int, local) -> RopeTables:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.power(np.float32(theta), shape)

    def table(factors) -> np.ndarray:
        f = np.asarray(factors, dtype=np.float32)
        if f.shape != (dim // 2,):
            raise ValueError(f"longrope factors must have rotary_dim / 2 = {dim // 2} entries, got {f.shape}")
        return (np.float32(1.0) / (f * base)).astype(np.float32)

    return RopeTables(table(s["short_factor"]), local, table(s["long_factor"]), int(original), float(attn))
