"""llama.cpp's own converter (convert_hf_to_gguf.py), run on the tiny random models of the tests.

.ci/run keeps the converter's source from the llama-cpp-python sdist in a cache and names it in
TOKENTRAIL_LLAMA_CPP_SRC. The tiny models have no real tokenizer, and the converter identifies a
tokenizer by hashing what it produces, so its vocabulary step is replaced by one that writes
`tokenizer.ggml.model = none` and the vocabulary size (as tokentrail's own writer does for models
without a tokenizer);
the architecture, hyperparameters and tensors are the converter's own work.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_SRC = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokentrail-ci" / \
    "llama-cpp-src-0.3.36-v2"

_RUNNER = r"""
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion

def no_vocab(self):
    # What the token list would have told llama.cpp: the vocabulary's size.
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

model_class = conversion.get_model_class

def without_vocab(*args, **kwargs):
    cls = model_class(*args, **kwargs)
    for c in cls.__mro__:
        if "set_vocab" in c.__dict__:
            c.set_vocab = no_vocab
    return cls

conversion.get_model_class = without_vocab

# The converter reads config.json through transformers' AutoConfig, which (in transformers 5) drops
# keys it has renamed; the converter still reads some of them by their old names (rotary_pct).
import json
from conversion.base import ModelBase
load_hparams = ModelBase.load_hparams

def with_file_keys(dir_model, *args, **kwargs):
    cfg = load_hparams(dir_model, *args, **kwargs)
    with open(dir_model / "config.json", encoding="utf-8") as fh:
        for key, value in json.load(fh).items():
            cfg.setdefault(key, value)
    return cfg

ModelBase.load_hparams = staticmethod(with_file_keys)
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def converter_source() -> Path:
    src = Path(os.environ.get("TOKENTRAIL_LLAMA_CPP_SRC", DEFAULT_SRC))
    if not (src / "convert_hf_to_gguf.py").exists():
        if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"llama.cpp's converter is not at {src} (set TOKENTRAIL_LLAMA_CPP_SRC)")
        pytest.skip(f"llama.cpp's converter is not at {src}")
    return src


def write_placeholder_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json covering every id (some converters size the vocabulary from it)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))


# config.json keys of transformers 4 that this converter still reads and transformers 5 no longer
# writes (the same facts are in the file under their new names).
LEGACY_KEYS = {
    "GPT2LMHeadModel": lambda c: {"n_ctx": c["n_positions"]},
    "GPTNeoXForCausalLM": lambda c: {"rotary_pct": c["rope_parameters"]["partial_rotary_factor"]},
}


def add_legacy_keys(model_dir: Path) -> None:
    import json

    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    extra = LEGACY_KEYS.get(cfg["architectures"][0])
    if extra:
        cfg.update(extra(cfg))
        path.write_text(json.dumps(cfg, indent=1))


def convert(model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on a Hugging Face directory; returns the GGUF path."""
    src = converter_source()
    add_legacy_keys(model_dir)
    env = dict(os.environ, NO_LOCAL_GGUF="1")
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(src), str(model_dir), "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"llama.cpp's converter failed on {model_dir}:\n{r.stderr[-3000:]}")
    return out
