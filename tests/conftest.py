"""Shared test helpers: references that may be absent, and where shared data lives."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENTRAIL_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"


def require(module: str):
    """Import a reference implementation, or skip; CI sets TOKENTRAIL_REQUIRE_REFERENCE=1
    so that a missing reference fails instead of silently skipping the comparison."""
    if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"reference implementation {module!r} is not installed")


CHATML = (Path(__file__).parent / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")


def chatml_demo(directory: Path) -> Path:
    """The bundled demo model with a chat template: its <unk> and <pad> tokens renamed <|im_start|>
    and <|im_end|>, and Qwen2.5's template in tokenizer_config.json (as a list of named
    templates, as some models ship it)."""
    import json
    import shutil

    import tokentrail

    demo = Path(tokentrail.__file__).parent / "models" / "demo"
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(demo / f, directory / f)
    tok = json.loads((demo / "tokenizer.json").read_text())
    names = {"<unk>": "<|im_start|>", "<pad>": "<|im_end|>"}
    for t in tok["added_tokens"]:
        if t["content"] in names:
            old = t["content"]
            t["content"] = names[old]
            tok["model"]["vocab"][names[old]] = tok["model"]["vocab"].pop(old)
    if tok["model"].get("unk_token") == "<unk>":
        tok["model"]["unk_token"] = "<|im_start|>"
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
        "chat_template": [{"name": "default", "template": CHATML}]}))
    return directory


def popen_taking_ctrl_c(args: list[str], **kwargs):
    """subprocess.Popen(args) with SIGINT at its default in the child. A child inherits an ignored
    SIGINT (everything started in the background of a non-interactive shell has one), and Python
    then leaves Ctrl-C ignored; a handler of this process's own is reset to the default instead."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **kwargs)
    finally:
        signal.signal(signal.SIGINT, before)


def press_ctrl_c(proc, tries: int = 30, wait: float = 5.0) -> bool:
    """Send SIGINT to proc until it exits (a signal the kernel hands to another of its threads
    may leave a blocked read asleep); whether it exited."""
    for _ in range(tries):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=wait)
            return True
        except subprocess.TimeoutExpired:
            continue
    return False


def require_stories():
    if not (STORIES / "stories260K.bin").exists():
        if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"stories260K model not found at {STORIES}")
        pytest.skip(f"the shared stories260K model is not present at {STORIES}")
    return STORIES


def family_pair(family: str, tmp_path_factory):
    """(family, tokentrail model, transformers model) of a fresh random model of `family`
    (reference_models.build_family), or a skip when the references are missing."""
    from types import SimpleNamespace

    from reference_models import build_family

    name, _, ours, ref = build_family(SimpleNamespace(param=family), tmp_path_factory)
    return name, ours, ref


def assert_logits_do_not_depend_on_the_batch(model, seed: int, lengths=(3, 11, 20, 70)) -> None:
    """Prompts of `lengths` random ids, then one decode token each: the logits of every sequence fed
    alone equal, bit for bit, those of all of them advanced together (forward_batch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(0, model.config.vocab_size, n)] for n in lengths]
    alone = []
    for p in prompts:
        s = model.session()
        first = np.asarray(s.feed(p))
        alone.append((first, np.asarray(s.feed([7]))))
    sessions = [model.session() for _ in prompts]
    together = model.forward_batch(sessions, prompts)
    step = model.forward_batch(sessions, [[7]] * len(prompts))
    for i in range(len(prompts)):
        np.testing.assert_array_equal(np.asarray(together[i]), alone[i][0], err_msg=f"prefill {i}")
        np.testing.assert_array_equal(np.asarray(step[i]), alone[i][1], err_msg=f"decode {i}")


def greedy(model, ids, n: int, hooks=None):
    """The argmax continuation of `ids` for n steps, fed one token at a time; also the last logits."""
    import numpy as np

    session = model.session()
    logits = session.feed(list(ids), hooks=hooks)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = session.feed([out[-1]], hooks=hooks)
    return out, logits


def greedy_with_logits(model, prompt, n: int):
    """Greedy continuation of `prompt` for n steps (prompt in one batch, then single tokens) and the
    logits of every position: ([positions, vocab], tokens)."""
    import numpy as np

    s = model.session()
    rows = list(s.feed(list(prompt), all_logits=True))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(rows[-1])))
        rows.append(s.feed([out[-1]]))
    return np.stack(rows), out


def check_attention(q, k, v, pos0, scale, z, pattern):
    """z and pattern against causal GQA attention in float64 (q [n,h,d]; k, v [kv,ctx,d] as the kernel read them)."""
    import numpy as np

    n, heads = q.shape[:2]
    group = heads // k.shape[0]
    k, v = k.astype(np.float64), v.astype(np.float64)
    for i in range(n):
        for h in range(heads):
            s = k[h // group] @ q[i, h] * scale
            s[pos0 + i + 1:] = -np.inf
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(pattern[i, h], p, atol=1e-6)
            np.testing.assert_allclose(z[i, h], p @ v[h // group], atol=1e-5)


# Byte offsets of the f16 scale fields in each GGML block type's layout.
SCALE_OFFSETS = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "iq4_nl": [0],
                 "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def random_blocks(rng, dtype: str, rows: int, cols: int, scale: float) -> "np.ndarray":
    """Arbitrary bytes, so every bit of the layout is in play, with finite f16 scales in [-scale, scale]."""
    import numpy as np

    from tokentrail.loading.quant import block_info, row_bytes

    raw = rng.integers(0, 256, (rows, row_bytes(dtype, cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, block_info(dtype)[1])
    for off in SCALE_OFFSETS[dtype]:
        scales = rng.uniform(-scale, scale, blocks.shape[0]).astype("<f2")
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers (reference_models.build), shared by a test module."""
    from reference_models import build

    require("torch")
    require("transformers")
    d = tmp_path_factory.mktemp("llama")
    build("llama", d)
    return d


@pytest.fixture(scope="module")
def llama256_f32(tmp_path_factory):
    """A tiny Llama (hidden 256, MLP 512; rows of 256 and 512 values, so that every matrix can take
    the 256-value k-quants) built by transformers and written as an f32 GGUF without a tokenizer."""
    require("torch")
    transformers = require("transformers")
    import torch

    from tokentrail.loading import read_checkpoint
    from tokentrail.loading.gguf_writer import write_gguf

    d = tmp_path_factory.mktemp("llama256")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d, safe_serialization=True)
    ck = read_checkpoint(d)
    ck.tokenizer = None
    return write_gguf(ck, d / "llama256-f32.gguf", "f32")
