"""Malformed and hostile checkpoints: every one is a CheckpointError naming the file and the field
or tensor, never another exception, a hang, a read outside the model, or a silently wrong model."""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import tokentrail
from test_errors import _rewrite_header as rewrite_header
from test_gguf import write_llama
from tokentrail.errors import CheckpointError
from tokentrail.loading import read_checkpoint


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(llama_dir, dst)
    return dst


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def refused(path, *needles: str) -> CheckpointError:
    """Loading `path` raises a CheckpointError (and nothing else) whose message holds every needle."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return info.value


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("num_attention_heads", [4]), ("hidden_size", float("inf")),
    ("num_hidden_layers", 10**6), ("num_hidden_layers", 10**9), ("num_hidden_layers", 2**63),
    ("max_position_embeddings", 2**31), ("rope_scaling", "x"), ("rope_theta", 0), ("rope_theta", -1.0),
    ("rope_theta", float("nan")), ("rms_norm_eps", 0), ("rms_norm_eps", float("nan")), ("vocab_size", "64"),
    ("tie_word_embeddings", 1), ("rope_scaling", {"rope_type": "linear", "factor": -2}),
    ("rope_scaling", {"rope_type": "linear", "factor": [2]}), ("num_key_value_heads", 3),
    ("rope_theta", 1e300), ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16}),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0],
                         "long_factor": [1.0], "original_max_position_embeddings": 16}),
])
def test_bad_config_values(model_dir, field, value):
    edit_config(model_dir, **{field: value})
    err = refused(model_dir, "config.json")
    assert err.field is not None


def test_bad_architectures_and_json(model_dir):
    edit_config(model_dir, architectures=5)
    refused(model_dir, "architectures")
    (model_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(model_dir, "nested too deeply")
    (model_dir / "config.json").write_text("[1, 2]")
    refused(model_dir, "JSON object")


def test_huge_layer_count_fails_fast(model_dir):
    """10^9 claimed layers are refused from the tensors present, before any per-layer loop."""
    edit_config(model_dir, num_hidden_layers=10**9)
    refused(model_dir, "num_hidden_layers", "tensors")


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("change", [
    {"shape": [-1, 64]}, {"shape": [2**32, 2**32]}, {"shape": [2**62, 4, 0]}, {"shape": ["8", "8"]},
    {"shape": [1.5]}, {"data_offsets": [0.0, 4.0]}, {"data_offsets": ["0", "4"]}, {"data_offsets": [8, 4]},
    {"data_offsets": [0]}, {"dtype": ["F32"]}, {"dtype": "F64"}, {"dtype": None},
])
def test_bad_safetensors_entries(model_dir, change):
    def edit(header):
        header[first_tensor(header)].update(change)

    rewrite_header(model_dir / "model.safetensors", edit)
    err = refused(model_dir, "model.safetensors")
    assert err.tensor is not None


def test_safetensors_header_not_an_object_or_entry_not_an_object(model_dir):
    rewrite_header(model_dir / "model.safetensors", lambda h: h.update({first_tensor(h): [1, 2]}))
    refused(model_dir, "tensor entry")


def write_index(d, shard: str):
    """A sharded layout whose index points every tensor at `shard`."""
    names = list(json.loads((d / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (d / "model.safetensors").read_bytes()[:8], "little")]))
    weight_map = {n: shard for n in names if n != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_shard_path_traversal(model_dir, tmp_path):
    outside = tmp_path / "x.safetensors"
    shutil.copy(model_dir / "model.safetensors", outside)
    write_index(model_dir, "../x.safetensors")
    (model_dir / "model.safetensors").unlink()
    refused(model_dir, "outside the model directory")


def test_shard_absolute_path_never_echoes_contents(model_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET" * 4)
    write_index(model_dir, str(secret))
    err = refused(model_dir, "outside the model directory")
    assert "TOPSECRET" not in str(err)
    assert str(int.from_bytes(b"TOPSECRE", "little")) not in str(err)


def test_shard_symlink_out_of_the_directory(model_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(model_dir / "model.safetensors", outside)
    write_index(model_dir, "shard.safetensors")
    (model_dir / "model.safetensors").unlink()
    os.symlink(outside, model_dir / "shard.safetensors")
    refused(model_dir, "outside the model directory")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                                  "chat_template.json"])
def test_fifo_is_refused_not_read(model_dir, name):
    """A FIFO blocks whoever reads it: it is refused as not a regular file (the test would hang)."""
    if name != "tokenizer.json":  # the chat template's files are read beside a tokenizer
        shutil.copy(tokentrail.model.DEMO_MODEL / "tokenizer.json", model_dir / "tokenizer.json")
    target = model_dir / name
    if target.exists():
        target.unlink()
    os.mkfifo(target)
    with pytest.raises(CheckpointError, match="not a regular file"):
        tokentrail.load(model_dir)


def test_fifo_checkpoint_file(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    refused(tmp_path / "model.gguf", "not a regular file")
    os.mkfifo(tmp_path / "stories.bin")
    refused(tmp_path / "stories.bin", "not a regular file")


def set_value(path, tensor: str, index: int, value: float):
    """Overwrite one float32 element of a safetensors tensor in place."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0] + 4 * index
    assert header[tensor]["dtype"] == "F32"
    data[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_named_at_load(model_dir, value):
    name = "model.layers.1.mlp.down_proj.weight"
    set_value(model_dir / "model.safetensors", name, 17, value)
    err = refused(model_dir, "NaN or infinite", name)
    assert err.tensor == name
    model = tokentrail.load(model_dir, check_finite=False)  # the opt-out loads it as stored
    assert not np.isfinite(model.weights["blocks.1.mlp.down.weight"].to_float32()).all()


def test_non_finite_scan_of_every_type():
    from tokentrail.loading.quant import dequantize, quantize
    from tokentrail.loading.weights import BLOCK_TYPES, Weight, bf16_from_float32, has_non_finite

    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    for dtype, make in (("f32", lambda a: a), ("f16", lambda a: a.astype(np.float16)), ("bf16", bf16_from_float32)):
        assert not has_non_finite(Weight(make(x), dtype, x.shape))
        y = x.copy()
        y[3, 200] = np.nan
        assert has_non_finite(Weight(make(y), dtype, x.shape))
    for dtype, (_, block) in BLOCK_TYPES.items():
        q = quantize(x, dtype)
        assert not has_non_finite(Weight(q, dtype, x.shape))
        # An infinity (f16 0x7C00) at every byte offset of the last row's last block: the scan
        # must find it exactly where the reference dequantizer then gives a NaN or an infinity.
        for at in range(q.shape[1] - block, q.shape[1] - 1):
            bad = q.copy()
            bad[3, at:at + 2] = np.frombuffer(np.uint16(0x7C00).tobytes(), np.uint8)
            with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and the like, on purpose
                expected = not np.isfinite(dequantize(bad, dtype, x.shape)).all()
            assert has_non_finite(Weight(bad, dtype, x.shape)) == expected, (dtype, at % block)


def test_non_finite_scan_of_large_tensors_spread_over_threads():
    """Tensors large enough that the core's scan splits them across its threads, in pieces of 65536
    elements or blocks: a NaN or an infinity at the edges of those pieces and at the very ends is
    found, as numpy's isfinite finds it; a clean tensor is not refused."""
    from tokentrail import _core
    from tokentrail.loading.quant import quantize

    rng = np.random.default_rng(1)
    x = rng.standard_normal(5 * 65536 + 7).astype(np.float32)
    for dtype, make in (("f32", lambda a: a), ("f16", lambda a: a.astype(np.float16))):
        assert not _core.has_non_finite(make(x), dtype)
        for at in (0, 65535, 65536, 3 * 65536 + 1, x.size - 1):
            for value in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[at] = value
                assert _core.has_non_finite(make(y), dtype) == (not np.isfinite(make(y)).all()), (dtype, at)
    q = quantize(rng.standard_normal((64, 65536 // 16 * 32 + 32)).astype(np.float32), "q8_0")  # 34-byte blocks
    blocks = q.reshape(-1, 34)
    assert not _core.has_non_finite(q, "q8_0")
    for b in (0, 65535, 65536, len(blocks) - 1):
        bad = q.copy().reshape(-1, 34)
        bad[b, 0:2] = np.frombuffer(np.uint16(0x7E00).tobytes(), np.uint8)  # a NaN scale
        assert _core.has_non_finite(bad, "q8_0"), b


def test_non_finite_scan_refuses_what_it_cannot_read():
    from tokentrail import _core

    with pytest.raises(ValueError, match="whole blocks of 34 bytes"):
        _core.has_non_finite(np.zeros(35, np.uint8), "q8_0")
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.has_non_finite(np.zeros((8, 8), np.float32)[:, ::2], "f32")
    with pytest.raises(ValueError, match="unknown weight dtype"):
        _core.has_non_finite(np.zeros(8, np.float32), "f8")
    assert not _core.has_non_finite(np.zeros(0, np.float32), "f32")


# ---------------------------------------------------------------- GGUF metadata of the wrong kind

@pytest.mark.parametrize("key, value, vtype", [
    ("llama.rope.scaling.type", ["linear"], gguf.GGUFValueType.ARRAY),
    ("tokenizer.ggml.model", ["llama"], gguf.GGUFValueType.ARRAY),
    ("tokenizer.ggml.pre", [1, 2], gguf.GGUFValueType.ARRAY),
    ("tokenizer.ggml.add_bos_token", ["x"], gguf.GGUFValueType.ARRAY),
    ("tokenizer.ggml.add_space_prefix", "yes", gguf.GGUFValueType.STRING),
    ("tokenizer.ggml.token_type", [float("nan")] * 4, gguf.GGUFValueType.ARRAY),
    ("tokenizer.ggml.scores", [float("nan")] * 4, gguf.GGUFValueType.ARRAY),
    ("llama.context_length", 2**31, gguf.GGUFValueType.UINT64),
    ("llama.rope.freq_base", float("nan"), gguf.GGUFValueType.FLOAT32),
    ("llama.rope.freq_base", 0.0, gguf.GGUFValueType.FLOAT32),
    ("llama.block_count", 10**9, gguf.GGUFValueType.UINT32),
])
def test_gguf_metadata_of_the_wrong_kind(tmp_path, key, value, vtype):
    path = tmp_path / "bad.gguf"
    if key == "llama.context_length" or key == "llama.rope.freq_base" or key == "llama.block_count":
        _write_with_override(path, key, value, vtype)
    else:
        write_llama(path, metadata={key: (value, vtype)})
    err = refused(path, "bad.gguf", key)
    assert key in (err.tensor or "") + (err.field or "")


def _write_with_override(path, key, value, vtype):
    """write_llama's file with one of its own keys replaced (GGUFWriter refuses duplicate keys)."""
    write_llama(path)
    _rewrite_gguf(path, key, value, vtype)


def _rewrite_gguf(path, key=None, value=None, vtype=None, alignment=None):
    """Rewrite a GGUF file in place: `key` set to `value`, or the data laid out at `alignment`."""
    src = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(path) + ".new", "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for field in src.fields.values():
        if field.name in ("general.architecture", "general.alignment", "GGUF.version", "GGUF.tensor_count",
                          "GGUF.kv_count"):
            continue
        if field.name == key:
            w.add_key_value(key, value, vtype)
            continue
        w.add_key_value(field.name, field.contents(), field.types[0])
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=None, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".new", path)


# ---------------------------------------------------------------- misaligned tensor data

def test_safetensors_header_of_odd_length_loads_aligned(model_dir, llama_dir):
    """A header length that is not a multiple of 4 puts every float at an odd address of the file: the
    tensors are copied to aligned memory and the model computes what the aligned file computes."""
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].rstrip(b" ") + b" "
    header += b" " * ((1 - len(header)) % 4)   # length = 1 (mod 4)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    assert (8 + len(header)) % 4 == 1
    odd, ref = tokentrail.load(model_dir), tokentrail.load(llama_dir)
    for w in odd.weights.values():
        assert w.data.ctypes.data % w.data.dtype.itemsize == 0
    ids = [1, 5, 9, 3, 7]
    np.testing.assert_array_equal(odd.forward(ids), ref.forward(ids))


def test_gguf_alignment_one_loads_aligned(tmp_path):
    path = tmp_path / "packed.gguf"
    write_llama(path)
    ref = tokentrail.load(path)
    _rewrite_gguf(path, alignment=1)
    from tokentrail.loading.gguf import GGUFFile

    f = GGUFFile(path)
    assert f.alignment == 1
    assert any(t.offset % 4 for t in f.tensors.values() if t.dtype == "f32")  # the file really is packed
    packed = tokentrail.load(path)
    for w in packed.weights.values():
        assert w.data.ctypes.data % w.data.dtype.itemsize == 0
    ids = [1, 5, 9, 3, 7]
    np.testing.assert_array_equal(packed.forward(ids), ref.forward(ids))


def test_tokenizer_that_panics_is_refused_at_load(model_dir):
    """A tokenizer.json the library builds but then panics on (its post-processor names special tokens
    it does not define) is refused at load, not at the first encode with a Rust panic."""
    shutil.copy(tokentrail.model.DEMO_MODEL / "tokenizer.json", model_dir / "tokenizer.json")
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    assert spec["post_processor"] and spec["post_processor"].get("special_tokens")
    spec["post_processor"]["special_tokens"] = {}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    refused(model_dir, "tokenizer.json", "malformed")
    (model_dir / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    err = refused(model_dir, "tokenizer.json")
    assert "Nonsense" not in str(err)  # the file's contents are not repeated


def test_gguf_metadata_key_twice(tmp_path):
    """A key written twice is refused: which value applies would be a guess."""
    sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
    from harnesses import T_UINT32, base_gguf, write_gguf_bytes

    meta, tensors, alignment = base_gguf("spm")
    meta.append(("llama.block_count", T_UINT32, 7))
    (tmp_path / "twice.gguf").write_bytes(write_gguf_bytes(meta, tensors, alignment))
    refused(tmp_path / "twice.gguf", "appears twice", "llama.block_count")


@pytest.mark.parametrize("settings, field", [
    ({"do_sample": True, "num_return_sequences": 10**9}, "num_return_sequences"),  # built a billion runs
    ({"num_beams": 10**9}, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_beams": 2, "length_penalty": 1e308}, "length_penalty"),  # overflowed in the beam scores
    ({"suppress_tokens": 5}, "suppress_tokens"),                      # a TypeError
    ({"suppress_tokens": [10**9]}, "suppress_tokens"),
    ({"eos_token_id": -3}, "eos_token_id"),
    ({"do_sample": True, "temperature": -1}, "temperature"),          # refused only when generating
    ({"do_sample": True, "top_p": 7.0}, "top_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_k": -5}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generation_settings_outside_their_domain_refused_at_load(model_dir, settings, field):
    """generation_config.json is part of the checkpoint: a value no generation can use is a CheckpointError
    at load naming the file and field, not an argument error at the first generate (nor a hang)."""
    (model_dir / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError) as info:
        tokentrail.load(model_dir)
    assert "generation_config.json" in str(info.value) and field in str(info.value)


def test_generation_settings_in_their_domain_load(model_dir):
    settings = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "num_beams": 1,
                "repetition_penalty": 1.1, "suppress_tokens": [3], "eos_token_id": [2], "length_penalty": -2.0}
    (model_dir / "generation_config.json").write_text(json.dumps(settings))
    model = tokentrail.load(model_dir)
    assert model.generation_defaults.top_p == 0.9 and model.generation_defaults.suppress_tokens == (3,)


@pytest.mark.parametrize("name, content, needle", [
    ("tokenizer_config.json", "{not json", "not valid JSON"),
    ("tokenizer_config.json", "[1, 2]", "JSON object"),
    ("tokenizer_config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("tokenizer_config.json", json.dumps({"chat_template": 5}), "chat_template"),
    ("tokenizer_config.json", json.dumps({"chat_template": [{"name": "x"}]}), "chat_template"),
    ("chat_template.json", json.dumps([1]), "JSON object"),
], ids=["not-json", "a-list", "nested", "template-a-number", "named-template-without-text", "template-file-a-list"])
def test_malformed_chat_template_files(model_dir, name, content, needle):
    """The files beside tokenizer.json that hold the chat template are checkpoint files like the others."""
    shutil.copy(tokentrail.model.DEMO_MODEL / "tokenizer.json", model_dir / "tokenizer.json")
    (model_dir / name).write_text(content)
    refused(model_dir, name, needle)


def test_chat_template_cannot_exhaust_memory():
    """A template from the checkpoint that repeats a string ten billion times is refused, not run."""
    from tokentrail.chat import ChatTemplate
    from tokentrail.errors import ChatTemplateError, TokentrailError

    hi = [{"role": "user", "content": "hi"}]
    for source in ("{{ 'a' * 10**10 }}", "{{ 10**10 * [1] }}", "{{ 7 ** (10 ** 7) }}"):
        with pytest.raises(ChatTemplateError, match="refused") as info:
            ChatTemplate(source).render(hi)
        assert isinstance(info.value, TokentrailError)
    assert ChatTemplate("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ 2 * 3 }}").render(hi) == "ababab10246"


@pytest.mark.parametrize("source", [
    "{{ 'a'|center(10**10) }}", "{{ 'a'|indent(10**10, true) }}", "{{ 'a b'|wordwrap(10**10) }}",
    "{{ 'x'.ljust(10**10) }}", "{{ 'x'.zfill(10**10) }}",
    "{{ '%10000000000s' % 1 }}", "{{ '%*s' % (10**10, 1) }}", "{{ '%10000000000s'|format(1) }}",
    "{{ '%*s'|format(10**10, 1) }}", "{{ '{:>10000000000}'.format(1) }}", "{{ '{:>{w}}'.format(1, w=10**10) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
])
def test_chat_template_sizes_are_bounded(source):
    """Widths, counts and values that grow across loop iterations are bounded too (each of these asks
    for gigabytes); ordinary widths and joins still render as Python renders them."""
    from tokentrail.chat import ChatTemplate
    from tokentrail.errors import ChatTemplateError

    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate(source).render(hi)
    ordinary = ("{{ '%5s|%d' % ('a', 3) }}{{ 'ab'|center(6) }}{{ '{:>4}'.format(1) }}{{ 'x' + 'y' }}"
                "{{ messages[0]['content']|indent(2) }}{{ 'time: 12345678 %s' % 1 }}{{ '%s'|format(5) }}")
    assert ChatTemplate(ordinary).render(hi) == "    a|3" + "ab".center(6) + "   1" + "xy" + "hi" + "time: 12345678 1" + "5"


@pytest.fixture(scope="module")
def short_context_model():
    return tokentrail.load(context=16)


def _chat(model, text):
    from tokentrail.chat import chat

    return chat(model, [{"role": "user", "content": text}], max_new_tokens=1,
                chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


LONG_IDS = [1] + [5] * 20


@pytest.mark.parametrize("call", [
    lambda m: m.generate(LONG_IDS, max_new_tokens=1),
    lambda m: m.generate("hello " * 40, max_new_tokens=1),
    lambda m: m.generate([[1, 2], LONG_IDS], max_new_tokens=1),
    lambda m: list(m.generate(LONG_IDS, max_new_tokens=1, stream=True)),
    lambda m: m.generate(LONG_IDS, max_new_tokens=1, num_beams=2),
    lambda m: m.generate(LONG_IDS, max_new_tokens=1, do_sample=True, num_return_sequences=2),
    lambda m: tokentrail.generation.start_run(m, LONG_IDS, 1),
    lambda m: tokentrail.generation.beam_search(m, LONG_IDS, num_beams=2, max_new_tokens=1),
    lambda m: m.forward(LONG_IDS),
    lambda m: m.session().feed(LONG_IDS),
    lambda m: m.forward_batch([m.session(), m.session()], [[1], LONG_IDS]),
    lambda m: m.run_with_cache(LONG_IDS),
    lambda m: m.run_with_cache([LONG_IDS, [1]]),
    lambda m: m.score(LONG_IDS),
    lambda m: m.score([[1, 2], LONG_IDS]),
    lambda m: m.journey(LONG_IDS),
    lambda m: _chat(m, "hello " * 40),
], ids=["generate", "generate-text", "generate-batch", "stream", "beams", "n-sequences", "start_run",
        "beam_search", "forward", "feed", "forward_batch", "run_with_cache", "run_with_cache-batch", "score",
        "score-batch", "journey", "chat"])
def test_prompt_longer_than_the_context_from_every_entry_point(short_context_model, call):
    """One error for one problem: a prompt that does not fit is a ContextFullError wherever it enters."""
    from tokentrail.errors import ContextFullError

    with pytest.raises(ContextFullError, match="context is full"):
        call(short_context_model)
