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
from harnesses import (CORPUS, REGRESSIONS, SHARDS, T_ARRAY, T_FLOAT32, T_INT32, T_STRING, T_UINT64,  # noqa: E402
                       TINY, base_gguf, hf_config, hf_tensors, join, safetensors_bytes, split, tiny_weights,
                       write_gguf_bytes)

def hf_seed(dtype=np.float32, tied: bool = False, extra: dict | None = None) -> bytes:
    return join(json.dumps(hf_config(tied, **(extra or {}))).encode(), safetensors_bytes(hf_tensors(dtype, tied)))


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
    generation_cases = {f"audit-{k}": json.dumps(v).encode() for k, v in {
        "sequences-1e9": {"do_sample": True, "num_return_sequences": 10**9},   # hung building a billion runs
        "beams-1e9": {"num_beams": 10**9},
        "suppress-tokens-int": {"suppress_tokens": 5},                         # TypeError
        "length-penalty-1e308": {"num_beams": 2, "length_penalty": 1e308},     # OverflowError in beam scores
        "temperature-negative": {"do_sample": True, "temperature": -1},        # refused only when generating
        "suppress-outside-vocab": {"suppress_tokens": [10**9]}}.items()}
    index, shards = split(sharded_seeds()["two-shards"])
    weight_map = json.loads(index)["weight_map"]
    first = next(iter(weight_map))
    sharded_cases = {f"audit-{k}": join(json.dumps({"weight_map": {**weight_map, first: name}}).encode(), shards)
                     for k, name in {"traversal": "../outside.safetensors", "absolute": "/etc/passwd",
                                     "fifo": "fifo.safetensors", "directory": "dir.safetensors",
                                     "symlink-out": "link.safetensors", "empty-name": "",
                                     "nul-in-name": "a\0b.safetensors"}.items()}  # escaped as a ValueError
    tokenizer, _ = split(tokenizer_seeds()["bpe"])
    tokenizer_cases = {f"audit-{k}": join(tokenizer, config) for k, config in {
        "config-a-list": b"[1]",                                                   # AttributeError
        "config-nested": b"[" * 100_000 + b"]" * 100_000,                          # RecursionError
        "template-a-number": json.dumps({"chat_template": 5}).encode(),
        "template-repeats-1e10": json.dumps({"chat_template": "{{ 'a' * 10**10 }}"}).encode(),  # memory
        "template-power": json.dumps({"chat_template": "{{ 7 ** (10 ** 7) }}"}).encode()}.items()}
    tokenizer_cases["audit-tokenizer-nested"] = join(b"[" * 100_000 + b"]" * 100_000, b"")
    tokenizer_cases["audit-tokenizer-not-utf8"] = join(b'{"model": "\xff\xfe"}', b"")
    return {"safetensors_config": hf_cases, "gguf_bytes": gguf_cases, "llama2c": llama2c_cases,
            "generation_config": generation_cases, "sharded_index": sharded_cases, "tokenizer_json": tokenizer_cases}


def tokenizer_seeds() -> dict[str, bytes]:
    """tokenizer.json files of each model kind the tokenizers library has (32 ids, as TINY's vocabulary),
    with normalizers, pre-tokenizers, decoders and post-processors; one with a tokenizer_config.json
    holding a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("a") + 20)]
    special = ["<unk>", "<s>", "</s>"]
    bpe_vocab = {t: i for i, t in enumerate(special + letters + ["Ġ", "ab", "Ġa", "cd", "abc", "H", "W", "!", "1"])}
    bpe = Tokenizer(models.BPE(bpe_vocab, [("a", "b"), ("Ġ", "a"), ("c", "d"), ("ab", "c")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    bpe.add_special_tokens(["<s>", "</s>"])
    unigram = Tokenizer(models.Unigram([(t, -float(i)) for i, t in enumerate(
        special + ["▁", "▁a", "b", "c", "ab", "▁ab"] + [f"<0x{b:02X}>" for b in range(4)] + letters[3:22])], 0,
        byte_fallback=True))
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    wordpiece_vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]"] + letters + ["##a", "##b", "##c",
                                                                                           "hello", ",", "!", "1",
                                                                                           "2", "<s>"])}
    wordpiece = Tokenizer(models.WordPiece(wordpiece_vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    wordlevel = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + letters + ["Hello", ",", "12", "!",
                                                                                               "wörld", "x", "y"])},
                                           unk_token="<unk>"))
    wordlevel.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation()])
    chat = {"chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                             "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": False}
    return {"bpe": join(bpe.to_str().encode(), b""), "unigram": join(unigram.to_str().encode(), b""),
            "wordpiece": join(wordpiece.to_str().encode(), b""),
            "wordlevel-chat": join(wordlevel.to_str().encode(), json.dumps(chat).encode())}


def generation_seeds() -> dict[str, bytes]:
    """generation_config.json files as models ship them: greedy, sampling, lengths, penalties."""
    files = {
        "greedy": {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46.0"},
        "sampling": {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                     "eos_token_id": [2, 3], "max_new_tokens": 3},
        "penalties": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "suppress_tokens": [4, 5],
                      "max_length": 3, "pad_token_id": 0, "early_stopping": True},
        "beams": {"num_beams": 2, "num_return_sequences": 2, "length_penalty": 1.0, "max_new_tokens": 2},
    }
    return {name: json.dumps(value).encode() for name, value in files.items()}


def sharded_seeds() -> dict[str, bytes]:
    """The TINY model split over two shards, with and without the index's metadata."""
    tensors = hf_tensors()
    names = sorted(tensors)
    halves = (names[:len(names) // 2], names[len(names) // 2:])
    shards = [safetensors_bytes({n: tensors[n] for n in half}) for half in halves]
    weight_map = {n: SHARDS[i] for i, half in enumerate(halves) for n in half}
    with_metadata = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    return {"two-shards": join(json.dumps(with_metadata).encode(), join(shards[0], shards[1])),
            "no-metadata": join(json.dumps({"weight_map": weight_map}).encode(), join(shards[0], shards[1]))}


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
        "tokenizer_json": tokenizer_seeds(),
        "generation_config": generation_seeds(),
        "sharded_index": sharded_seeds(),
    }
    for harness, files in audit_inputs().items():
        (REGRESSIONS / harness).mkdir(parents=True, exist_ok=True)
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
