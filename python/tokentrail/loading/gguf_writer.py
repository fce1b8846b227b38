"""Write a checkpoint as a GGUF file that llama.cpp and tokentrail can both read.

Llama-family models (rotary, RMSNorm, gated SiLU MLP) are written as
architecture "llama"; GPT-2-family models (learned positions, LayerNorm,
GELU) as "gpt2". llama.cpp's "llama" rotates adjacent pairs of each head, so
q/k rows of checkpoints in the half-split layout (Hugging Face) are permuted
into adjacent order on the way out; the file then says what every llama GGUF
says and reads back with rope_layout="adjacent".

Matrices take the requested dtype; 1-D tensors (norms, biases) stay f32, and a
matrix whose rows do not fill whole quantization blocks falls back to f16, as
llama.cpp's own quantizer does. Writing uses the `gguf` package.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from .quant import quantize
from .weights import BLOCK_TYPES, Weight

WRITE_DTYPES = ("f32", "f16", "q8_0", "q4_0")
# general.file_type values llama.cpp uses for "mostly this type".
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}
SPACE = "\u2581"
# GGUF token types.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


def write_gguf(checkpoint, out_path, dtype: str = "f32") -> Path:
    """Write `checkpoint` to `out_path` with matrices in `dtype`; returns the path."""
    import gguf  # only writing needs the package

    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    cfg: ModelConfig = checkpoint.config
    arch = _architecture(cfg)
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(str(out_path), arch)
    _write_config(writer, cfg, arch, dtype)
    if checkpoint.tokenizer is not None:
        _write_tokenizer(writer, checkpoint.tokenizer, cfg)
    else:
        # No tokenizer (random or id-only models): say so, or llama.cpp refuses the file.
        writer.add_string("tokenizer.ggml.model", "none")
    for name, array, raw_type in _tensors(checkpoint, cfg, arch, dtype, gguf):
        if raw_type is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _architecture(cfg: ModelConfig) -> str:
    if cfg.position == "rope" and cfg.norm == "rms" and cfg.activation == "silu" and cfg.gated_mlp:
        return "llama"
    if (cfg.position == "learned" and cfg.norm == "layer" and cfg.activation == "gelu_tanh"
            and not cfg.gated_mlp and cfg.n_kv_heads == cfg.n_heads):
        return "gpt2"
    raise ValueError("only Llama-family (rope, rms, gated silu) and GPT-2-family (learned positions, "
                     "layer norm, gelu_tanh) models can be written as GGUF")


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
    if arch == "llama":
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
        w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    else:
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", cfg.norm_eps)


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


def _tensors(checkpoint, cfg: ModelConfig, arch: str, dtype: str, gguf):
    W = checkpoint.weights
    permute = arch == "llama" and cfg.rope_layout == "half"
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
            return (to_adjacent(a, heads) if heads else a), None
        target = dtype
        if target in BLOCK_TYPES and w.shape[-1] % BLOCK_TYPES[target][0]:
            target = "f16"
        if w.dtype == target and target in BLOCK_TYPES:
            raw = np.asarray(w.data, dtype=np.uint8).reshape(w.shape[0], -1)
            return (to_adjacent(raw, heads) if heads else raw), raw_types[target]
        a = w.to_float32()
        if heads:
            a = to_adjacent(a, heads)
        if target == "f32":
            return np.ascontiguousarray(a, np.float32), None
        if target == "f16":
            return a.astype(np.float16), None
        return quantize(a, target), raw_types[target]

    def emit(gguf_name: str, w: Weight, heads: int | None = None):
        array, raw = encode(w, heads)
        return gguf_name, array, raw

    yield emit("token_embd.weight", need("embed.weight"))
    if cfg.position == "learned":
        yield emit("position_embd.weight", need("pos_embed.weight"))
    for layer in range(cfg.n_layers):
        p, b = f"blocks.{layer}.", f"blk.{layer}."
        for suffix in ("weight", "bias"):
            if p + f"attn_norm.{suffix}" in W:
                yield emit(b + f"attn_norm.{suffix}", W[p + f"attn_norm.{suffix}"])
        if arch == "gpt2":
            # llama.cpp's gpt2 graph reads one fused [q; k; v] projection.
            for suffix in ("weight", "bias"):
                parts = [p + f"attn.{x}.{suffix}" for x in "qkv"]
                if all(n in W for n in parts):
                    fused = np.concatenate([W[n].to_float32() for n in parts], axis=0)
                    yield emit(b + f"attn_qkv.{suffix}", Weight.from_array(fused))
                elif any(n in W for n in parts) or suffix == "weight":
                    raise CheckpointError("q, k and v must all be present to fuse them", tensor=parts[0])
        else:
            heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads, "v": None}
            for x in "qkv":
                for suffix in ("weight", "bias"):
                    name = p + f"attn.{x}.{suffix}"
                    if suffix == "weight" or name in W:
                        yield emit(b + f"attn_{x}.{suffix}", need(name), heads[x] if permute else None)
        for src, dst in (("attn.o", "attn_output"), ("mlp_norm", "ffn_norm"), ("mlp.gate", "ffn_gate"),
                         ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
            if src == "mlp.gate" and not cfg.gated_mlp:
                continue
            for suffix in ("weight", "bias"):
                name = p + f"{src}.{suffix}"
                if suffix == "weight" or name in W:
                    yield emit(b + f"{dst}.{suffix}", need(name))
    yield emit("output_norm.weight", need("final_norm.weight"))
    if "final_norm.bias" in W:
        yield emit("output_norm.bias", W["final_norm.bias"])
    if not cfg.tied_embeddings:
        yield emit("output.weight", need("unembed.weight"))


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def _write_tokenizer(w, tok, cfg: ModelConfig) -> None:
    """Describe a tokentrail Tokenizer in llama.cpp's tokenizer.ggml.* keys."""
    from .gguf import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN

    spec = json.loads(tok.inner.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be written to GGUF, not {model.get('type')!r}")
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
    raise ValueError("the tokenizer's pre-tokenizer has no GGUF name tokentrail knows "
                     "(gpt-2, llama-bpe, qwen2)")
