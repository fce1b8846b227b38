"""Fuzz harnesses, one per checkpoint reader.

Each harness takes the fuzzer's bytes, turns them into the files a reader opens,
loads them, and, when the load succeeds, builds the model and runs one token
through it (so that what a file claims reaches the core). The only exception
allowed out of a load is a `TokentrailError`; anything else, a crash, a hang
or a sanitizer report is a finding.

    gguf_bytes          the bytes are a .gguf file
    gguf_structured     the bytes choose edits to a valid GGUF file (keys of every
                        value type, tensor dims, types and offsets, alignment), which is
                        then written with correct framing: the parser's later stages are reached
    safetensors_config  a Hugging Face directory: config.json and model.safetensors
    llama2c             a llama2.c checkpoint and the tokenizer.bin beside it
    tokenizer_json      a Hugging Face directory's tokenizer.json and tokenizer_config.json
                        (its chat template is rendered), beside a fixed tiny model
    generation_config   a Hugging Face directory's generation_config.json, beside a fixed tiny
                        model; one generation runs on its defaults
    sharded_index       model.safetensors.index.json and two shards, beside a fixed config.json,
                        in a directory that also holds a FIFO, a directory and a symlink leading
                        out, each named like a shard
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tokentrail.errors import TokentrailError
from tokentrail.generation import generate as generate_text
from tokentrail.loading import read_checkpoint
from tokentrail.model import Model

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"

# A file's ignored generation settings are named in a warning; thousands of inputs would repeat it.
warnings.filterwarnings("ignore", module="tokentrail")
_scratch = Path(tempfile.mkdtemp(prefix="tokentrail-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def scratch(name: str) -> Path:
    """An empty directory of this process for one input's files."""
    d = _scratch / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def cleanup() -> None:
    shutil.rmtree(_scratch, ignore_errors=True)


atexit.register(cleanup)  # libFuzzer may end the process without it; pytest and plain runs do not


# Whether the last input loaded (the seeds must: fuzzing starts from deep inside each reader).
last_loaded = False


def load_and_run(path: Path, generate: bool = False) -> bool:
    """Read a checkpoint; if it loads, run a token through it, the tokenizer over a text (and the
    ids it gives through the model), the chat template over a message, and with `generate` one
    generation on the model's own defaults. True when the load succeeded."""
    global last_loaded
    last_loaded = False
    try:
        ckpt = read_checkpoint(path)
        model = Model(ckpt, context=4)
    except TokentrailError:
        return False
    last_loaded = True
    try:
        model.session().feed([0])
        tokenizer = model.tokenizer
        if tokenizer is not None:
            ids = tokenizer.encode("Hello, wörld 12 <s>")
            tokenizer.decode(ids)
            list(tokenizer.stream().feed(ids))
            if ids:
                model.session().feed(ids[:4])
            if tokenizer.chat_template is not None:
                tokenizer.chat_template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        if generate:
            generate_text(model, [1], seed=0)
    except TokentrailError:
        pass
    return True


def split(data: bytes) -> tuple[bytes, bytes]:
    """Two files from one input: a little-endian uint32 length, the first file, the rest."""
    if len(data) < 4:
        return data, b""
    n = int.from_bytes(data[:4], "little")
    return data[4:4 + n], data[4 + n:]


def join(first: bytes, second: bytes) -> bytes:
    return len(first).to_bytes(4, "little") + first + second


# ---------------------------------------------------------------- the harnesses

def gguf_bytes(data: bytes) -> None:
    d = scratch("gguf")
    (d / "model.gguf").write_bytes(data)
    load_and_run(d / "model.gguf")


def safetensors_config(data: bytes) -> None:
    config, tensors = split(data)
    d = scratch("hf")
    (d / "config.json").write_bytes(config)
    (d / "model.safetensors").write_bytes(tensors)
    load_and_run(d)


def llama2c(data: bytes) -> None:
    checkpoint, tokenizer = split(data)
    d = scratch("llama2c")
    (d / "model.bin").write_bytes(checkpoint)
    if tokenizer:
        (d / "tokenizer.bin").write_bytes(tokenizer)
    load_and_run(d / "model.bin")


def gguf_structured(data: bytes) -> None:
    choices = Choices(data)
    meta, tensors, alignment = base_gguf(choices.pick(("spm", "bpe", "q8")))
    for _ in range(choices.int(8)):
        edit_gguf(choices, meta, tensors)
    if choices.int(8) == 0:
        alignment = choices.pick((1, 2, 3, 8, 64, 0, 2**40))
    d = scratch("gguf_structured")
    (d / "model.gguf").write_bytes(write_gguf_bytes(meta, tensors, alignment))
    load_and_run(d / "model.gguf")


def tokenizer_json(data: bytes) -> None:
    tokenizer, tokenizer_config = split(data)
    d = tiny_hf_directory("tokenizer")
    (d / "tokenizer.json").write_bytes(tokenizer)
    if tokenizer_config:
        (d / "tokenizer_config.json").write_bytes(tokenizer_config)
    load_and_run(d)


def generation_config(data: bytes) -> None:
    d = tiny_hf_directory("generation")
    (d / "generation_config.json").write_bytes(data)
    load_and_run(d, generate=True)


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
# Names beside the shards that an index must not be able to use: none is a regular file inside.
TRAPS = ("fifo.safetensors", "dir.safetensors", "link.safetensors")


def sharded_index(data: bytes) -> None:
    index, shards = split(data)
    first, second = split(shards)
    d = tiny_hf_directory("sharded", weights=False)
    (d / "model.safetensors.index.json").write_bytes(index)
    (d / SHARDS[0]).write_bytes(first)
    (d / SHARDS[1]).write_bytes(second)
    os.mkfifo(d / "fifo.safetensors")
    (d / "dir.safetensors").mkdir()
    outside = _scratch / "outside.safetensors"  # a valid file outside the model directory
    if not outside.exists():
        outside.write_bytes(safetensors_bytes(hf_tensors()))
    (d / "link.safetensors").symlink_to(outside)
    load_and_run(d)


HARNESSES = {"gguf_bytes": gguf_bytes, "gguf_structured": gguf_structured,
             "safetensors_config": safetensors_config, "llama2c": llama2c, "tokenizer_json": tokenizer_json,
             "generation_config": generation_config, "sharded_index": sharded_index}


# ---------------------------------------------------------------- a fixed tiny Hugging Face model

_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "unembed": "lm_head.weight"}
_HF_BLOCK = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def hf_config(tied: bool = False, **changes) -> dict:
    """config.json of the TINY model as a Llama checkpoint."""
    t = TINY
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": t["vocab"],
              "hidden_size": t["dim"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
              "num_key_value_heads": t["kv_heads"], "head_dim": t["head_dim"], "intermediate_size": t["ffn"],
              "max_position_embeddings": t["context"], "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "rope_theta": 10000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    config.update(changes)
    return config


def hf_tensors(dtype=np.float32, tied: bool = False) -> dict[str, np.ndarray]:
    """The TINY weights under their Hugging Face names (matrices in `dtype`)."""
    tensors = {}
    for name, x in tiny_weights().items():
        if tied and name == "unembed":
            continue
        if "." in name:
            layer, part = name.split(".")
            hf = f"model.layers.{layer}.{_HF_BLOCK[part]}.weight"
        else:
            hf = _HF_TOP[name]
        tensors[hf] = x.astype(dtype) if x.ndim == 2 else x
    return tensors


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, data = {}, b""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x).tobytes()
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


_TINY_HF: dict[str, bytes] = {}


def tiny_hf_directory(name: str, weights: bool = True) -> Path:
    """A scratch directory holding the TINY model's config.json (and model.safetensors)."""
    if not _TINY_HF:
        _TINY_HF["config.json"] = json.dumps(hf_config()).encode()
        _TINY_HF["model.safetensors"] = safetensors_bytes(hf_tensors())
    d = scratch(name)
    (d / "config.json").write_bytes(_TINY_HF["config.json"])
    if weights:
        (d / "model.safetensors").write_bytes(_TINY_HF["model.safetensors"])
    return d


# ---------------------------------------------------------------- choices from bytes

class Choices:
    """Decisions drawn from the fuzzer's bytes (zeros once they run out), so that mutating the
    input changes the decisions; works with any fuzzer, atheris or not."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self, n: int) -> int:
        """0..n-1."""
        if n <= 1:
            return 0
        width = (max(n - 1, 1).bit_length() + 7) // 8
        raw = self.data[self.pos:self.pos + width]
        self.pos += width
        return int.from_bytes(raw.ljust(width, b"\0"), "little") % n

    def pick(self, options):
        options = list(options)
        return options[self.int(len(options))]

    def number(self):
        kind = self.int(6)
        if kind == 0:
            return self.pick((0, 1, -1, 2**31, 2**31 - 1, 2**32, 2**63 - 1, -2**63, 2**64 - 1))
        if kind == 1:
            return self.pick((0.0, -0.0, 1e-45, 1e38, float("nan"), float("inf"), -float("inf"), 0.5))
        if kind == 2:
            return self.int(1 << 16) - (1 << 15)
        if kind == 3:
            return struct.unpack("<f", bytes(self.int(256) for _ in range(4)))[0]
        return self.int(1 << 12)

    def text(self) -> str:
        n = self.int(12)
        return bytes(self.int(256) for _ in range(n)).decode("utf-8", "replace")


# ---------------------------------------------------------------- a GGUF writer with exact framing

(T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING,
 T_ARRAY, T_UINT64, T_INT64, T_FLOAT64) = range(13)
_FORMATS = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
            T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}
_INT_RANGES = {T_UINT8: (0, 255), T_INT8: (-128, 127), T_UINT16: (0, 65535), T_INT16: (-32768, 32767),
               T_UINT32: (0, 2**32 - 1), T_INT32: (-2**31, 2**31 - 1), T_UINT64: (0, 2**64 - 1),
               T_INT64: (-2**63, 2**63 - 1)}


def _string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value) -> bytes:
    if vtype == T_STRING:
        return _string(value)
    if vtype == T_ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        value = min(max(int(value), lo), hi) if np.isfinite(float(value)) else 0
    elif vtype == T_BOOL:
        value = bool(value)
    elif vtype == T_FLOAT32:
        value = float(np.float32(float(value))) if abs(float(value)) < 3.4e38 else float(value) * float("inf")
    else:
        value = float(value)
    return struct.pack(_FORMATS[vtype], value)


def write_gguf_bytes(meta: list, tensors: list, alignment: int = 32) -> bytes:
    """meta: [(key, vtype, value)], tensors: [(name, dims, ggml_type, data bytes)]. Offsets follow
    the data sizes as given, padded to `alignment` (a value the reader must refuse is written as is)."""
    step = alignment if isinstance(alignment, int) and 0 < alignment < 4096 else 32
    meta = [m for m in meta if m[0] != "general.alignment"]
    if alignment != 32:
        meta.append(("general.alignment", T_UINT64 if alignment >= 2**32 or alignment < 0 else T_UINT32, alignment))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for key, vtype, value in meta:
        out += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    offsets, pos = [], 0
    for _, _, _, raw in tensors:
        offsets.append(pos)
        pos += -(-len(raw) // step) * step
    for (name, dims, ggml_type, _), offset in zip(tensors, offsets):
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % step)
    for (_, _, _, raw), offset in zip(tensors, offsets):
        out += raw + b"\0" * (-len(raw) % step)
    return bytes(out)


# ---------------------------------------------------------------- tiny valid models

TINY = dict(vocab=32, dim=32, layers=1, heads=2, kv_heads=1, head_dim=16, ffn=32, context=16)


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Neutral-named float32 weights of the TINY Llama-style model."""
    t = TINY
    rng = np.random.default_rng(seed)
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    shapes = {"embed": (t["vocab"], t["dim"]), "final_norm": (t["dim"],), "unembed": (t["vocab"], t["dim"])}
    for layer in range(t["layers"]):
        for name, shape in (("attn_norm", (t["dim"],)), ("q", (q, t["dim"])), ("k", (kv, t["dim"])),
                            ("v", (kv, t["dim"])), ("o", (t["dim"], q)), ("mlp_norm", (t["dim"],)),
                            ("gate", (t["ffn"], t["dim"])), ("up", (t["ffn"], t["dim"])),
                            ("down", (t["dim"], t["ffn"]))):
            shapes[f"{layer}.{name}"] = shape
    return {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in shapes.items()}


_GGUF_BLOCK = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_GGUF_TOP = {"embed": "token_embd", "final_norm": "output_norm", "unembed": "output"}


def _q8_0(x: np.ndarray) -> bytes:
    """Q8_0 blocks of 32: an f16 scale and 32 int8 values."""
    blocks = x.reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1) / 127
    scale[scale == 0] = 1
    quant = np.round(blocks / scale[:, None]).astype(np.int8)
    return b"".join(np.float16(s).tobytes() + q.tobytes() for s, q in zip(scale, quant))


def base_gguf(kind: str) -> tuple[list, list, int]:
    """(metadata, tensors, alignment) of a valid tiny GGUF: an SPM or byte-level BPE tokenizer,
    float32 or Q8_0 matrices."""
    t = TINY
    meta = [("general.architecture", T_STRING, "llama"), ("llama.context_length", T_UINT32, t["context"]),
            ("llama.embedding_length", T_UINT32, t["dim"]), ("llama.block_count", T_UINT32, t["layers"]),
            ("llama.feed_forward_length", T_UINT32, t["ffn"]), ("llama.attention.head_count", T_UINT32, t["heads"]),
            ("llama.attention.head_count_kv", T_UINT32, t["kv_heads"]),
            ("llama.attention.layer_norm_rms_epsilon", T_FLOAT32, 1e-5), ("llama.rope.freq_base", T_FLOAT32, 10000.0),
            ("llama.rope.dimension_count", T_UINT32, t["head_dim"]),
            ("tokenizer.ggml.bos_token_id", T_UINT32, 1), ("tokenizer.ggml.eos_token_id", T_UINT32, 2)]
    if kind == "bpe":
        tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("a") + 24)] + \
                 ["Ġ", "ab", "Ġa", "abc", "cd"]
        meta += [("tokenizer.ggml.model", T_STRING, "gpt2"), ("tokenizer.ggml.pre", T_STRING, "llama-bpe"),
                 ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
                 ("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, [3, 3, 3] + [1] * 29)),
                 ("tokenizer.ggml.merges", T_ARRAY, (T_STRING, ["a b", "Ġ a", "ab c", "c d"]))]
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in (0x0A, 0x20, 0x41)] + \
                 ["▁", "▁a", "b", "c", "ab", "▁ab"] + [chr(c) for c in range(ord("d"), ord("d") + 20)]
        meta += [("tokenizer.ggml.model", T_STRING, "llama"), ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
                 ("tokenizer.ggml.scores", T_ARRAY, (T_FLOAT32, [-float(i) for i in range(32)])),
                 ("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, [2, 3, 3, 6, 6, 6] + [1] * 26)),
                 ("tokenizer.ggml.add_bos_token", T_BOOL, True)]
    tensors = []
    for name, x in tiny_weights().items():
        if "." in name:
            layer, part = name.split(".")
            gname = f"blk.{layer}.{_GGUF_BLOCK[part]}.weight"
        else:
            gname = f"{_GGUF_TOP[name]}.weight"
        dims = tuple(reversed(x.shape))
        if kind == "q8" and x.ndim == 2:
            tensors.append((gname, dims, 8, _q8_0(x)))
        else:
            tensors.append((gname, dims, 0, x.tobytes()))
    return meta, tensors, 32


# Keys the readers look at, for edits to aim at.
KNOWN_KEYS = [
    "general.architecture", "general.alignment", "llama.context_length", "llama.embedding_length",
    "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.attention.key_length", "llama.attention.value_length", "llama.attention.layer_norm_rms_epsilon",
    "llama.attention.layer_norm_epsilon", "llama.rope.freq_base", "llama.rope.dimension_count",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
    "llama.rope.scaling.attn_factor", "llama.attention.sliding_window", "llama.expert_count",
    "llama.expert_used_count", "llama.vocab_size", "llama.attn_logit_softcapping", "llama.final_logit_softcapping",
    "llama.use_parallel_residual", "llama.rope.freq_base_swa", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.remove_extra_whitespaces",
]


def _random_value(c: Choices):
    vtype = c.int(13)
    if vtype == T_STRING:
        return vtype, c.pick(("llama", "gpt2", "linear", "yarn", "none", "", "qwen2", "llama-bpe")) \
            if c.int(2) else c.text()
    if vtype == T_BOOL:
        return vtype, bool(c.int(2))
    if vtype == T_ARRAY:
        etype = c.pick((T_STRING, T_INT32, T_FLOAT32, T_UINT8, T_ARRAY, T_UINT64, T_BOOL))
        items = []
        for _ in range(c.pick((0, 1, 2, 3, 32, 33))):
            if etype == T_ARRAY:
                items.append((T_INT32, [c.int(4)]))
            elif etype == T_STRING:
                items.append(c.text())
            elif etype == T_BOOL:
                items.append(bool(c.int(2)))
            else:
                items.append(c.number())
        return vtype, (etype, items)
    return vtype, c.number()


def edit_gguf(c: Choices, meta: list, tensors: list) -> None:
    """One edit of a GGUF description, in place."""
    what = c.int(7)
    if what <= 2:  # set a key (known or present) to a value of a random type
        key = c.pick(KNOWN_KEYS + [m[0] for m in meta])
        vtype, value = _random_value(c)
        meta[:] = [m for m in meta if m[0] != key] + [(key, vtype, value)]
    elif what == 3 and meta:
        del meta[c.int(len(meta))]
    elif what == 4 and tensors:  # change a tensor's dims
        i = c.int(len(tensors))
        name, dims, gtype, raw = tensors[i]
        dims = list(dims)
        j = c.int(len(dims) + 1)
        value = c.pick((0, 1, 2, 16, 32, 31, 2**31, 2**32 + 16, 2**63, 2**64 - 1))
        if j < len(dims):
            dims[j] = value
        elif len(dims) < 5:
            dims.append(value)
        tensors[i] = (name, tuple(dims), gtype, raw)
    elif what == 5 and tensors:  # change a tensor's type or drop it
        i = c.int(len(tensors))
        name, dims, gtype, raw = tensors[i]
        if c.int(3) == 0:
            del tensors[i]
        else:
            tensors[i] = (name, dims, c.pick((0, 1, 2, 8, 12, 14, 30, 3, 99, 2**31)), raw)
    elif what == 6 and tensors:  # rename a tensor, truncate or duplicate it
        i = c.int(len(tensors))
        name, dims, gtype, raw = tensors[i]
        op = c.int(3)
        if op == 0:
            tensors[i] = (c.pick(("blk.9.attn_q.weight", "blk.0.attn_q_norm.weight", "output.weight",
                                  "rope_freqs.weight", "blk.0.ffn_gate_exps.weight", "x", name + "x")),
                          dims, gtype, raw)
        elif op == 1:
            tensors[i] = (name, dims, gtype, raw[:c.int(len(raw) + 1)])
        else:
            tensors.append(tensors[i])
