"""Tokenizers embedded in GGUF files give the ids the original tokenizers give.

Two references, on real vocabularies from llama.cpp's test data (kept with the converter, see
llama_cpp_converter.py):
* llama.cpp's own test strings with the ids the original Hugging Face tokenizers produced
  (the `.inp`/`.out` files beside each vocabulary);
* a multilingual corpus of our own, against a tokenizer rebuilt independently from the same file:
  the vocabulary and merges read with the `gguf` package's reader, put under the pre-tokenizer the
  original model publishes in its tokenizer.json (byte-level BPE, through `tokenizers`), or turned
  into a SentencePiece model proto run by `sentencepiece` itself (SentencePiece vocabularies).
"""
from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from llama_cpp_converter import converter_source
from tokentrail.loading.gguf import read_gguf_tokenizer

SEP = "\n__ggml_vocab_test__\n"

# Each byte-level vocabulary with the pre-tokenizer and model flags of its original tokenizer.json.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN35_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}"
                "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


GPT2_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS_THEN_BYTES = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                           GPT2_BYTES]}
BYTE_LEVEL = {  # vocabulary: (original pre_tokenizer, ignore_merges)
    "llama-bpe": (_split_then_bytes(LLAMA3_SPLIT), True),     # Meta Llama 3
    "qwen2": (_split_then_bytes(QWEN2_SPLIT), False),         # Qwen2 / Qwen2.5 / Qwen3
    "qwen35": (_split_then_bytes(QWEN35_SPLIT), False),       # Qwen3.5
    "gpt-2": (GPT2_BYTES, False),                             # GPT-2
    "mpt": (GPT2_BYTES, False),                               # MPT (the GPT-NeoX vocabulary)
    "starcoder": (DIGITS_THEN_BYTES, False),                  # StarCoder (as SmolLM)
    "refact": (DIGITS_THEN_BYTES, False),
    "command-r": (DIGITS_THEN_BYTES, False),
}
SENTENCEPIECE = ("llama-spm", "phi-3")                        # Llama 2, Phi-3

CORPUS = [
    "Hello world", " Hello  world ", "  leading and trailing  ", "\t\ttabs\tand\nnew\n\nlines\r\n",
    "café", unicodedata.normalize("NFD", "café naïve coöperate"), "Ångström résumé déjà vu", "Straße",
    "Tiếng Việt có dấu: người Việt, Cửa Việt, chuyện", "中文分词测试：我们今天去公园。", "日本語のテキスト、カタカナとひらがな",
    "한국어 문장입니다", "Привет, мир! Ёлка", "Ελληνικά κείμενα", "עברית וערבית: مرحبا بالعالم", "हिन्दी पाठ",
    "emoji 🦙🦙 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️", "def f(x):\n    return x**2  # square\n", "if (a != b) { c[i] += 1; }",
    "int main() {\n\tprintf(\"%d\\n\", 42);\n}", "1234567890 3.14159 1,000,000 2024-11-30", "x=1;y=22;z=333;w=4444",
    "     ", "\n\n\n", " \n \n", "I'm you're they'll she'd we've IT'S", "...!!!???---___***", "a\u00a0b\u200bc",
    "[INST] brackets [/INST]", "ﬁ ligatures ﬀ and ＦＵＬＬＷＩＤＴＨ", "mixed 中文 English 123 😀 text",
]


@functools.lru_cache(maxsize=None)
def tokenizer_of(name: str):
    return read_gguf_tokenizer(vocab_dir() / f"ggml-vocab-{name}.gguf")


def vocab_dir() -> Path:
    d = converter_source() / "vocab"
    if not d.exists():
        pytest.skip(f"no tokenizer test vocabularies at {d}")
    return d


def llama_cpp_cases(path: Path) -> list[tuple[str, list[int]]]:
    texts = (path.parent / (path.name + ".inp")).read_text(encoding="utf-8").split(SEP)
    ids = (path.parent / (path.name + ".out")).read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


@pytest.mark.parametrize("name", list(BYTE_LEVEL) + list(SENTENCEPIECE))
def test_ids_of_the_original_tokenizers(name):
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    tok = tokenizer_of(name)
    cases = llama_cpp_cases(path)
    assert len(cases) > 40
    for text, want in cases:
        assert tok.encode(text, special=False) == want, repr(text)


def _gguf_fields(path: Path) -> dict:
    """Tokenizer metadata read with the gguf package's own reader (not tokentrail's parser)."""
    gguf = require("gguf")
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = field.contents()
    return out


@pytest.mark.parametrize("name", list(BYTE_LEVEL))
def test_byte_level_vocabularies_on_a_multilingual_corpus(name):
    import tokenizers

    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    meta = _gguf_fields(path)
    pre, ignore_merges = BYTE_LEVEL[name]
    vocab = {}
    for i, t in enumerate(meta["tokenizer.ggml.tokens"]):
        vocab.setdefault(t, i)
    # Pieces the file marks user-defined are the original's added tokens (GPT-NeoX's runs of spaces):
    # matched whole before pre-tokenization.
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": False}
             for i, (t, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
             if int(kind) == 4]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab,
                      "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]}}
    reference = tokenizers.Tokenizer.from_str(json.dumps(spec))
    ours = tokenizer_of(name)
    for text in CORPUS:
        want = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, special=False) == want, repr(text)
        assert ours.decode(want) == text, repr(text)


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_sentencepiece_vocabularies_on_a_multilingual_corpus(name):
    spm = require("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    meta = _gguf_fields(path)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    # SentencePiece has exactly one unknown piece, <unk>; other pieces marked unknown are padding.
    tokens = list(meta["tokenizer.ggml.tokens"])
    proto.trainer_spec.unk_id = tokens.index("<unk>")
    for piece, score, kind in zip(tokens, meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]):
        p = proto.pieces.add()
        kind = 2 if piece == "<unk>" else (5 if int(kind) == 2 else int(kind))
        p.piece, p.score, p.type = piece, float(score), kinds[kind]
    reference = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ours = tokenizer_of(name)
    for text in CORPUS:
        want = reference.encode(text)
        assert ours.encode(text, special=False) == want, repr(text)
    assert np.all(np.array([len(reference.encode(t)) for t in CORPUS]) > 0)
