"""Write a checkpoint as a GGUF file that llama.cpp and tokentrail can both read.

The GGUF architecture is the family's (families.py), as llama.cpp's own
converter would write it; a model whose family is unknown (llama2.c) is
written as "llama" or "gpt2" when its configuration is one of those. What a
GGUF architecture implies without storing it (Gemma's window pattern and q.k
scale, whether expert weights are renormalised, ...) must match the model,
or the write is refused rather than producing a file llama.cpp would run
differently. llama.cpp's "llama" rotates adjacent pairs of each head, so q/k
rows in the half-split layout (Hugging Face) are permuted into adjacent order
on the way out; the file then reads back with rope_layout="adjacent".

Matrices take the requested dtype; 1-D tensors (norms, biases) stay f32, and a
matrix whose rows do not fill whole quantization blocks falls back to f16, as
llama.cpp's own quantizer does. Writing uses the `gguf` package.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, InvalidArgumentError
from ..rope import base_frequencies, tables
from .families import BY_GGUF_ARCH, BY_HF_ARCH, BY_NAME, Family, gguf_name
from .quant import quantize
from .weights import BLOCK_TYPES, Weight

WRITE_DTYPES = ("f32", "f16", "q8_0", "q4_0")
# general.file_type values llama.cpp uses for "mostly this type".
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}
SPACE = "\u2581"
# GGUF token types.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


def write_gguf(checkpoint, out_path, dtype: str = "f32", progress=None) -> Path:
    """Write `checkpoint` to `out_path` with matrices in `dtype`; returns the path.

    `progress`: see tokentrail.progress (None = a bar when stderr is a terminal).
    """
    import gguf  # only writing needs the package

    from ..progress import Task

    if dtype not in WRITE_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    cfg: ModelConfig = checkpoint.config
    family = _family(cfg)
    _check_expressible(cfg, family)
    arch = family.gguf_arch
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(str(out_path), arch)
    _write_config(writer, cfg, arch, dtype)
    if checkpoint.tokenizer is not None:
        _write_tokenizer(writer, checkpoint.tokenizer, cfg)
    else:
        # No tokenizer (random or id-only models): say so, or llama.cpp refuses the file.
        writer.add_string("tokenizer.ggml.model", "none")
    with Task(f"converting tensors to {dtype}", len(checkpoint.weights), progress) as task:
        for name, array, raw_type in _tensors(checkpoint, cfg, family, dtype, gguf):
            writer.add_tensor(name, array, raw_dtype=raw_type)
            task.advance()
    with Task(f"writing {out_path.name}", 1, progress) as task:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        task.advance()
    return out_path


def _family(cfg: ModelConfig) -> Family:
    """The family to write: the one the model came from, else llama or gpt2 if the config is one."""
    family = BY_HF_ARCH.get(cfg.architecture) or BY_GGUF_ARCH.get(cfg.architecture)
    if family is None:
        plain = dict(qk_norm="none", pre_norms=True, post_norms=False, parallel_residual=False, n_experts=0,
                     attn_softcap=0.0, final_softcap=0.0, embed_scale=1.0, sliding_window=0)
        if any(getattr(cfg, k) != v for k, v in plain.items()):
            raise CheckpointError(f"a {cfg.architecture or 'model'} of this configuration has no GGUF "
                                  f"architecture tokentrail can write")
        if cfg.position == "rope" and cfg.norm == "rms" and cfg.activation == "silu" and cfg.gated_mlp:
            family = BY_NAME["llama"]
        elif (cfg.position == "learned" and cfg.norm == "layer" and cfg.activation == "gelu_tanh"
              and not cfg.gated_mlp and cfg.n_kv_heads == cfg.n_heads):
            family = BY_NAME["gpt2"]
        else:
            raise CheckpointError("only Llama-family (rope, rms, gated silu) and GPT-2-family (learned positions, "
                                  "layer norm, gelu_tanh) models of unknown origin can be written as GGUF")
    return family


def _check_expressible(cfg: ModelConfig, family: Family) -> None:
    """Refuse what the GGUF architecture would make llama.cpp (and tokentrail) compute differently."""
    fixed = family.gguf_fixed(cfg.to_dict())
    for key, value in fixed.items():
        if key == "activation" and {value, cfg.activation} <= {"gelu_erf", "gelu_tanh"}:
            continue  # llama.cpp computes either GELU with its own approximation
        if key == "layer_types":
            if cfg.sliding_layers() != [t == "sliding" for t in value]:
                raise CheckpointError(f"GGUF {family.gguf_arch} files imply the sliding-window pattern {value}; "
                                      f"this model's is {cfg.layer_types}")
            continue
        mine = getattr(cfg, key)
        if mine != value and not (isinstance(value, float) and abs(mine - value) <= 1e-6 * abs(value)):
            raise CheckpointError(f"GGUF {family.gguf_arch} files imply {key} = {value!r}; this model has "
                                  f"{mine!r}, which the format cannot say")
    if cfg.sliding_window and "layer_types" not in fixed and not all(cfg.sliding_layers()) \
            or cfg.sliding_window and family.gguf_arch == "llama":
        raise CheckpointError(f"GGUF {family.gguf_arch} files cannot describe this model's sliding window")
    if cfg.n_experts and cfg.renormalize_experts != (family.name != "olmoe"):
        raise CheckpointError(f"GGUF {family.gguf_arch} files imply expert weights "
                              f"{'' if family.name != 'olmoe' else 'not '}renormalised; this model differs")
    if family.gguf_rope_layout == "adjacent" and cfg.rotary_dim and cfg.rope_layout == "half":
        raise CheckpointError("partial rotary with permuted (adjacent) q/k rows is not supported")
    if cfg.rope_local_theta and not fixed.get("rope_local_theta"):
        pass  # written as rope.freq_base_swa
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "yarn":
        extra = set(cfg.rope_scaling) - {"type", "factor", "original_max_position_embeddings"}
        if extra:
            raise CheckpointError(f"YaRN parameters {sorted(extra)} have no GGUF key tokentrail writes")


def _write_config(w, cfg: ModelConfig, arch: str, dtype: str) -> None:
    w.add_string("general.name", cfg.architecture or arch)
    w.add_uint32("general.file_type", FILE_TYPES[dtype])
    if dtype in BLOCK_TYPES:
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{arch}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.ffn_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    if cfg.head_dim * cfg.n_heads != cfg.hidden_size:
        w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    if cfg.norm == "rms":
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    else:
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", cfg.norm_eps)
    if cfg.position == "rope":
        w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.rotary_size)
        if cfg.rope_local_theta:
            w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local_theta)
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("type")
        if kind in ("linear", "yarn"):
            w.add_string(f"{arch}.rope.scaling.type", kind)
            w.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
        if kind in ("yarn", "longrope"):
            w.add_uint32(f"{arch}.rope.scaling.original_context_length",
                         int(scaling["original_max_position_embeddings"]))
        if kind == "longrope":
            w.add_float32(f"{arch}.rope.scaling.attn_factor",
                          float(tables(cfg.rope_theta, cfg.rotary_size, scaling, cfg.max_seq_len).attn_factor))
    if cfg.sliding_window:
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    if cfg.attn_softcap:
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_softcap)
    if cfg.final_softcap:
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_softcap)
    if cfg.n_experts:
        w.add_uint32(f"{arch}.expert_count", cfg.n_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.n_experts_used)
        if arch == "qwen3moe":
            w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.ffn_size)
    if arch == "gptneox":
        w.add_bool(f"{arch}.use_parallel_residual", cfg.parallel_residual)


# --------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------

def to_adjacent(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or bias entries) from half-split to adjacent-pair rotary order.

    In each head, half-split order rotates element j with j + head_dim/2; the
    adjacent order wants that pair at rows 2j and 2j+1, so new row 2j+s is old
    row s*head_dim/2 + j. Works on raw quantized rows too: rows move whole.
    """
    n = rows.shape[0]
    half = n // n_heads // 2
    rest = rows.shape[1:]
    return rows.reshape((n_heads, 2, half) + rest).swapaxes(1, 2).reshape(rows.shape)


def to_half(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of to_adjacent: adjacent-pair rotary order back to half-split order."""
    n = rows.shape[0]
    half = n // n_heads // 2
    rest = rows.shape[1:]
    return rows.reshape((n_heads, half, 2) + rest).swapaxes(1, 2).reshape(rows.shape)


def _tensors(checkpoint, cfg: ModelConfig, family: Family, dtype: str, gguf):
    W = checkpoint.weights
    # q/k rows must be in the order the architecture rotates.
    reorder = None
    if cfg.position == "rope" and family.gguf_rope_layout != cfg.rope_layout:
        reorder = to_adjacent if family.gguf_rope_layout == "adjacent" else to_half
    raw_types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
                 "q4_k": gguf.GGMLQuantizationType.Q4_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}

    def need(name: str) -> Weight:
        if name not in W:
            raise CheckpointError("the checkpoint lacks a tensor the GGUF file needs", tensor=name)
        return W[name]

    def encode(w: Weight, heads: int | None = None):
        """(array, raw GGML type or None) for one tensor, in the file's dtype."""
        if len(w.shape) == 1:
            a = w.to_float32()
            return (reorder(a, heads) if heads else a), None
        target = dtype
        if target in BLOCK_TYPES and w.shape[-1] % BLOCK_TYPES[target][0]:
            target = "f16"
        if w.dtype == target and target in BLOCK_TYPES:
            raw = np.asarray(w.data, dtype=np.uint8).reshape(w.shape[0], -1)
            return (reorder(raw, heads) if heads else raw), raw_types[target]
        a = w.to_float32()
        if heads:
            a = reorder(a, heads)
        if target == "f32":
            return np.ascontiguousarray(a, np.float32), None
        if target == "f16":
            return a.astype(np.float16), None
        return quantize(a, target), raw_types[target]

    def fused(gguf_name: str, names: list[str]):
        """One tensor of row blocks (llama.cpp's fused qkv and Phi-3's gate-up)."""
        present = [n for n in names if n in W]
        if not present:
            return None
        if len(present) != len(names):
            raise CheckpointError("every part must be present to fuse them", tensor=names[0])
        parts = [W[n] for n in names]
        if len(parts[0].shape) == 1:
            return gguf_name, np.concatenate([p.to_float32() for p in parts]), None
        arrays = [encode(p) for p in parts]
        if len({raw for _, raw in arrays}) != 1:
            return gguf_name, np.concatenate([p.to_float32() for p in parts]).astype(np.float16), None
        return gguf_name, np.concatenate([a for a, _ in arrays], axis=0), arrays[0][1]

    heads = {"attn.q": cfg.n_heads, "attn.k": cfg.n_kv_heads}
    rope_tensors = _rope_tensors(cfg)
    for name, values in rope_tensors.items():
        yield name, values, None
    done: set[str] = set()
    for layer in range(cfg.n_layers):
        p, b = f"blocks.{layer}.", f"blk.{layer}."
        if family.gguf_fused_qkv:
            for suffix in ("weight", "bias"):
                out = fused(f"{b}attn_qkv.{suffix}", [f"{p}attn.{x}.{suffix}" for x in "qkv"])
                if out:
                    yield out
                done.update(f"{p}attn.{x}.{suffix}" for x in "qkv")
        if family.gguf_fused_gate_up:
            out = fused(f"{b}ffn_up.weight", [f"{p}mlp.gate.weight", f"{p}mlp.up.weight"])
            if out:
                yield out
            done.update((f"{p}mlp.gate.weight", f"{p}mlp.up.weight"))
        if cfg.n_experts:
            for proj in ("gate", "up", "down"):
                names = [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(cfg.n_experts)]
                arrays = [encode(need(n)) for n in names]
                raw = {r for _, r in arrays}
                if len(raw) != 1:
                    arrays = [(need(n).to_float32().astype(np.float16), None) for n in names]
                yield gguf_name(names[0]), np.stack([a for a, _ in arrays]), arrays[0][1]
                done.update(names)
    for name in sorted(W, key=_order):
        if name in done:
            continue
        if name.startswith("blocks.") and name.rsplit(".", 2)[-2] in ("q", "k") and \
                ".attn." in name and reorder is not None:
            yield gguf_name(name), *encode(W[name], heads[name.split(".", 2)[2].rsplit(".", 1)[0]])
            continue
        yield gguf_name(name), *encode(W[name])


def _order(name: str) -> tuple:
    """Top-level tensors first, then blocks in layer order (the order llama.cpp's converter uses)."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return (0 if parts[0] in ("embed", "pos_embed") else 2, 0, name)
    return (1, int(parts[1]), name)


def _rope_tensors(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Rotary scaling stored as tensors: Llama 3's per-frequency divisors, LongRoPE's factor lists."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type")
    if cfg.position != "rope" or kind not in ("llama3", "factors", "longrope"):
        return {}
    if kind == "longrope":
        return {"rope_factors_long.weight": np.asarray(scaling["long_factor"], np.float32),
                "rope_factors_short.weight": np.asarray(scaling["short_factor"], np.float32)}
    plain = base_frequencies(cfg.rope_theta, cfg.rotary_size)
    scaled = tables(cfg.rope_theta, cfg.rotary_size, scaling, cfg.max_seq_len).inv_freq
    return {"rope_freqs.weight": (plain / scaled).astype(np.float32)}


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def _write_tokenizer(w, tok, cfg: ModelConfig) -> None:
    """Describe a tokentrail Tokenizer in llama.cpp's tokenizer.ggml.* keys."""
    from .gguf import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN

    spec = json.loads(tok.inner.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidArgumentError(f"only BPE tokenizers can be written to GGUF, not {model.get('type')!r}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    n = max(cfg.vocab_size, tok.vocab_size)
    tokens: list[str | None] = [None] * n
    types = [TT_NORMAL] * n
    for text, i in model.get("vocab", {}).items():
        tokens[i] = text
    for added in spec.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = TT_CONTROL if added.get("special") else TT_USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            # Embedding rows past the tokenizer's vocabulary (padding) still need a token.
            tokens[i], types[i] = f"[PAD{i}]", TT_UNUSED

    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(spec.get("decoder"))
    if byte_level:
        pre = _pre_name(spec.get("pre_tokenizer"), GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        if merges:
            w.add_array("tokenizer.ggml.merges", [f"{a} {b}" for a, b in merges])
    else:
        # SentencePiece-style: llama.cpp merges by score, so give every piece
        # the rank of the best merge that makes it, best first.
        unk = model.get("unk_token")
        scores = [0.0] * n
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        for i, t in enumerate(tokens):
            if types[i] != TT_NORMAL:
                if t == unk:
                    types[i] = TT_UNKNOWN
                continue
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = TT_BYTE
            scores[i] = -float(rank.get(t, len(merges) + i))
        probe = tok.inner.encode("a  b", add_special_tokens=False).tokens
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_bool("tokenizer.ggml.add_space_prefix", bool(probe) and probe[0].startswith(SPACE))
        w.add_bool("tokenizer.ggml.remove_extra_whitespaces", SPACE * 2 not in "".join(probe))
        if unk in model.get("vocab", {}):
            w.add_uint32("tokenizer.ggml.unknown_token_id", model["vocab"][unk])

    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_id
    eos = list(cfg.eos_token_ids or tok.eos_ids)
    if bos is not None:
        w.add_uint32("tokenizer.ggml.bos_token_id", bos)
        plain = tok.inner.encode("a", add_special_tokens=True).ids
        w.add_bool("tokenizer.ggml.add_bos_token", bool(tok.add_bos) or (bool(plain) and plain[0] == bos))
    if eos:
        w.add_uint32("tokenizer.ggml.eos_token_id", eos[0])
    if len(eos) > 1:
        w.add_uint32("tokenizer.ggml.eot_token_id", eos[1])
    template = getattr(tok, "chat_template", None)
    if template is not None and "default" in template.templates:
        w.add_string("tokenizer.chat_template", template.templates["default"])


def _pre_name(pre, gpt2: str, llama3: str, qwen2: str) -> str:
    text = json.dumps(pre)
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for pattern, name in ((llama3, "llama-bpe"), (qwen2, "qwen2"), (gpt2, "gpt-2")):
        if json.dumps(pattern)[1:-1] in text:
            return name
    raise InvalidArgumentError("the tokenizer's pre-tokenizer has no GGUF name tokentrail knows "
                     "(gpt-2, llama-bpe, qwen2)")
