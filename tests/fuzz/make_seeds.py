"""Write the seed corpus (tests/fuzz/corpus/<harness>/): tiny valid inputs of every reader, and the
regression inputs (tests/fuzz/regressions/<harness>/audit-*) of the audit that found malformed files
escaping as other exceptions, hanging or reading outside the model.

    python tests/fuzz/make_seeds.py

Both are committed; rerun this only when a reader learns a new format feature.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harnesses import (CORPUS, REGRESSIONS, T_ARRAY, T_FLOAT32, T_INT32, T_STRING, T_UINT64, TINY,  # noqa: E402
                       base_gguf, join, split, tiny_weights, write_gguf_bytes)

_HF = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "unembed": "lm_head.weight"}
_HF_BLOCK = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, data = {}, b""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x).tobytes()
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def hf_seed(dtype=np.float32, tied: bool = False, extra: dict | None = None) -> bytes:
    t = TINY
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": t["vocab"],
              "hidden_size": t["dim"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
              "num_key_value_heads": t["kv_heads"], "head_dim": t["head_dim"], "intermediate_size": t["ffn"],
              "max_position_embeddings": t["context"], "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "rope_theta": 10000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    config.update(extra or {})
    tensors = {}
    for name, x in tiny_weights().items():
        if tied and name == "unembed":
            continue
        if "." in name:
            layer, part = name.split(".")
            hf = f"model.layers.{layer}.{_HF_BLOCK[part]}.weight"
        else:
            hf = _HF[name]
        tensors[hf] = x.astype(dtype) if x.ndim == 2 else x
    return join(json.dumps(config).encode(), safetensors_bytes(tensors))


def llama2c_seed(tied: bool = True) -> bytes:
    t = TINY
    w = tiny_weights()
    L = t["layers"]
    header = struct.pack("<7i", t["dim"], t["ffn"], L, t["heads"], t["kv_heads"],
                         t["vocab"] if tied else -t["vocab"], t["context"])
    hd = t["dim"] // t["heads"]   # llama2.c derives the head size from dim
    kv = t["kv_heads"] * hd
    rng = np.random.default_rng(1)

    def stack(shape):
        return np.concatenate([rng.standard_normal(shape).astype(np.float32).ravel() * 0.3 for _ in range(L)])

    parts = [w["embed"].ravel(), stack((t["dim"],)), stack((t["dim"], t["dim"])),
             stack((kv, t["dim"])), stack((kv, t["dim"])), stack((t["dim"], t["dim"])),
             stack((t["dim"],)), stack((t["ffn"], t["dim"])), stack((t["dim"], t["ffn"])),
             stack((t["ffn"], t["dim"])), w["final_norm"].ravel(),
             np.zeros(t["context"] * hd // 2 * 2, np.float32)]
    if not tied:
        parts.append(w["unembed"].ravel())
    checkpoint = header + b"".join(p.astype(np.float32).tobytes() for p in parts)
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(8)] + \
             ["▁", "▁a", "b", "c", "ab", "▁ab", "d"] + [chr(c) for c in range(ord("e"), ord("e") + 14)]
    tokenizer = struct.pack("<i", max(len(p.encode()) for p in pieces))
    for i, p in enumerate(pieces):
        raw = p.encode()
        tokenizer += struct.pack("<fi", -float(i), len(raw)) + raw
    return join(checkpoint, tokenizer)


def _with_config(seed: bytes, **changes) -> bytes:
    config, tensors = split(seed)
    c = json.loads(config)
    c.update(changes)
    return join(json.dumps(c).encode(), tensors)


def _with_entry(seed: bytes, change: dict) -> bytes:
    config, tensors = split(seed)
    n = int.from_bytes(tensors[:8], "little")
    header = json.loads(tensors[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first].update(change)
    text = json.dumps(header).encode()
    return join(config, len(text).to_bytes(8, "little") + text + tensors[8 + n:])


def _gguf_with(key: str, vtype: int, value) -> bytes:
    meta, tensors, alignment = base_gguf("spm")
    meta = [m for m in meta if m[0] != key] + [(key, vtype, value)]
    return write_gguf_bytes(meta, tensors, alignment)


def audit_inputs() -> dict[str, dict[str, bytes]]:
    """The malformed inputs of the audit, one file each."""
    hf = hf_seed()
    config_cases = {"heads-0": dict(num_attention_heads=0), "architectures-5": dict(architectures=5),
                    "list-for-number": dict(hidden_size=[32]), "hidden-1e400": dict(hidden_size=float("inf")),
                    "rope-scaling-x": dict(rope_scaling="x"), "layers-1e6": dict(num_hidden_layers=10**6),
                    "layers-1e9": dict(num_hidden_layers=10**9), "rope-theta-0": dict(rope_theta=0),
                    "rope-theta-nan": dict(rope_theta=float("nan")), "context-2e31": dict(max_position_embeddings=2**31)}
    hf_cases = {f"audit-{k}": _with_config(hf, **v) for k, v in config_cases.items()}
    config, tensors = split(hf)
    hf_cases["audit-nested-json"] = join(b"[" * 100_000 + b"]" * 100_000, tensors)
    for name, change in {"negative-shape": {"shape": [-1, 32]}, "wrapping-shape": {"shape": [2**32, 2**32]},
                         "float-offsets": {"data_offsets": [0.0, 4096.0]}, "string-offsets": {"data_offsets": ["0", "1"]},
                         "list-dtype": {"dtype": ["F32"]}}.items():
        hf_cases[f"audit-{name}"] = _with_entry(hf, change)
    gguf_cases = {f"audit-{k}": _gguf_with(*v) for k, v in {
        "array-rope-scaling-type": ("llama.rope.scaling.type", T_ARRAY, (T_STRING, ["linear"])),
        "array-tokenizer-model": ("tokenizer.ggml.model", T_ARRAY, (T_STRING, ["llama"])),
        "array-tokenizer-pre": ("tokenizer.ggml.pre", T_ARRAY, (T_INT32, [1])),
        "array-add-bos": ("tokenizer.ggml.add_bos_token", T_ARRAY, (T_INT32, [1])),
        "string-add-space-prefix": ("tokenizer.ggml.add_space_prefix", T_STRING, "yes"),
        "nan-token-types": ("tokenizer.ggml.token_type", T_ARRAY, (T_FLOAT32, [float("nan")] * 32)),
        "context-2e31": ("llama.context_length", T_UINT64, 2**31)}.items()}
    gguf_cases["audit-alignment-1"] = write_gguf_bytes(*base_gguf("q8")[:2], alignment=1)
    checkpoint, tokenizer = split(llama2c_seed())
    nan_score = bytearray(tokenizer)
    nan_score[4:8] = struct.pack("<f", float("nan"))
    llama2c_cases = {"audit-nan-score": join(checkpoint, bytes(nan_score)),
                     "audit-layers-huge": join(checkpoint[:8] + struct.pack("<i", 2**31 - 1) + checkpoint[12:], tokenizer)}
    return {"safetensors_config": hf_cases, "gguf_bytes": gguf_cases, "llama2c": llama2c_cases}


def main() -> None:
    seeds = {
        "gguf_bytes": {f"tiny-{k}": write_gguf_bytes(*base_gguf(k)) for k in ("spm", "bpe", "q8")},
        "gguf_structured": {"zero": b"", "bpe": b"\x01", "q8": b"\x02",
                            "edits": bytes(np.random.default_rng(0).integers(0, 256, 96, dtype=np.uint8))},
        "safetensors_config": {"tiny-f32": hf_seed(), "tiny-f16-tied": hf_seed(np.float16, tied=True),
                               "tiny-scaled": hf_seed(extra={"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                              "low_freq_factor": 1.0,
                                                                              "high_freq_factor": 4.0,
                                                                              "original_max_position_embeddings": 8},
                                                             "sliding_window": 4})},
        "llama2c": {"tiny-tied": llama2c_seed(True), "tiny-untied": llama2c_seed(False)},
    }
    for harness, files in audit_inputs().items():
        for name, data in files.items():
            (REGRESSIONS / harness / name).write_bytes(data)
    for harness, files in seeds.items():
        d = CORPUS / harness
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
            print(f"{d / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
