"""The Python API as a newcomer meets it: defaults from generation_config.json (checked against
transformers on the same directory), transformers' option names, helpful errors, reprs and docs."""
from __future__ import annotations

import inspect
import math
import subprocess
import sys
import json
import re
import shutil

import numpy as np
import pytest

import tokentrail
from conftest import REPO
from tokentrail import generation_config
from tokentrail.errors import OptionError

PROMPT = [1, 17, 200, 5, 99]


def with_generation_config(src, tmp_path, config: dict | None):
    """A copy of the model directory whose generation_config.json is `config` (None: no file)."""
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    if config is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(config))
    return dst


def hf_generate(directory, ids, **kwargs):
    import torch
    import transformers as tf

    ref = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            pad_token_id=0, **kwargs)


def hf_first_distribution(directory, ids, **kwargs) -> np.ndarray:
    """The distribution transformers samples the first new token from (its processed scores)."""
    import torch

    out = hf_generate(directory, ids, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                      **kwargs)
    scores = out.scores[0][0].double()
    return torch.softmax(scores, -1).numpy()


def our_first_distribution(model, ids, **kwargs) -> np.ndarray:
    g = model.generate(ids, max_new_tokens=1, top_n=model.config.vocab_size, ignore_eos=True, **kwargs)
    p = np.zeros(model.config.vocab_size)
    for a in g.steps[0].top_sampled:
        p[a.token] = a.prob
    return p


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("config", [
    None,                                                   # no file: greedy, the default length
    {"do_sample": False, "max_new_tokens": 9},
    {"max_length": 12},                                     # total length, prompt included
    {"repetition_penalty": 1.6, "no_repeat_ngram_size": 2, "max_new_tokens": 14},
    {"do_sample": False, "temperature": 0.3, "top_p": 0.5, "max_new_tokens": 6},  # sampling fields rest
])
def test_greedy_defaults_match_transformers(llama_dir, tmp_path, config):
    d = with_generation_config(llama_dir, tmp_path, config)
    model = tokentrail.load(d)
    assert model.generation_defaults.greedy
    ours = model.generate(PROMPT, ignore_eos=True)
    n = len(ours.token_ids)
    if config is None:
        # The default length, or as far as this 64-position model goes.
        room = model.context_limit - len(PROMPT) + 1
        assert n == min(generation_config.DEFAULT_MAX_NEW_TOKENS, room)
        ref = hf_generate(d, PROMPT, max_new_tokens=n, eos_token_id=None)
    else:
        ref = hf_generate(d, PROMPT, eos_token_id=None)  # transformers reads the same file
        assert ours.finish_reason == "length"
    assert ours.token_ids == ref[0, len(PROMPT):].tolist()


def test_sampling_defaults_match_transformers(llama_dir, tmp_path):
    d = with_generation_config(llama_dir, tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.99,
                                                      "repetition_penalty": 1.3})
    model = tokentrail.load(d)
    defaults = model.generation_defaults
    assert not defaults.greedy and defaults.top_k == 50  # transformers' top_k when do_sample leaves it unset
    ours = our_first_distribution(model, PROMPT)
    ref = hf_first_distribution(d, PROMPT)
    np.testing.assert_array_equal(ours > 0, ref > 0)
    assert (ours > 0).sum() == 50
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # The caller's options come first: temperature 0 is greedy whatever the file says.
    greedy = model.generate(PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True)
    assert greedy.token_ids == hf_generate(d, PROMPT, do_sample=False, max_new_tokens=5,
                                           eos_token_id=None)[0, len(PROMPT):].tolist()
    # Defaults are reproducible given a seed.
    assert model.generate(PROMPT, seed=4).token_ids == model.generate(PROMPT, seed=4).token_ids


def test_do_sample_means_what_it_means_in_transformers(llama_dir, tmp_path):
    d = with_generation_config(llama_dir, tmp_path, None)
    model = tokentrail.load(d)
    ours = our_first_distribution(model, PROMPT, do_sample=True, top_p=0.9)
    ref = hf_first_distribution(d, PROMPT, do_sample=True, top_p=0.9)
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # A temperature alone samples (llama.cpp's habit) and truncates nothing unless asked.
    assert (our_first_distribution(model, PROMPT, temperature=1.0) > 0).all()
    with pytest.raises(ValueError, match="temperature above 0"):
        model.generate(PROMPT, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p: acts only when sampling"):
        model.generate(PROMPT, top_p=0.5)
    with pytest.raises(ValueError, match="do_sample=False"):
        model.generate(PROMPT, do_sample=False, temperature=0.7)


def test_transformers_names(llama_dir, tmp_path):
    d = with_generation_config(llama_dir, tmp_path, None)
    model = tokentrail.load(d)
    g = model.generate(PROMPT, max_length=9, ignore_eos=True)
    assert len(g.token_ids) == 4
    assert (g.timings.prompt_tokens, g.timings.generated_tokens) == (len(PROMPT), 4)
    assert 0 < g.timings.prompt_seconds <= g.timings.first_token_seconds
    first = g.token_ids[0]
    stopped = model.generate(PROMPT, max_new_tokens=5, eos_token_id=first)
    assert stopped.token_ids == [first] and stopped.finish_reason == "eos"
    assert model.generate(PROMPT, max_new_tokens=5, eos_ids=[first]).token_ids == [first]
    assert model.generate(PROMPT, max_new_tokens=3, pad_token_id=0, ignore_eos=True).token_ids == g.token_ids[:3]
    with pytest.raises(ValueError, match="max_length"):
        model.generate(PROMPT, max_length=3)
    samples = model.generate(PROMPT, max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=5,
                             ignore_eos=True)
    assert len(samples) == 3 and samples[0].token_ids == model.generate(PROMPT, max_new_tokens=4, do_sample=True,
                                                                        seed=5, ignore_eos=True).token_ids
    assert len({tuple(s.token_ids) for s in samples}) > 1
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(PROMPT, num_return_sequences=2)
    # Beam search through generate(): transformers' beams on the same weights.
    beams = model.generate(PROMPT, max_new_tokens=4, num_beams=3, num_return_sequences=3, eos_token_id=[])
    ref = hf_generate(d, PROMPT, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False,
                      eos_token_id=None, early_stopping=False)
    assert [b.token_ids for b in beams] == [r[len(PROMPT):].tolist() for r in ref]
    with pytest.raises(ValueError, match="beam search"):
        model.generate(PROMPT, num_beams=2, temperature=0.8)


def test_file_values_are_checked_and_unapplied_keys_named(llama_dir, tmp_path):
    d = with_generation_config(llama_dir, tmp_path, {"do_sample": "yes"})
    with pytest.raises(tokentrail.CheckpointError, match="do_sample"):
        tokentrail.load(d)
    (d / "generation_config.json").write_text(json.dumps({"min_new_tokens": 5, "transformers_version": "5",
                                                          "bad_words_ids": None}))
    with pytest.warns(UserWarning, match="min_new_tokens"):
        model = tokentrail.load(d)
    assert model.generation_defaults.ignored == ("min_new_tokens",)


def test_the_bundled_model_states_its_defaults():
    model = tokentrail.load()
    assert model.generation_defaults.greedy and model.generation_defaults.source.endswith("generation_config.json")
    assert "greedy" in repr(model) and "generation_config.json" in repr(model)


# ---------------------------------------------------------------- names and signatures


def test_unknown_options_suggest_the_nearest():
    model = tokentrail.load()
    for wrong, right in (("temp", "temperature"), ("top_q", "top_p"), ("repeat_penalty", "repetition_penalty"),
                         ("max_tokens", "max_new_tokens"), ("num_beam", "num_beams")):
        with pytest.raises(OptionError, match=f"did you mean '{right}'") as e:
            model.generate("The storm is", **{wrong: 1})
        assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    with pytest.raises(TypeError, match="hooks"):
        model.generate("The storm is", hooks="x")
    with pytest.raises(TypeError, match="hooks"):
        model.forward("The storm is", hooks="x")
    other = tokentrail.load()
    with pytest.raises(OptionError, match="another model"):
        model.generate("The storm is", hooks=other.hooks())


def test_generate_shows_its_options():
    sig = inspect.signature(tokentrail.Model.generate)
    params = sig.parameters
    from tokentrail.sampling import SAMPLING_OPTIONS, SamplingConfig

    for name in SAMPLING_OPTIONS | {"do_sample", "num_beams", "max_length", "eos_token_id", "pad_token_id",
                                    "num_return_sequences", "seed", "stop", "stream", "hooks"}:
        assert name in params, name
        assert params[name].annotation is not inspect.Parameter.empty, name
    # Options the file cannot set show their real defaults, the same as SamplingConfig's.
    config = SamplingConfig()
    for name in SAMPLING_OPTIONS - set(generation_config.SAMPLING_FIELDS) - {
            "repetition_penalty", "no_repeat_ngram_size", "banned_tokens", "logit_bias", "top_n_sigma"}:
        assert params[name].default == getattr(config, name), name
    doc = tokentrail.Model.generate.__doc__
    assert "generation_config.json" in doc and "greedy" in doc and "64" in doc


PUBLIC_MODULES = ("model", "generation", "generation_config", "sampling", "capture", "thermo", "errors",
                  "progress", "tokenizer", "cli")


def test_public_api_has_docstrings():
    import importlib

    missing = []
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(f"tokentrail.{mod_name}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.append(f"{mod_name}.{name}")
    assert missing == []
    for cls in (tokentrail.Model, tokentrail.Session, tokentrail.capture.ActivationCache, tokentrail.capture.Hooks):
        for name, member in vars(cls).items():
            if not name.startswith("_") and inspect.isfunction(member):
                assert inspect.getdoc(member), f"{cls.__name__}.{name}"


def test_reprs_say_what_an_object_is():
    model = tokentrail.load()
    assert re.match(r"Model\('.*demo', LlamaForCausalLM, layers=4, d_model=128, heads=4/2, vocab=662", repr(model))
    s = model.session()
    s.feed(model.encode("The storm"))
    assert repr(s) == f"Session(pos={s.pos}, limit={model.context_limit}, kv_dtype='f32')"
    _, cache = model.run_with_cache("The storm is", names=["blocks.0.q", "embed"])
    assert repr(cache).startswith("ActivationCache(2 points") and "blocks.0.q: [4, 4, 32]" in repr(cache)
    assert repr(model.hooks().ablate_head(0, 1)) == "Hooks(0 capture points, 1 interventions)"


# ---------------------------------------------------------------- capture edges


def test_negative_positions_count_from_the_end():
    model = tokentrail.load()
    ids = model.encode("The storm is coming")
    _, full = model.run_with_cache(ids, names="blocks.1.attn_pattern")
    _, last = model.run_with_cache(ids, names="blocks.1.attn_pattern", positions=[-1, 0])
    assert list(last.positions("blocks.1.attn_pattern")) == [0, len(ids) - 1]
    np.testing.assert_array_equal(last["blocks.1.attn_pattern"][1], full["blocks.1.attn_pattern"][-1])
    with pytest.raises(IndexError, match="outside a prompt"):
        model.run_with_cache(ids, positions=[len(ids)])
    with pytest.raises(IndexError, match="absolute"):
        model.hooks().capture("embed", positions=[-1])


def test_heads_are_split_as_the_table_says(llama_dir):
    """v captured as [positions, kv_heads, head_dim]: head h is rows h*head_dim.. of W_v (numpy reference)."""
    model = tokentrail.load(llama_dir)
    c = model.config
    _, cache = model.run_with_cache(PROMPT, names=["blocks.0.attn_norm", "blocks.0.q", "blocks.0.k", "blocks.0.v",
                                                   "blocks.0.attn_z"])
    n = len(PROMPT)
    assert cache["blocks.0.q"].shape == (n, c.n_heads, c.head_dim)
    assert cache["blocks.0.k"].shape == (n, c.n_kv_heads, c.head_dim)
    assert cache["blocks.0.attn.hook_z"].shape == (n, c.n_heads, c.head_dim)
    x = cache["blocks.0.attn_norm"].astype(np.float64)
    wv = model.weights["blocks.0.attn.v.weight"].to_float32().astype(np.float64)
    want = (x @ wv.T).reshape(n, c.n_kv_heads, c.head_dim)
    np.testing.assert_allclose(cache["blocks.0.v"], want, atol=1e-5)
    # The last position's first head of z is its attention-weighted mix of head 0's values.
    _, pat = model.run_with_cache(PROMPT, names="blocks.0.attn_pattern")
    z = pat["blocks.0.attn_pattern"][-1, 0] @ cache["blocks.0.v"][:, 0].astype(np.float64)
    np.testing.assert_allclose(cache["blocks.0.attn_z"][-1, 0], z, atol=1e-5)


def test_a_prompt_longer_than_the_context_is_one_error_everywhere(llama_dir):
    model = tokentrail.load(llama_dir, context=8)
    ids = list(range(1, 11))
    calls = {
        "forward": lambda: model.forward(ids),
        "generate": lambda: model.generate(ids, max_new_tokens=1),
        "stream": lambda: model.generate(ids, max_new_tokens=1, stream=True),
        "beams": lambda: model.generate(ids, max_new_tokens=2, num_beams=2),
        "score": lambda: model.score(ids),
        "run_with_cache": lambda: model.run_with_cache(ids),
        "journey": lambda: model.journey(ids),
    }
    for name, call in calls.items():
        with pytest.raises(tokentrail.ContextFullError, match=r"context is full: 0 positions cached \+ 10 new"):
            call()


# ---------------------------------------------------------------- progress


def test_progress_callbacks_report_every_step(llama_dir, tmp_path):
    from tokentrail.loading import read_checkpoint
    from tokentrail.loading.gguf_writer import write_gguf

    seen = []
    model = tokentrail.load(llama_dir, dtype="q8_0", progress=lambda *a: seen.append(a))
    n = len(model.weights)
    assert seen[0] == ("converting weights to q8_0", 0, n) and seen[-1] == ("converting weights to q8_0", n, n)
    assert [s[1] for s in seen] == list(range(n + 1))
    seen.clear()
    write_gguf(read_checkpoint(llama_dir), tmp_path / "m.gguf", dtype="q8_0", progress=lambda *a: seen.append(a))
    tensors = [s for s in seen if s[0].startswith("converting")]
    assert tensors[-1][1] == tensors[-1][2] == len(read_checkpoint(llama_dir).weights)
    assert seen[-1] == ("writing m.gguf", 1, 1)
    with pytest.raises(OptionError, match="progress"):
        tokentrail.load(llama_dir, dtype="q8_0", progress="yes")


# ---------------------------------------------------------------- the README


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_python_examples_run(capsys):
    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    cache = namespace["cache"]
    assert cache["blocks.0.attn_pattern"].shape[0] == 1
    assert "The storm is" not in capsys.readouterr().err


def test_other_choosers_get_generates_config(llama_dir, tmp_path):
    """sampling_config(model, options) + Sampler over plain forwards picks generate()'s tokens."""
    from tokentrail.generation import sampling_config
    from tokentrail.sampling import Sampler

    d = with_generation_config(llama_dir, tmp_path, {"do_sample": True, "temperature": 0.9, "top_p": 0.99})
    model = tokentrail.load(d)
    for options in ({}, {"top_k": 7, "repetition_penalty": 1.3}, {"temperature": 0}):
        g = model.generate(PROMPT, max_new_tokens=6, seed=11, ignore_eos=True, **options)
        sampler = Sampler(sampling_config(model, options), seed=11)
        ids = list(PROMPT)
        for _ in range(6):
            ids.append(sampler.sample(model.forward(ids)[-1], ids))
        assert ids[len(PROMPT):] == g.token_ids, options
    with pytest.raises(OptionError, match="did you mean 'top_k'"):
        sampling_config(model, {"topk": 3})


def test_a_certain_choice_has_entropy_zero_not_minus_zero():
    from tokentrail import thermo

    logits = np.array([3.0, 1.0, -2.0])
    for t in (0.0, 1e-3):
        s = thermo.stats(logits, t)
        assert f"{s.entropy_bits:.2f}" == "0.00" and math.copysign(1.0, s.entropy) == 1.0
        assert math.copysign(1.0, thermo.entropy(logits, t)) == 1.0
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "journey", "The storm is", "--temp", "0",
                          "--width", "400"], capture_output=True, text=True, timeout=120)
    # The greedy chain leaves one token: its stage says the entropy fell to 0.00 bits.
    assert re.search(r"entropy \d+\.\d\d -> 0\.00 bits", out.stdout) and "-0.00" not in out.stdout
