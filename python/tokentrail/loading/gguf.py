"""GGUF (versions 2 and 3): metadata, tensor infos and memory-mapped tensor data.

Layout (little-endian): magic "GGUF", uint32 version, uint64 tensor count,
uint64 metadata count; the metadata as (string key, uint32 type, value);
each tensor's info as (string name, uint32 n_dims, uint64 dims[n_dims],
uint32 ggml type, uint64 offset); then, at the next multiple of
`general.alignment` (default 32), the tensor data, each tensor at its offset.
Strings are a uint64 length and UTF-8 bytes. Dims are listed fastest-varying
first, so dims[0] is the number of columns.

The parser is our own so that every count, length and offset read from the
file is checked against the file's size before it is used: a malformed file
raises CheckpointError naming the file and the key or tensor, never crashes
or allocates what the file merely claims.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ..config import ModelConfig, expected_shapes, is_optional
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import Checkpoint
from .llama2c import BYTE, BYTE_PIECE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, sentencepiece_bpe
from .families import BY_GGUF_ARCH, gguf_name, GGUF_BLOCK, GGUF_EXPERTS, GGUF_QKV, GGUF_ROPE, GGUF_TOP
from .fields import FieldReader, check_rope, open_regular
from .weights import BLOCK_TYPES, FLOAT_TYPES, WEIGHT_TYPES, Weight, aligned

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML tensors have at most four dimensions
MAX_NESTING = 8

# Metadata value types.
(T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING,
 T_ARRAY, T_UINT64, T_INT64, T_FLOAT64) = range(13)
SCALARS = {T_UINT8: "<u1", T_INT8: "<i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4",
           T_INT32: "<i4", T_FLOAT32: "<f4", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8",
           T_BOOL: "<u1"}

# GGML tensor types tokentrail reads, by their number in the file (the core's table).
GGML_TYPES = {t.ggml_id: t.name for t in WEIGHT_TYPES.values()}
GGML_TYPE_IDS = {v: k for k, v in GGML_TYPES.items()}
# Names of other GGML types, only to say which one a file uses.
OTHER_GGML_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                    18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
                    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
                    39: "MXFP4"}
FLOAT_ITEMSIZE = {name: WEIGHT_TYPES[name].bytes_per_block for name in FLOAT_TYPES}
FLOAT_NUMPY = {name: np.dtype(t).newbyteorder("<") for name, t in FLOAT_TYPES.items()}

# Pre-tokenizers of byte-level BPE vocabularies, by tokenizer.ggml.pre: the regexes that split the
# text in turn (each piece is split again by the next), whether ByteLevel then applies GPT-2's own
# split, and whether a piece the vocabulary holds whole skips the merges (Llama 3's ignore_merges).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
                  r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_U64 = struct.Struct("<Q")  # a string's length


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]
    byte_level_split: bool
    ignore_merges: bool = False


_GPT2 = PreTokenizer((), True)
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}",), True)
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), PreTokenizer((LLAMA3_PATTERN,), False, True)),
    "dbrx": PreTokenizer((LLAMA3_PATTERN,), False),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), PreTokenizer((QWEN2_PATTERN,), False)),
    "qwen35": PreTokenizer((QWEN35_PATTERN,), False),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS_THEN_GPT2),
}

# GGUF token types (tokenizer.ggml.token_type) as SentencePiece kinds.
TOKEN_KINDS = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}


@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]   # as stored: dims[0] is the number of columns
    offset: int             # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def dtype(self) -> str:
        return GGML_TYPES[self.ggml_type]

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy) shape with GGML's unit outer dimensions dropped."""
        dims = list(self.dims)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return tuple(reversed(dims))


class GGUFFile:
    """The parsed header of a GGUF file; `weight(name)` maps a tensor's data."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open_regular(self.path, "GGUF file") as fh:
                if self.size == 0:
                    raise self.error("file is empty", "header")
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(buf)
        except OSError as e:
            raise CheckpointError(f"cannot read GGUF file: {e.strerror}", path=self.path) from None
        self._data: np.ndarray | None = None

    def error(self, message: str, where: str | None = None) -> CheckpointError:
        return CheckpointError(message, path=self.path, tensor=where)

    # -- header ---------------------------------------------------------

    def _parse(self, buf) -> None:
        self._buf, self._pos = buf, 0
        magic = self._take(4, "magic")
        if magic != MAGIC:
            raise self.error(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})", "header")
        self.version = self._scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise self.error(f"unsupported GGUF version {self.version}{hint}; tokentrail reads "
                             f"versions {SUPPORTED_VERSIONS}", "header")
        n_tensors = self._scalar("<Q", "tensor count")
        n_kv = self._scalar("<Q", "metadata count")
        # Each metadata entry takes at least 12 bytes, each tensor info at least 24.
        if n_kv * 12 > self.size - self._pos:
            raise self.error(f"metadata count {n_kv} cannot fit in the file", "header")
        if n_tensors * 24 > self.size - self._pos:
            raise self.error(f"tensor count {n_tensors} cannot fit in the file", "header")

        self.metadata: dict[str, object] = {}
        self.metadata_types: dict[str, int] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.metadata:
                raise self.error("metadata key appears twice; which value applies is ambiguous", key)
            vtype = self._scalar("<I", key)
            self.metadata[key] = self._value(vtype, key, 0)
            self.metadata_types[key] = vtype

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1):
                raise self.error(f"general.alignment must be a power of two, got {a!r}", "general.alignment")
            self.alignment = a

        infos = []
        for i in range(n_tensors):
            name = self._string(f"tensor name #{i}")
            n_dims = self._scalar("<I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.error(f"tensor has {n_dims} dimensions (1..{MAX_DIMS} allowed)", name)
            dims = tuple(self._scalar("<Q", name) for _ in range(n_dims))
            ggml_type = self._scalar("<I", name)
            rel = self._scalar("<Q", name)
            infos.append((name, dims, ggml_type, rel))
        data_start = -(-self._pos // self.alignment) * self.alignment

        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, rel in infos:
            if name in self.tensors:
                raise self.error("tensor name appears twice", name)
            if ggml_type not in GGML_TYPES:
                tname = OTHER_GGML_TYPES.get(ggml_type, f"unknown type {ggml_type}")
                raise self.error(f"tensor type {tname} is not supported (tokentrail reads "
                                 f"{', '.join(t.upper() for t in GGML_TYPES.values())})", name)
            dtype = GGML_TYPES[ggml_type]
            if any(d <= 0 for d in dims):
                raise self.error(f"tensor has an empty dimension {dims}", name)
            count = 1
            for d in dims:
                count *= d
            if dtype in BLOCK_TYPES:
                per_block, block_bytes = BLOCK_TYPES[dtype]
                if dims[0] % per_block:
                    raise self.error(f"{dtype} rows of {dims[0]} values do not fill whole "
                                     f"blocks of {per_block}", name)
                nbytes = count // per_block * block_bytes
            else:
                nbytes = count * FLOAT_ITEMSIZE[dtype]
            if rel % self.alignment:
                raise self.error(f"tensor data offset {rel} is not a multiple of the "
                                 f"alignment {self.alignment}", name)
            start = data_start + rel
            if start + nbytes > self.size:
                raise self.error(f"tensor data ({nbytes} bytes at offset {start}) runs past the end "
                                 f"of the file ({self.size} bytes); the file is truncated?", name)
            self.tensors[name] = TensorInfo(name, ggml_type, dims, start, nbytes)
        del self._buf

    def _take(self, n: int, where: str) -> bytes:
        if n < 0 or self._pos + n > self.size:
            raise self.error(f"file ends inside {where} (needs {n} bytes at offset {self._pos}, "
                             f"file has {self.size})", where)
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, fmt: str, where: str):
        n = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(n, where))[0]

    def _string(self, where: str) -> str:
        return self._strings(1, lambda i: where)[0]

    def _strings(self, count: int, where_of) -> list[str]:
        """`count` strings, one after another; where_of(i) names string i in errors. One loop over
        local names, as a vocabulary of 150k strings is most of a GGUF header."""
        buf, pos, size = self._buf, self._pos, self.size
        length = _U64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > size:
                self._pos = pos
                self._take(8, where_of(i))  # raises: the file ends inside this string's length
            (n,) = length(buf, pos)
            pos += 8
            if n > size - pos:
                self._pos = pos
                raise self.error(f"string length {n} is larger than the rest of the file", where_of(i))
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int, key: str, depth: int):
        if vtype == T_STRING:
            return self._string(key)
        if vtype in SCALARS:
            v = np.frombuffer(self._take(np.dtype(SCALARS[vtype]).itemsize, key), SCALARS[vtype])[0]
            if vtype == T_BOOL:
                return bool(v)
            # float32 values as their shortest decimal (1e-05, not 9.999999747378752e-06).
            return float(str(v)) if vtype == T_FLOAT32 else v.item()
        if vtype == T_ARRAY:
            if depth >= MAX_NESTING:
                raise self.error("arrays nested too deeply", key)
            etype = self._scalar("<I", key)
            count = self._scalar("<Q", key)
            remaining = self.size - self._pos
            if etype in SCALARS:
                itemsize = np.dtype(SCALARS[etype]).itemsize
                if count * itemsize > remaining:
                    raise self.error(f"array of {count} items is larger than the rest of the file", key)
                arr = np.frombuffer(self._take(count * itemsize, key), SCALARS[etype]).copy()
                return arr.astype(bool) if etype == T_BOOL else arr
            if etype == T_STRING:
                if count * 8 > remaining:
                    raise self.error(f"array of {count} strings is larger than the rest of the file", key)
                return self._strings(count, lambda i: f"{key}[{i}]")
            if etype == T_ARRAY:
                if count * 12 > remaining:
                    raise self.error(f"array of {count} arrays is larger than the rest of the file", key)
                return [self._value(T_ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]
            raise self.error(f"unknown array element type {etype}", key)
        raise self.error(f"unknown metadata value type {vtype}", key)

    # -- tensor data ----------------------------------------------------

    def weight(self, name: str) -> Weight:
        """The tensor as a Weight whose data is a read-only view of the file."""
        info = self.tensors[name]
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._data[info.offset:info.offset + info.nbytes]
        shape = info.shape
        if info.dtype in BLOCK_TYPES:
            cols = info.dims[0]
            rows = info.nbytes // (cols // BLOCK_TYPES[info.dtype][0] * BLOCK_TYPES[info.dtype][1])
            return Weight(raw.reshape(rows, -1), info.dtype, shape)
        # A file written with general.alignment below 4 may place floats at any byte: copied aligned.
        return Weight(aligned(raw.view(FLOAT_NUMPY[info.dtype]).reshape(shape)), info.dtype, shape)


# --------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------

def read_gguf(path) -> Checkpoint:
    """Read a GGUF model of an architecture in the family registry (see families.py)."""
    f = GGUFFile(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise f.error("general.architecture is missing or not a string", "general.architecture")
    family = BY_GGUF_ARCH.get(arch)
    if family is None:
        raise f.error(f"architecture {arch!r} is not supported (tokentrail reads "
                      f"{', '.join(sorted(a for a in BY_GGUF_ARCH if a))})", "general.architecture")
    n = len(f.tensors)
    r = FieldReader(meta, f.path, prefix=f"{arch}.", limits={
        k: (n, f"the file's {n} tensors") for k in ("block_count", "expert_count", "expert_used_count")})
    fields = _config_fields(f, r, family)
    r.refuse_unused(f"the {arch} metadata")

    vocab = fields["vocab_size"]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if _is_int(meta.get(k))]
    eos = [int(e) for i, e in enumerate(eos) if e not in eos[:i] and 0 <= e < vocab]
    try:
        config = ModelConfig(**fields, architecture=arch,
                             bos_token_id=int(bos) if _is_int(bos) and 0 <= bos < vocab else None,
                             eos_token_ids=eos)
    except ValueError as e:
        raise f.error(str(e), f"{arch}.*") from None
    check_rope(config, f.path, f"{arch}.rope.*")
    weights = _map_tensors(f, config, family)
    _check_shapes(f, config, weights)
    check_tokenizer_metadata(f)
    tokenizer = _tokenizer(f, vocab, config)
    if tokenizer is not None:
        from ..chat import template_from_gguf

        tokenizer.chat_template = template_from_gguf(meta, tokenizer)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(f.path))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The kind of every tokenizer.ggml key the tokenizer reads: a scalar type, or an array of one.
_TOKENIZER_KINDS = {
    "model": str, "pre": str, "add_bos_token": bool, "add_eos_token": bool, "add_space_prefix": bool,
    "remove_extra_whitespaces": bool, "tokens": [str], "merges": [str], "token_type": [int], "scores": [float],
    "bos_token_id": int, "eos_token_id": int, "eot_token_id": int, "eom_token_id": int,
}


def check_tokenizer_metadata(f: GGUFFile) -> None:
    """Every tokenizer.ggml value the tokenizer reads is of its kind (an array is not a string, a
    token type is an integer, a score a finite number), so that building it cannot fail obscurely."""
    for key, kind in _TOKENIZER_KINDS.items():
        full = f"tokenizer.ggml.{key}"
        v = f.metadata.get(full)
        if v is None:
            continue
        if isinstance(kind, list):
            item = kind[0]
            if item is str:
                ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
            else:
                ok = isinstance(v, np.ndarray) and v.ndim == 1 and (
                    v.dtype.kind in "iu" if item is int else v.dtype.kind in "iuf" and bool(np.isfinite(v).all()))
            what = {str: "strings", int: "integers", float: "finite numbers"}[item]
            if not ok:
                raise f.error(f"expected an array of {what}", full)
        elif kind is int:
            if not _is_int(v):
                raise f.error(f"expected an integer, got {type(v).__name__}", full)
        elif not isinstance(v, kind):
            raise f.error(f"expected a {kind.__name__}, got {type(v).__name__}", full)


def _config_fields(f: GGUFFile, r: FieldReader, family) -> dict:
    """ModelConfig fields from the architecture's metadata keys, the tensors present, and what
    llama.cpp assumes of the architecture (family.gguf_fixed)."""
    if "token_embd.weight" not in f.tensors:
        raise f.error("the token embedding is missing", "token_embd.weight")
    embed_shape = f.tensors["token_embd.weight"].shape
    if len(embed_shape) != 2:
        raise f.error(f"token embedding must be 2-D, has shape {embed_shape}", "token_embd.weight")
    vocab, d = embed_shape
    hidden = r.int("embedding_length")
    if d != hidden:
        raise f.error(f"token embedding has {d} columns but embedding_length is {hidden}", "token_embd.weight")
    declared_vocab = r.int("vocab_size", None)
    if declared_vocab is not None and declared_vocab != vocab:
        raise f.error(f"token embedding has {vocab} rows but vocab_size is {declared_vocab}", "token_embd.weight")
    n_layers = r.int("block_count", maximum=len(f.tensors))  # every block has tensors
    heads = r.int("attention.head_count")
    head_dim = r.int("attention.key_length", None) or hidden // heads
    if r.int("attention.value_length", head_dim) != head_dim:
        raise r.error("attention.value_length", "key and value head sizes differ")
    fields = dict(vocab_size=vocab, hidden_size=hidden, n_layers=n_layers, n_heads=heads,
                  n_kv_heads=r.int("attention.head_count_kv", heads), head_dim=head_dim,
                  ffn_size=r.int("feed_forward_length"), max_seq_len=r.int("context_length"),
                  position="rope", rope_layout=family.gguf_rope_layout, gated_mlp=True, activation="silu")
    if r.has("attention.layer_norm_rms_epsilon"):
        fields.update(norm="rms", norm_eps=r.float("attention.layer_norm_rms_epsilon"))
    else:
        fields.update(norm="layer", norm_eps=r.float("attention.layer_norm_epsilon", 1e-5))
    fields["rope_theta"] = r.float("rope.freq_base", 10000.0)
    rotary = r.int("rope.dimension_count", head_dim)
    if rotary > head_dim or rotary % 2:
        raise r.error("rope.dimension_count", f"must be even and at most the head size {head_dim}")
    fields["rotary_dim"] = rotary if rotary != head_dim else 0
    if r.has("rope.freq_base_swa"):
        fields["rope_local_theta"] = r.float("rope.freq_base_swa")
    fields["rope_scaling"] = _rope_scaling(f, r, rotary)
    window = r.int("attention.sliding_window", 0, minimum=0)
    if 0 < window < fields["max_seq_len"]:
        fields["sliding_window"] = window
    fields["attn_softcap"] = r.float("attn_logit_softcapping", 0.0, positive=False, minimum=0.0)
    fields["final_softcap"] = r.float("final_logit_softcapping", 0.0, positive=False, minimum=0.0)
    if r.has("expert_count"):
        fields["n_experts"] = r.int("expert_count")
        fields["n_experts_used"] = r.int("expert_used_count")
        fields["ffn_size"] = r.int("expert_feed_forward_length", fields["ffn_size"])
        fields["renormalize_experts"] = r.bool("expert_weights_norm", family.name != "olmoe")
    if r.has("use_parallel_residual"):
        fields["parallel_residual"] = r.bool("use_parallel_residual")
    # Block structure the tensors show: q/k norms per head or over the projection, norms before
    # and/or after attention and MLP.
    q_norm = f.tensors.get("blk.0.attn_q_norm.weight")
    if q_norm is not None:
        fields["qk_norm"] = "head" if q_norm.shape == (head_dim,) else "full"
    fields["post_norms"] = "blk.0.post_attention_norm.weight" in f.tensors
    fields["pre_norms"] = "blk.0.attn_norm.weight" in f.tensors
    fields["tied_embeddings"] = "output.weight" not in f.tensors
    fixed = family.gguf_fixed(fields)
    if fields.get("sliding_window") and "layer_types" not in fixed:
        fields["layer_types"] = ["sliding"] * n_layers   # a window with no pattern: every layer
    fields.update(fixed)
    if fields["position"] == "learned":
        fields.pop("rotary_dim", None)
    if not fields.get("sliding_window"):
        fields.pop("layer_types", None)
    return fields


def _rope_scaling(f: GGUFFile, r: FieldReader, rotary: int) -> dict | None:
    kind = r.str("rope.scaling.type", "none")
    factor = r.float("rope.scaling.factor", None)
    original = r.int("rope.scaling.original_context_length", None)
    attn = r.float("rope.scaling.attn_factor", None)
    r.ignore("rope.scaling.finetuned")
    if "rope_factors_long.weight" in f.tensors or "rope_factors_short.weight" in f.tensors:
        long, short = (_rope_table(f, n, rotary) for n in ("rope_factors_long.weight", "rope_factors_short.weight"))
        if original is None:
            raise r.error("rope.scaling.original_context_length", "LongRoPE needs the original context length")
        out = {"type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": original}
        if attn is not None:
            out["attention_factor"] = attn
        return out
    if "rope_freqs.weight" in f.tensors:
        if kind not in ("none", ""):
            raise r.error("rope.scaling.type", f"{kind!r} scaling together with per-frequency factors")
        return {"type": "factors", "factors": _rope_table(f, "rope_freqs.weight", rotary)}
    if kind in ("none", "") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        if original is None:
            raise r.error("rope.scaling.original_context_length", "YaRN needs the original context length")
        for key in ("rope.scaling.yarn_ext_factor", "rope.scaling.yarn_attn_factor",
                    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow"):
            if r.has(key):
                raise r.error(key, "non-default YaRN parameters are not supported")
        out = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
        if attn is not None and attn != 1.0:
            raise r.error("rope.scaling.attn_factor", "a YaRN attention factor other than 1 is not supported")
        return out
    raise r.error("rope.scaling.type", f"rope scaling {kind!r} is not supported (tokentrail reads linear, yarn, "
                                       f"per-frequency factors and LongRoPE)")


def _rope_table(f: GGUFFile, name: str, rotary: int) -> list[float]:
    if name not in f.tensors:
        raise f.error("LongRoPE needs both rope_factors_long and rope_factors_short", name)
    w = f.weight(name)
    values = w.to_float32().ravel()
    if values.shape != (rotary // 2,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise f.error(f"expected {rotary // 2} positive finite factors, got shape {w.shape}", name)
    return [float(v) for v in values]


def _map_tensors(f: GGUFFile, config: ModelConfig, family) -> dict[str, Weight]:
    weights: dict[str, Weight] = {}
    origin: dict[str, str] = {}
    top = {v: k for k, v in GGUF_TOP.items()}
    block = {v: k for k, v in GGUF_BLOCK.items()}
    experts = {v: k for k, v in GGUF_EXPERTS.items()}

    def put(neutral: str, w: Weight, source: str) -> None:
        if neutral in weights:
            raise f.error(f"maps to {neutral!r}, which {origin[neutral]!r} already provides", source)
        w.source = (f.path, source)
        weights[neutral], origin[neutral] = w, source

    for name in f.tensors:
        if name in GGUF_ROPE:
            continue  # read into the rope scaling
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in top and parts[1] in ("weight", "bias"):
            put(f"{top[parts[0]]}.{parts[1]}", f.weight(name), name)
            continue
        if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
            layer, kind, suffix = int(parts[1]), parts[2], parts[3]
            if layer >= config.n_layers:
                raise f.error(f"layer {layer} is beyond block_count {config.n_layers}", name)
            prefix = f"blocks.{layer}."
            if kind == "ffn_up" and family.gguf_fused_gate_up and suffix == "weight":
                for part, w in zip(("mlp.gate", "mlp.up"), _split_rows(f, name, (config.ffn_size,) * 2)):
                    put(f"{prefix}{part}.weight", w, name)
                continue
            if kind in block:
                put(f"{prefix}{block[kind]}.{suffix}", f.weight(name), name)
                continue
            if kind == GGUF_QKV:
                sizes = (config.q_size, config.kv_size, config.kv_size)
                for part, w in zip(("q", "k", "v"), _split_rows(f, name, sizes)):
                    put(f"{prefix}attn.{part}.{suffix}", w, name)
                continue
            if kind in experts and suffix == "weight":
                for e, w in enumerate(_split_experts(f, name, config.n_experts)):
                    put(f"{prefix}mlp.experts.{e}.{experts[kind]}.weight", w, name)
                continue
        raise f.error(f"tensor is not part of a {arch_name(family)} model as tokentrail reads it; refusing rather "
                      f"than ignoring it", name)
    return weights


def arch_name(family) -> str:
    return family.gguf_arch or family.name


def _split_rows(f: GGUFFile, name: str, sizes: tuple[int, ...]) -> list[Weight]:
    """Row slices (views, no copy) of a fused projection whose parts are consecutive row blocks."""
    w = f.weight(name)
    if w.shape[0] != sum(sizes):
        raise f.error(f"fused tensor has {w.shape[0]} rows, expected {' + '.join(map(str, sizes))}", name)
    out, start = [], 0
    for size in sizes:
        out.append(Weight(w.data[start:start + size], w.dtype, (size,) + w.shape[1:]))
        start += size
    return out


def _split_experts(f: GGUFFile, name: str, n_experts: int) -> list[Weight]:
    """Each expert's [rows, cols] matrix, as views of a stacked [experts, rows, cols] tensor."""
    w = f.weight(name)
    if len(w.shape) != 3 or w.shape[0] != n_experts:
        raise f.error(f"expected a stack of {n_experts} expert matrices, got shape {w.shape}", name)
    rows = w.shape[1]
    data = w.data.reshape((n_experts * rows, -1))
    return [Weight(data[e * rows:(e + 1) * rows], w.dtype, w.shape[1:]) for e in range(n_experts)]


def _check_shapes(f: GGUFFile, config: ModelConfig, weights: dict[str, Weight]) -> None:
    expected = expected_shapes(config)
    for name, w in weights.items():
        src = w.source[1] if w.source else name
        if name not in expected:
            raise f.error(f"{name!r} does not belong to this model's configuration", src)
        if w.shape != expected[name]:
            raise f.error(f"shape {w.shape} does not match the metadata's {expected[name]}", src)
    for name in expected:
        if name not in weights and not is_optional(name):
            raise f.error(f"required tensor is missing (tokentrail name {name!r})", gguf_name(name))


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def read_gguf_tokenizer(path) -> Tokenizer | None:
    """Only the tokenizer of a GGUF file (vocabulary-only files have no tensors)."""
    f = GGUFFile(path)
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, list) else 0
    bos = f.metadata.get("tokenizer.ggml.bos_token_id")
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    config = ModelConfig(vocab_size=max(n, 1), hidden_size=1, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                         ffn_size=1, max_seq_len=1, bos_token_id=bos if _is_int(bos) and 0 <= bos < n else None,
                         eos_token_ids=[eos] if _is_int(eos) and 0 <= eos < n else [])
    return _tokenizer(f, max(n, 1), config)


def _tokenizer(f: GGUFFile, n_vocab: int, config: ModelConfig) -> Tokenizer | None:
    meta = f.metadata
    model = meta.get("tokenizer.ggml.model")
    if model is None or model == "none":
        return None
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise f.error("tokenizer.ggml.tokens must be an array of strings", "tokenizer.ggml.tokens")
    n = len(tokens)
    if n > n_vocab:
        raise f.error(f"{n} tokens but the embedding has only {n_vocab} rows", "tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.ones(n, np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (n,):
        raise f.error("token_type must be an integer array as long as the token list",
                      "tokenizer.ggml.token_type")
    add_bos_default = model == "llama"
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)

    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            scores = -np.arange(n, dtype=np.float32)
        if not isinstance(scores, np.ndarray) or scores.shape != (n,):
            raise f.error("scores must be a number array as long as the token list", "tokenizer.ggml.scores")
        kinds = [TOKEN_KINDS.get(int(t), NORMAL) for t in types]
        pieces = list(tokens)
        for i, p in enumerate(pieces):
            if kinds[i] == BYTE and not BYTE_PIECE.fullmatch(p):
                kinds[i] = NORMAL
        inner = sentencepiece_bpe(pieces, [float(s) for s in scores], kinds,
                                  add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                  remove_extra_whitespaces=bool(
                                      meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
    elif model == "gpt2":
        inner = _byte_level_bpe(f, tokens, types)
    else:
        raise f.error(f"tokenizer model {model!r} is not supported (tokentrail reads 'llama' and "
                      f"'gpt2')", "tokenizer.ggml.model")
    return Tokenizer(inner, bos_id=config.bos_token_id, eos_ids=config.eos_token_ids,
                     add_bos=bool(add_bos) and config.bos_token_id is not None)


def _byte_level_bpe(f: GGUFFile, tokens: list[str], types: np.ndarray) -> tokenizers.Tokenizer:
    meta = f.metadata
    merges_raw = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges_raw, list):
        raise f.error("merges must be an array of strings", "tokenizer.ggml.merges")
    merges = []
    for i, m in enumerate(merges_raw):
        pair = m.split(" ") if isinstance(m, str) else []
        if len(pair) != 2:
            raise f.error(f"merge {i} ({m!r}) is not two tokens separated by one space",
                          "tokenizer.ggml.merges")
        merges.append((pair[0], pair[1]))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise f.error(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))})",
                      "tokenizer.ggml.pre")
    recipe = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # A repeated text cannot have two ids in a BPE vocabulary; see sentencepiece_bpe.
        vocab[t if t not in vocab else f"<unused_{i}>"] = i
    try:
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                              ignore_merges=recipe.ignore_merges))
    except Exception as e:  # the library reports merges of unknown tokens this way
        raise f.error(f"tokenizer cannot be built: {e}", "tokenizer.ggml.merges") from None
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in recipe.splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=recipe.byte_level_split))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    inv = {i: t for t, i in vocab.items()}
    specials = [AddedToken(inv[i], special=True, normalized=False)
                for i in range(len(tokens)) if int(types[i]) == 3]
    user = [AddedToken(inv[i], special=False, normalized=False)
            for i in range(len(tokens)) if int(types[i]) == 4]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    return tok
