"""GGUF reading and writing.

References: files written by the `gguf` package's GGUFWriter and read back by
its GGUFReader, gguf.quants for block data, sentencepiece and transformers'
pure-Python GPT-2 tokenizer for token ids, transformers for logits.
"""
from __future__ import annotations

import io
import json
import random
import struct

import numpy as np
import pytest

from conftest import greedy as continue_greedily
from conftest import require, require_stories
from tokentrail.config import expected_shapes
from tokentrail.errors import CheckpointError
from tokentrail.loading import read_checkpoint
from tokentrail.loading.gguf import GGUFFile, read_gguf
from tokentrail.loading.gguf_writer import to_adjacent, write_gguf
from tokentrail.loading.quant import quantize

gguf = require("gguf")
T = gguf.GGMLQuantizationType

CORPUS = [
    "Once upon a time, there was a little boy named Tim. Tim had a red ball.",
    "He liked to play with his ball in the park. One day, Tim saw a big dog.",
    "The dog wanted to play too. They played all day and had lots of fun!",
    "Café, naïve, jalapeño: 日本 and ünïcödé words; 42 apples, 7 pears.",
]
SAMPLES = ["Once upon a time", "Tim saw a big dog.", "  two  spaces ", "naïve café 日本語 😀",
           "tabs\tand\nnewlines", "", "x", "12345 apples"]


def random_texts(pieces: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    odd = list("  \n\t.,!?'-éü日😀0123") + ["\u2581", "Ġ"]
    return ["".join(rng.choice(pieces) if rng.random() < 0.7 else rng.choice(odd)
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]


# --------------------------------------------------------------------------
# a small llama model written directly with gguf.GGUFWriter
# --------------------------------------------------------------------------

D, F, L, H, KV, HD = 256, 512, 2, 4, 2, 64   # rows of 256 so every block type fits
TYPES = {  # one tensor of every supported type
    "token_embd.weight": T.Q8_0, "attn_q.weight": T.Q4_K, "attn_k.weight": T.Q6_K,
    "attn_v.weight": T.BF16, "attn_output.weight": T.Q4_0, "ffn_gate.weight": T.F16,
    "ffn_up.weight": T.Q8_0, "ffn_down.weight": T.Q4_K, "output.weight": T.Q6_K,
}


def spm_model(remove_extra_whitespaces: bool = False, vocab_size: int = 320):
    spm = require("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", character_coverage=1.0,
        remove_extra_whitespaces=remove_extra_whitespaces, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def add_spm_tokenizer(w, sp, remove_extra_whitespaces: bool) -> None:
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.remove_extra_whitespaces", remove_extra_whitespaces)


def encode_tensor(x: np.ndarray, qtype):
    """(array, raw dtype) as GGUFWriter.add_tensor wants them."""
    if qtype == T.F32:
        return x.astype(np.float32), None
    if qtype == T.F16:
        return x.astype(np.float16), None
    if qtype in (T.Q8_0, T.Q4_0, T.BF16):
        return gguf.quants.quantize(x, qtype), qtype
    return quantize(x, qtype.name.lower()), qtype  # k-quants: gguf.quants cannot encode them


def write_llama(path, sp=None, arch="llama", metadata=None, skip=(), extra_tensors=None,
                remove_extra_whitespaces=False, tied=False, seed=0, meta_ffn=F):
    rng = np.random.default_rng(seed)
    vocab = sp.vocab_size() if sp is not None else 320
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(meta_ffn)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HD)
    for key, (value, vtype) in (metadata or {}).items():
        w.add_key_value(key, value, vtype)
    if sp is not None:
        add_spm_tokenizer(w, sp, remove_extra_whitespaces)
    shapes = {"token_embd.weight": (vocab, D), "output_norm.weight": (D,), "output.weight": (vocab, D)}
    for layer in range(L):
        for name, shape in (("attn_norm.weight", (D,)), ("attn_q.weight", (H * HD, D)),
                            ("attn_k.weight", (KV * HD, D)), ("attn_v.weight", (KV * HD, D)),
                            ("attn_output.weight", (D, H * HD)), ("ffn_norm.weight", (D,)),
                            ("ffn_gate.weight", (F, D)), ("ffn_up.weight", (F, D)), ("ffn_down.weight", (D, F))):
            shapes[f"blk.{layer}.{name}"] = shape
    if arch == "qwen2":
        for layer in range(L):
            for x, n in (("q", H * HD), ("k", KV * HD), ("v", KV * HD)):
                shapes[f"blk.{layer}.attn_{x}.bias"] = (n,)
    if tied:
        del shapes["output.weight"]
    shapes.update(extra_tensors or {})
    values = {}
    for name, shape in shapes.items():
        if name in skip:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        qtype = TYPES.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, T.F32)
        if len(shape) == 1:
            qtype = T.F32
        array, raw = encode_tensor(x, qtype)
        values[name] = (array, qtype)
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


@pytest.fixture(scope="module")
def sp():
    return spm_model()


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory, sp):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_llama(path, sp)


def test_gguf_package_file_loads(llama_file):
    path, values = llama_file
    ck = read_gguf(path)
    c = ck.config
    assert (c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_size,
            c.max_seq_len) == (320, D, L, H, KV, HD, F, 128)
    assert (c.norm, c.norm_eps, c.rope_theta, c.rope_layout, c.tied_embeddings) == \
        ("rms", 1e-6, 500000.0, "adjacent", False)
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    want = expected_shapes(c)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight": "embed.weight", "output.weight": "unembed.weight",
             "output_norm.weight": "final_norm.weight", "blk.1.attn_q.weight": "blocks.1.attn.q.weight",
             "blk.1.attn_k.weight": "blocks.1.attn.k.weight", "blk.0.attn_v.weight": "blocks.0.attn.v.weight",
             "blk.0.attn_output.weight": "blocks.0.attn.o.weight", "blk.0.ffn_gate.weight": "blocks.0.mlp.gate.weight",
             "blk.0.ffn_up.weight": "blocks.0.mlp.up.weight", "blk.1.ffn_down.weight": "blocks.1.mlp.down.weight",
             "blk.1.ffn_norm.weight": "blocks.1.mlp_norm.weight", "blk.0.attn_norm.weight": "blocks.0.attn_norm.weight"}
    assert len(ck.weights) == len(values)
    for gname, neutral in names.items():
        ours, ref = ck.weights[neutral], by_name[gname]
        assert ours.shape == want[neutral]
        assert ours.dtype == values[gname][1].name.lower()
        # Same bytes as the reference reader, decoded the same way as gguf.quants.
        np.testing.assert_array_equal(ours.data.reshape(-1).view(np.uint8), np.asarray(ref.data).reshape(-1).view(np.uint8))
        np.testing.assert_array_equal(ours.to_float32(), gguf.quants.dequantize(ref.data, ref.tensor_type).reshape(ours.shape))
        assert not ours.data.flags.writeable and not ours.data.flags.owndata  # a view of the file


def test_spm_tokenizer_from_gguf_matches_sentencepiece(llama_file, sp):
    ck = read_gguf(llama_file[0])
    tok = ck.tokenizer
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(259, sp.vocab_size())]
    for text in SAMPLES + random_texts(pieces, 800):
        want = sp.encode(text)
        assert tok.encode(text, special=False) == want, text
        assert tok.decode(want) == sp.decode(want), text
    assert tok.encode("Tim") == [1] + sp.encode("Tim")


def test_spm_tokenizer_with_whitespace_collapsing(tmp_path):
    sp = spm_model(remove_extra_whitespaces=True)
    write_llama(tmp_path / "m.gguf", sp, remove_extra_whitespaces=True)
    tok = read_gguf(tmp_path / "m.gguf").tokenizer
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(259, sp.vocab_size())]
    for text in SAMPLES + random_texts(pieces, 300, seed=1):
        assert tok.encode(text, special=False) == sp.encode(text), text


def test_every_metadata_type(tmp_path):
    V = gguf.GGUFValueType
    meta = {
        "test.u8": (200, V.UINT8), "test.i8": (-100, V.INT8), "test.u16": (60000, V.UINT16),
        "test.i16": (-30000, V.INT16), "test.u32": (4_000_000_000, V.UINT32), "test.i32": (-2_000_000_000, V.INT32),
        "test.f32": (0.25, V.FLOAT32), "test.u64": (2 ** 63 + 5, V.UINT64), "test.i64": (-(2 ** 62), V.INT64),
        "test.f64": (1e-300, V.FLOAT64), "test.bool": (True, V.BOOL), "test.str": ("héllo ✓", V.STRING),
        "test.arr_i": ([1, -2, 3], V.ARRAY), "test.arr_f": ([0.5, 1.5], V.ARRAY),
        "test.arr_s": (["a", "", "日本"], V.ARRAY), "test.arr_b": ([True, False], V.ARRAY),
        "test.nested": ([[1, 2], [3]], V.ARRAY),
    }
    write_llama(tmp_path / "m.gguf", metadata=meta)
    ours = GGUFFile(tmp_path / "m.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key in meta:
        field = ref.fields[key]
        assert ours.metadata_types[key] == field.types[0], key
        got = ours.metadata[key]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        if key == "test.nested":
            got = [g.tolist() for g in got]
            want = [[1, 2], [3]]
        else:
            want = field.contents()
        if key == "test.f32":
            assert got == pytest.approx(want)
        else:
            assert got == want, key
    assert ours.version == 3 and ours.alignment == 32


def test_version_2_loads_and_others_do_not(llama_file, tmp_path):
    data = bytearray(llama_file[0].read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share this layout (v3 added big-endian files)
    (tmp_path / "v2.gguf").write_bytes(bytes(data))
    assert read_gguf(tmp_path / "v2.gguf").config.hidden_size == D
    for version, match in ((1, "unsupported GGUF version 1"), (4, "version 4"), (3 << 24, "big-endian")):
        data[4:8] = struct.pack("<I", version)
        (tmp_path / "v.gguf").write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=match):
            read_gguf(tmp_path / "v.gguf")


# --------------------------------------------------------------------------
# malformed files
# --------------------------------------------------------------------------

def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset just after the tensor's name in the tensor-info table (n_dims comes next)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.rindex(key)
    return pos + len(key)


def expect_error(tmp_path, data: bytes, *needles: str, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    message = str(e.value)
    assert str(p) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_malformed_headers(llama_file, tmp_path):
    good = llama_file[0].read_bytes()
    expect_error(tmp_path, b"", "empty")
    expect_error(tmp_path, b"GGUF\x03\x00", "file ends inside version")
    expect_error(tmp_path, b"GGML" + good[4:], "not a GGUF file")
    bad = bytearray(good)
    bad[24:32] = struct.pack("<Q", 1 << 60)  # length of the first metadata key
    expect_error(tmp_path, bytes(bad), "string length", "metadata key #0")
    bad = bytearray(good)
    bad[16:24] = struct.pack("<Q", 1 << 40)  # metadata count
    expect_error(tmp_path, bytes(bad), "metadata count")
    bad = bytearray(good)
    bad[8:16] = struct.pack("<Q", 1 << 40)  # tensor count
    expect_error(tmp_path, bytes(bad), "tensor count")


def test_malformed_vocabulary_strings_are_named(llama_file, tmp_path):
    """The vocabulary is read as one array of strings: a bad length or a cut inside one names the
    array and the string's index."""
    good = llama_file[0].read_bytes()
    key = b"tokenizer.ggml.tokens"
    first = good.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4 + 8  # type, element type, count
    count = struct.unpack_from("<Q", good, first - 8)[0]

    def string_at(index):
        at = first
        for _ in range(index):
            at += 8 + struct.unpack_from("<Q", good, at)[0]
        return at

    bad = bytearray(good)
    at = string_at(3)
    bad[at:at + 8] = struct.pack("<Q", 1 << 60)
    expect_error(tmp_path, bytes(bad), "string length", "tokenizer.ggml.tokens[3]")
    # A cut inside the length of one of the last strings (near the start, the array's count alone
    # would be larger than what is left).
    at = string_at(count - 2)
    expect_error(tmp_path, good[:at + 5], "file ends inside", f"tokenizer.ggml.tokens[{count - 2}]")


def test_truncation_anywhere_raises_checkpoint_error(llama_file, tmp_path):
    good = llama_file[0].read_bytes()
    header_end = GGUFFile(llama_file[0]).tensors["token_embd.weight"].offset
    cuts = list(range(0, header_end, max(1, header_end // 150))) + [header_end, len(good) - 1]
    for cut in cuts:
        p = tmp_path / "cut.gguf"
        p.write_bytes(good[:cut])
        with pytest.raises(CheckpointError):
            read_gguf(p)
    # A cut in the data area names the tensor whose bytes are missing.
    last = max(GGUFFile(llama_file[0]).tensors.values(), key=lambda t: t.offset)
    expect_error(tmp_path, good[:last.offset + 10], "runs past the end", repr(last.name))


def test_bad_tensor_infos(llama_file, tmp_path):
    good = llama_file[0].read_bytes()
    name = "blk.1.attn_k.weight"
    at = tensor_info_offset(good, name)
    n_dims = struct.unpack_from("<I", good, at)[0]
    type_at = at + 4 + 8 * n_dims
    offset_at = type_at + 4

    def patched(pos, fmt, value):
        b = bytearray(good)
        struct.pack_into(fmt, b, pos, value)
        return bytes(b)

    expect_error(tmp_path, patched(type_at, "<I", int(T.Q2_K)), "Q2_K", repr(name))
    expect_error(tmp_path, patched(type_at, "<I", 200), "unknown type 200", repr(name))
    expect_error(tmp_path, patched(at, "<I", 7), "dimensions", repr(name))
    expect_error(tmp_path, patched(at + 4, "<Q", 0), "empty dimension", repr(name))
    expect_error(tmp_path, patched(at + 4, "<Q", 100), "whole blocks", repr(name))  # q6_k rows of 100
    expect_error(tmp_path, patched(at + 4 + 8, "<Q", 1 << 40), "runs past the end", repr(name))
    expect_error(tmp_path, patched(offset_at, "<Q", 1 << 62), "runs past the end", repr(name))
    expect_error(tmp_path, patched(offset_at, "<Q", 3), "not a multiple of the alignment", repr(name))


def test_random_corruption_never_crashes(llama_file, tmp_path):
    good = llama_file[0].read_bytes()
    header_end = GGUFFile(llama_file[0]).tensors["token_embd.weight"].offset
    rng = random.Random(0)
    p = tmp_path / "fuzz.gguf"
    for _ in range(120):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(header_end)] = rng.randrange(256)
        p.write_bytes(bytes(b))
        try:
            read_gguf(p)
        except CheckpointError:
            pass


def test_model_level_errors(tmp_path):
    p = tmp_path / "m.gguf"
    write_llama(p, arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon'"):
        read_gguf(p)
    write_llama(p, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="blocks.1.mlp.up.weight"):
        read_gguf(p)
    write_llama(p, extra_tensors={"rope_freqs.weight": (HD // 2,)})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        read_gguf(p)
    write_llama(p, extra_tensors={"blk.0.mystery.weight": (D,)})
    with pytest.raises(CheckpointError, match="blk.0.mystery.weight"):
        read_gguf(p)
    V = gguf.GGUFValueType
    write_llama(p, metadata={"llama.attention.key_length": (32, V.UINT32),
                             "llama.attention.value_length": (32, V.UINT32)})
    with pytest.raises(CheckpointError, match="rope.dimension_count"):  # 32-dim heads, 64 rotary dims
        read_gguf(p)
    write_llama(p, meta_ffn=F + 32)
    with pytest.raises(CheckpointError, match="blk.0.ffn_gate.weight"):  # rows disagree with metadata
        read_gguf(p)
    write_llama(p, metadata={"tokenizer.ggml.model": ("bert", V.STRING),
                             "tokenizer.ggml.tokens": (["a"] * 10, V.ARRAY)})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model"):
        read_gguf(p)
    write_llama(p, metadata={"general.alignment": (48, V.UINT32)})
    with pytest.raises(CheckpointError, match="power of two"):
        read_gguf(p)


def test_qwen2_biases_and_half_layout(tmp_path):
    write_llama(tmp_path / "q.gguf", arch="qwen2", tied=True)
    ck = read_gguf(tmp_path / "q.gguf")
    assert ck.config.rope_layout == "half" and ck.config.tied_embeddings
    assert ck.weights["blocks.1.attn.k.bias"].shape == (KV * HD,)
    assert "unembed.weight" not in ck.weights


# --------------------------------------------------------------------------
# gpt2: fused qkv and a byte-level BPE tokenizer
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    """A gpt2 GGUF written with GGUFWriter, and transformers' pure-Python GPT-2
    tokenizer loaded from the same vocabulary and merges as the reference."""
    tf = require("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("gpt2")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer_tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    spec = json.loads(trainer_tok.to_str())
    vocab = spec["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ref = tf.GPT2Tokenizer(str(d / "vocab.json"), str(d / "merges.txt"))

    n_vocab, dm, ff, layers, heads, ctx = len(vocab), 64, 256, 2, 4, 32
    tokens = [None] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(d / "gpt2.gguf"), "gpt2")
    w.add_context_length(ctx)
    w.add_embedding_length(dm)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    arrays = {"token_embd.weight": (n_vocab, dm), "position_embd.weight": (ctx, dm),
              "output_norm.weight": (dm,), "output_norm.bias": (dm,)}
    for layer in range(layers):
        for name, shape in (("attn_norm.weight", (dm,)), ("attn_norm.bias", (dm,)),
                            ("attn_qkv.weight", (3 * dm, dm)), ("attn_qkv.bias", (3 * dm,)),
                            ("attn_output.weight", (dm, dm)), ("attn_output.bias", (dm,)),
                            ("ffn_norm.weight", (dm,)), ("ffn_norm.bias", (dm,)),
                            ("ffn_up.weight", (ff, dm)), ("ffn_up.bias", (ff,)),
                            ("ffn_down.weight", (dm, ff)), ("ffn_down.bias", (dm,))):
            arrays[f"blk.{layer}.{name}"] = shape
    values = {}
    for name, shape in arrays.items():
        values[name] = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, values[name] if len(shape) == 1 else values[name].astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "gpt2.gguf", values, ref, list(vocab)


def test_gpt2_fused_qkv_split_into_views(gpt2_file):
    path, values, _, _ = gpt2_file
    ck = read_gguf(path)
    c = ck.config
    assert (c.norm, c.activation, c.position, c.gated_mlp, c.tied_embeddings) == \
        ("layer", "gelu_tanh", "learned", False, True)
    fused = values["blk.1.attn_qkv.weight"].astype(np.float16)
    for i, x in enumerate("qkv"):
        w = ck.weights[f"blocks.1.attn.{x}.weight"]
        assert w.shape == (64, 64) and w.dtype == "f16"
        np.testing.assert_array_equal(w.data, fused[64 * i:64 * (i + 1)])
        np.testing.assert_array_equal(ck.weights[f"blocks.1.attn.{x}.bias"].data,
                                      values["blk.1.attn_qkv.bias"][64 * i:64 * (i + 1)])
    # Views, not copies: k starts in memory exactly where q ends, inside the file mapping.
    q, k = ck.weights["blocks.1.attn.q.weight"].data, ck.weights["blocks.1.attn.k.weight"].data
    assert not q.flags.owndata and not q.flags.writeable
    assert k.__array_interface__["data"][0] == q.__array_interface__["data"][0] + q.nbytes
    np.testing.assert_array_equal(ck.weights["pos_embed.weight"].to_float32(),
                                  values["position_embd.weight"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(ck.weights["final_norm.bias"].data, values["output_norm.bias"])


def test_gpt2_tokenizer_matches_transformers_slow_tokenizer(gpt2_file):
    path, _, ref, pieces = gpt2_file
    tok = read_gguf(path).tokenizer
    assert not tok.add_bos
    texts = SAMPLES + CORPUS + random_texts([p.replace("Ġ", " ") for p in pieces if p != "<|endoftext|>"], 300, seed=3)
    for text in texts:
        want = ref.encode(text)
        assert tok.encode(text) == want, text
        assert tok.decode(want) == ref.decode(want) == text, text
    eot = tok.encode("<|endoftext|>")
    assert eot == [tok.eos_ids[0]] and tok.decode(eot) == ""


# --------------------------------------------------------------------------
# our writer
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    return read_checkpoint(require_stories() / "stories260K.bin")


@pytest.mark.parametrize("dtype", ("f32", "f16", "q8_0", "q4_0"))
def test_stories_round_trip(stories, tmp_path, dtype):
    path = write_gguf(stories, tmp_path / f"s-{dtype}.gguf", dtype)
    back = read_gguf(path)
    a, b = stories.config.to_dict(), back.config.to_dict()
    assert a.pop("architecture") == "llama2.c" and b.pop("architecture") == "llama"
    assert a == b
    assert set(back.weights) == set(stories.weights)
    for name, w in stories.weights.items():
        got = back.weights[name]
        x = w.to_float32()
        if len(w.shape) == 1:
            assert got.dtype == "f32"
            np.testing.assert_array_equal(got.data, x)
        elif dtype == "f32":
            np.testing.assert_array_equal(got.data, x)
        elif dtype == "f16" or w.shape[1] % 32:  # rows of 172 cannot be quantized: f16
            assert got.dtype == "f16"
            np.testing.assert_array_equal(got.data, x.astype(np.float16))
        else:
            assert got.dtype == dtype
            np.testing.assert_array_equal(got.data, gguf.quants.quantize(x, getattr(T, dtype.upper())))
    sp = require("sentencepiece").SentencePieceProcessor(model_file=str(require_stories() / "tok512.model"))
    for text in SAMPLES:
        assert back.tokenizer.encode(text) == [1] + sp.encode(text), text


def test_written_metadata_is_what_llama_cpp_reads(stories, tmp_path):
    path = write_gguf(stories, tmp_path / "s.gguf", "q8_0")
    r = gguf.GGUFReader(str(path))
    V = gguf.GGUFValueType

    def field(key):
        f = r.fields[key]
        return f.types[0], f.contents()

    assert field("general.architecture") == (V.STRING, "llama")
    assert field("general.file_type") == (V.UINT32, 7)  # mostly q8_0
    for key, value in (("llama.context_length", 512), ("llama.embedding_length", 64), ("llama.block_count", 5),
                       ("llama.feed_forward_length", 172), ("llama.attention.head_count", 8),
                       ("llama.attention.head_count_kv", 4), ("llama.rope.dimension_count", 8),
                       ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2)):
        assert field(key) == (V.UINT32, value), key
    assert field("llama.attention.layer_norm_rms_epsilon")[1] == pytest.approx(1e-5)
    assert field("llama.rope.freq_base") == (V.FLOAT32, 10000.0)
    assert field("tokenizer.ggml.model") == (V.STRING, "llama")
    assert field("tokenizer.ggml.add_bos_token") == (V.BOOL, True)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 512 and tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[403] == "\u2581Once"
    assert types[:4] == [2, 3, 3, 6] and types[403] == 1
    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names  # tied
    assert names["blk.4.ffn_down.weight"].tensor_type == T.F16  # 172 columns: no whole q8_0 blocks
    assert names["blk.4.ffn_up.weight"].tensor_type == T.Q8_0
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]  # GGUF lists columns first
    assert names["blk.0.attn_norm.weight"].tensor_type == T.F32


def rope(x: np.ndarray, layout: str, theta: float = 10000.0) -> np.ndarray:
    """Rotary embedding of x [T, heads, hd], by each layout's definition."""
    t, _, hd = x.shape
    ang = np.arange(t)[:, None, None] * theta ** (-np.arange(hd // 2) * 2 / hd)
    cos, sin = np.cos(ang), np.sin(ang)
    if layout == "half":
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_permutation_makes_adjacent_rope_equal_half_rope():
    """Attention scores from half-layout weights equal those from permuted weights with adjacent rope."""
    rng = np.random.default_rng(0)
    heads, kv, hd, d, t = 4, 2, 16, 32, 7
    wq, wk = rng.standard_normal((heads * hd, d)), rng.standard_normal((kv * hd, d))
    h = rng.standard_normal((t, d))

    def scores(wq, wk, layout):
        q = rope((h @ wq.T).reshape(t, heads, hd), layout)
        k = np.repeat(rope((h @ wk.T).reshape(t, kv, hd), layout), heads // kv, axis=1)
        return np.einsum("thd,shd->hts", q, k)

    np.testing.assert_allclose(scores(to_adjacent(wq, heads), to_adjacent(wk, kv), "adjacent"),
                               scores(wq, wk, "half"), rtol=1e-10, atol=1e-10)
    raw = np.arange(heads * hd * 3, dtype=np.uint8).reshape(heads * hd, 3)  # whole rows move, any dtype
    assert sorted(map(tuple, to_adjacent(raw, heads))) == sorted(map(tuple, raw))


# --------------------------------------------------------------------------
# with the engine
# --------------------------------------------------------------------------

def greedy(model, ids, n):
    return continue_greedily(model, ids, n)[0]


@pytest.fixture(scope="module")
def tokentrail_engine():
    return pytest.importorskip("tokentrail")


@pytest.mark.parametrize("dtype", ("f32", "q8_0"))
def test_converted_stories_generates_the_same_tokens(stories, tmp_path, tokentrail_engine, dtype):
    original = tokentrail_engine.load(require_stories() / "stories260K.bin")
    converted = tokentrail_engine.load(write_gguf(stories, tmp_path / "s.gguf", dtype))
    prompt = original.tokenizer.encode("Once upon a time")
    assert converted.tokenizer.encode("Once upon a time") == prompt
    want = greedy(original, prompt, 30)
    assert greedy(converted, prompt, 30) == want
    if dtype == "f32":
        np.testing.assert_array_equal(converted.forward(prompt + want), original.forward(prompt + want))


def test_half_layout_checkpoint_is_permuted_on_write(stories, tmp_path, tokentrail_engine):
    """stories260K rewritten in the half-split layout (rows un-permuted, rope_layout="half")
    must come back from GGUF in adjacent order and generate the original tokens."""
    from dataclasses import replace

    from tokentrail.loading import Checkpoint
    from tokentrail.loading.weights import Weight

    c = stories.config
    weights = dict(stories.weights)
    for layer in range(c.n_layers):
        for x, heads in (("q", c.n_heads), ("k", c.n_kv_heads)):
            name = f"blocks.{layer}.attn.{x}.weight"
            w = weights[name].to_float32()
            # adjacent -> half: new row s*hd/2 + j = old row 2j + s, in every head
            half = w.reshape(heads, c.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            weights[name] = Weight.from_array(np.ascontiguousarray(half))
    halved = Checkpoint(replace(c, rope_layout="half"), weights, stories.tokenizer, "half")
    back = read_gguf(write_gguf(halved, tmp_path / "h.gguf"))
    assert back.config.rope_layout == "adjacent"
    for name in ("blocks.2.attn.q.weight", "blocks.2.attn.k.weight"):
        np.testing.assert_array_equal(back.weights[name].data, stories.weights[name].data)
    original = tokentrail_engine.load(require_stories() / "stories260K.bin")
    prompt = original.tokenizer.encode("Once upon a time")
    assert greedy(tokentrail_engine.Model(back), prompt, 20) == greedy(original, prompt, 20)


@pytest.mark.parametrize("family", ("llama", "qwen2", "gpt2", "llama_headdim"))
def test_hf_models_through_gguf_match_transformers(tmp_path, tokentrail_engine, family):
    require("torch")
    require("transformers")
    from reference_models import build, reference_logits

    ref = build(family, tmp_path / "hf")
    path = write_gguf(read_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "f32")
    model = tokentrail_engine.load(path)
    ids = [1, 17, 200, 5, 99, 42, 42, 7, 250, 3]
    np.testing.assert_allclose(model.forward(ids), reference_logits(ref, ids), atol=1e-4, rtol=1e-4)
