"""The command line, run as a user runs it, on the bundled demo model."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import tokentrail
from conftest import REPO, popen_taking_ctrl_c, press_ctrl_c


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokentrail.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def corpus_sentences():
    spec = importlib.util.spec_from_file_location("train_demo", REPO / "tools" / "train_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stories, _ = mod.make_corpus(mod.SEED, mod.N_STORIES)
    return {s for story in stories for s in mod.sentences_of(story)}


def test_generate_streams_a_corpus_sentence(corpus_sentences):
    out = run("generate", "The storm is", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text.startswith("The storm is ")
    first = text.split(".")[0] + "."
    assert first in corpus_sentences
    # Same tokens as the Python API's greedy decoding.
    model = tokentrail.load()
    assert text == ("The storm is" + model.generate("The storm is", max_new_tokens=12, temperature=0).text).strip()


def test_generate_on_an_f16_kv_cache():
    out = run("generate", "The storm is", "--max-new-tokens", "12", "--kv-dtype", "f16")
    assert out.returncode == 0, out.stderr
    model = tokentrail.load(kv_dtype="f16")
    assert out.stdout.strip() == ("The storm is" + model.generate("The storm is", max_new_tokens=12,
                                                                   temperature=0).text).strip()


def test_show_probs_and_sampling_options():
    out = run("generate", "The storm is", "-n", "3", "--temp", "0.7", "--top-k", "5", "--seed", "2", "--show-probs")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model:") == 3 and out.stdout.count("sampled:") == 3
    again = run("generate", "The storm is", "-n", "3", "--temp", "0.7", "--top-k", "5", "-s", "2", "--show-probs",
                "-t", "1")
    assert again.stdout == out.stdout


def test_journey_fits_80_columns():
    out = run("journey", "The storm is", "--width", "80")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "logit lens" in out.stdout and "attends" in out.stdout


def test_report_and_thermo(tmp_path):
    out = run("report", "The storm is", "-o", str(tmp_path / "j.html"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "j.html").stat().st_size > 1000
    out = run("thermo", "The storm is", "--temperatures", "0,1,2")
    assert out.returncode == 0 and "T=2" in out.stdout


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, nothing on stdout, one line on stderr naming the problem, no traceback."""
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


def test_bad_input_is_a_clear_error(tmp_path):
    one_line_error(run("generate", "x", "--model", str(tmp_path / "missing")), "no such checkpoint")
    one_line_error(run("generate", "x", "--temperature", "-1"), "temperature")
    one_line_error(run("generate", "x", "--temp", "warm"), "--temp", "warm")
    one_line_error(run("journey", "The storm is", "--top", "0"), "--top")
    one_line_error(run("generate", "x", "-p", "y"), "given twice")
    one_line_error(run("generate"), "no prompt")
    one_line_error(run("generate", "x", "--top-k", "5"), "top_k", "temperature")
    one_line_error(run("generate", "x", "--tmp", "0.5"), "--tmp")
    one_line_error(run("generate", "-f", str(tmp_path / "nothing.txt")), "nothing.txt")
    one_line_error(run("thermo", "x", "--temperatures", "1,hot"), "--temperatures")
    one_line_error(run("generate", "x", "--logit-bias", "12*3"), "--logit-bias")
    one_line_error(run("convert", str(tokentrail.model.DEMO_MODEL), str(tmp_path)), "is a directory")
    assert list(tmp_path.iterdir()) == []
    one_line_error(run("report", "x", "-o", str(tmp_path / "no" / "j.html")), "does not exist")


def test_a_bad_kernel_setting_is_refused():
    for command in (["generate", "x", "-n", "1"], ["info"]):
        out = subprocess.run([sys.executable, "-m", "tokentrail.cli", *command], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "TOKENTRAIL_ISA": "bogus"})
        one_line_error(out, "TOKENTRAIL_ISA", "bogus", "scalar")
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "info"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TOKENTRAIL_ISA": "scalar"})
    assert out.returncode == 0 and "kernels: scalar" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "info"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TOKENTRAIL_AMX": "off"})
    one_line_error(out, "TOKENTRAIL_AMX", "'off'", "0", "1")


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tokentrail {tokentrail.__version__}"


def test_default_is_the_apis_default():
    """No options: the CLI and Model.generate agree (greedy, the same default length)."""
    out = run("generate", "The storm is")
    assert out.returncode == 0, out.stderr
    g = tokentrail.load().generate("The storm is")
    assert out.stdout == "The storm is" + g.text + "\n"
    assert g.finish_reason == "eos" or len(g.token_ids) == tokentrail.generation_config.DEFAULT_MAX_NEW_TOKENS


def test_prompt_from_option_file_and_stdin(tmp_path):
    want = run("generate", "The storm is", "-n", "6", "--no-perf").stdout
    assert run("generate", "-p", "The storm is", "-n", "6", "--no-perf").stdout == want
    (tmp_path / "prompt.txt").write_text("The storm is\n")
    assert run("generate", "-f", str(tmp_path / "prompt.txt"), "-n", "6", "--no-perf").stdout == want
    for args in (["-"], ["-f", "-"], ["-p", "-"]):
        piped = subprocess.run([sys.executable, "-m", "tokentrail.cli", "generate", *args, "-n", "6", "--no-perf"],
                               input="The storm is\n", capture_output=True, text=True, timeout=120)
        assert piped.stdout == want, args


def test_timing_summary_goes_to_stderr():
    out = run("generate", "The storm is", "-n", "5", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    model = tokentrail.load()
    g = model.generate("The storm is", max_new_tokens=5, ignore_eos=True)
    assert out.stdout == "The storm is" + g.text + "\n"  # nothing else on stdout
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1
    m = re.search(r"prompt: (\d+) tokens in [\d.]+ ms \(([\d.]+) tokens/s\) \| first token after [\d.]+ ms \| "
                  r"generation: (\d+) more tokens in [\d.]+ ms \(([\d.]+) tokens/s\)", line)
    assert m, line
    assert int(m.group(1)) == len(model.encode("The storm is")) and int(m.group(3)) == 4
    assert float(m.group(2)) > 0 and float(m.group(4)) > 0
    assert "greedy" in line and "finish: length" in line
    assert run("generate", "The storm is", "-n", "5", "--no-perf").stderr == ""


def test_every_sampler_option_reaches_the_chain():
    """A run with most flags set gives the Python API's tokens for the same options."""
    flags = ["-n", "12", "--ignore-eos", "-s", "7", "--temp", "1.3", "--top-k", "30", "--top-p", "0.97",
             "--min-p", "0.01", "--repeat-penalty", "1.2", "--repeat-last-n", "16", "--presence-penalty", "0.3",
             "--frequency-penalty", "0.2", "--dry-multiplier", "0.8", "--dry-base", "1.5",
             "--dry-allowed-length", "3", "--xtc-probability", "0.5", "--xtc-threshold", "0.05",
             "--no-repeat-ngram-size", "3", "-l", "428+2.5", "-l", "17-inf", "--ban", "286",
             "--dynatemp-range", "0.4", "--dynatemp-exp", "1.5", "--top-nsigma", "3", "--typical", "0.99",
             "--order", "llama.cpp", "--no-perf"]
    out = run("generate", "The storm is", *flags)
    assert out.returncode == 0, out.stderr
    g = tokentrail.load().generate(
        "The storm is", max_new_tokens=12, ignore_eos=True, seed=7, temperature=1.3, top_k=30, top_p=0.97,
        min_p=0.01, repetition_penalty=1.2, repetition_window=16, penalty_window=16, presence_penalty=0.3,
        frequency_penalty=0.2, dry_multiplier=0.8, dry_base=1.5, dry_allowed_length=3, xtc_probability=0.5,
        xtc_threshold=0.05, no_repeat_ngram_size=3, logit_bias={428: 2.5, 17: float("-inf")},
        banned_tokens=[286], dynatemp_range=0.4, dynatemp_exponent=1.5, top_n_sigma=3.0, typical_p=0.99,
        order="llama.cpp")
    assert out.stdout == "The storm is" + g.text + "\n"
    # Mirostat takes the place of the truncation samplers.
    mirostat = ["-n", "8", "--ignore-eos", "-s", "3", "--temp", "0.9", "--mirostat", "2", "--mirostat-ent", "3",
                "--mirostat-lr", "0.2", "--no-perf"]
    g = tokentrail.load().generate("The storm is", max_new_tokens=8, ignore_eos=True, seed=3, temperature=0.9,
                                   mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2)
    assert run("generate", "The storm is", *mirostat).stdout == "The storm is" + g.text + "\n"


def test_length_and_end_flags():
    model = tokentrail.load()
    g = model.generate("The storm is", max_new_tokens=4, ignore_eos=True)
    out = run("generate", "The storm is", "--max-length", str(len(model.encode("The storm is")) + 4), "--no-perf")
    assert out.stdout == "The storm is" + g.text + "\n"
    first = g.token_ids[0]
    out = run("generate", "The storm is", "--eos-token-id", str(first))
    assert out.stdout == "The storm is\n" and "finish: eos" in out.stderr
    breaker = model.tokenizer.encode(".", special=False)
    assert len(breaker) == 1
    flags = ["-n", "30", "--ignore-eos", "-s", "1", "--temp", "1.5", "--dry-multiplier", "2", "--dry-allowed-length",
             "1", "--dry-penalty-last-n", "20", "--no-perf"]
    want = model.generate("The storm is", max_new_tokens=30, ignore_eos=True, seed=1, temperature=1.5,
                          dry_multiplier=2.0, dry_allowed_length=1, dry_window=20, dry_breakers=breaker)
    assert run("generate", "The storm is", *flags, "--dry-sequence-breaker", ".").stdout == \
        "The storm is" + want.text + "\n"
    assert run("generate", "The storm is", *flags, "--dry-sequence-breaker", str(breaker[0])).stdout == \
        "The storm is" + want.text + "\n"


def test_output_into_a_closed_pipe_ends_quietly():
    # stdout is a pipe whose reader is already gone, as after `| head` has exited.
    script = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); from tokentrail.cli import main; "
              "sys.exit(main(['generate', 'The storm is', '-n', '8']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_beams_and_several_sequences():
    model = tokentrail.load()
    out = run("generate", "The storm is", "-n", "6", "--num-beams", "3", "--num-return-sequences", "2")
    assert out.returncode == 0, out.stderr
    beams = model.generate("The storm is", max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert out.stdout == "".join(("\n" if i else "") + "The storm is" + b.text + "\n" for i, b in enumerate(beams))
    assert re.fullmatch(r"2 sequences, 12 tokens in [\d.]+ ms \([\d.]+ tokens/s\)\n", out.stderr)
    one_line_error(run("generate", "The storm is", "--num-beams", "2", "--show-probs"), "--show-probs")


def test_every_api_sampling_option_has_a_flag_with_help():
    from tokentrail.cli import build_parser
    from tokentrail.sampling import SAMPLING_OPTIONS

    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    dests = {a.dest: a for a in gen._actions}
    # order takes names as text; processors are Python callables and have no command-line form.
    for name in SAMPLING_OPTIONS - {"processors"}:
        assert name in dests, name
    for name in ("do_sample", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
                 "max_new_tokens", "max_length", "seed", "stop", "eos_token_id", "ignore_eos"):
        assert name in dests, name
    for action in gen._actions:
        if action.dest != "help":
            assert action.help, action.dest
            if action.default not in (None, False) and action.option_strings:
                assert "default" in action.help, action.dest
    flags = {f for a in gen._actions for f in a.option_strings}
    for llama_cpp in ("-t", "--threads", "--temp", "-c", "--ctx-size", "-s", "--seed", "--repeat-penalty", "-n",
                      "--n-predict", "-f", "--file", "-p", "--prompt", "--top-k", "--top-p", "--min-p",
                      "--presence-penalty", "--frequency-penalty", "--dry-multiplier", "--xtc-probability",
                      "--top-nsigma", "--dynatemp-range", "--logit-bias", "--mirostat", "--mirostat-lr",
                      "--mirostat-ent", "-m", "--model", "--ignore-eos"):
        assert llama_cpp in flags, llama_cpp
    # One spelling for the same thing in every subcommand, the old one kept as an alias.
    for name in ("journey", "report", "thermo", "score"):
        sub = parser._subparsers._group_actions[0].choices[name]
        top = [a for a in sub._actions if a.dest == "top_n"][0]
        assert {"--top-n", "--top"} <= set(top.option_strings), name


def test_ctx_size_limits_the_context():
    out = run("generate", "The storm is", "-c", "3")
    one_line_error(out, "context is full")


def test_score_prints_plain_json():
    text = "The storm is coming near the lake."
    out = run("score", text, "--top-n", "2")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    want = tokentrail.load().score(text, top_n=2)
    assert data == json.loads(json.dumps(want.to_dict()))
    assert data["perplexity"] == pytest.approx(want.perplexity)
    assert data["tokens"][1]["top"][0].keys() == {"token", "text", "prob", "logprob"}
    assert "Alternative(" not in out.stdout and "TokenScore(" not in out.stdout


def test_progress_on_stderr_only_when_asked(tmp_path):
    model = tokentrail.load()
    n = len(model.weights)
    out = run("convert", str(tokentrail.model.DEMO_MODEL), str(tmp_path / "a.gguf"), "--type", "q8_0", "--progress")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"wrote {tmp_path / 'a.gguf'}\n"
    assert "converting tensors to q8_0" in out.stderr and f"{n}/{n}" in out.stderr
    assert "writing a.gguf" in out.stderr
    quiet = run("convert", str(tokentrail.model.DEMO_MODEL), str(tmp_path / "b.gguf"), "--type", "q8_0")
    assert quiet.returncode == 0 and quiet.stderr == ""  # not a terminal: no bar unless asked
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    out = run("generate", "The storm is", "-n", "3", "--dtype", "q8_0", "--progress", "--no-perf")
    assert out.returncode == 0 and f"converting weights to q8_0" in out.stderr and f"{n}/{n}" in out.stderr
    assert out.stdout.startswith("The storm is")
    from tokentrail.generation import SCORE_CHUNK

    long_text = "The storm is coming near the lake. " * 20
    ids = model.encode(long_text)
    assert SCORE_CHUNK < len(ids) <= model.context_limit
    out = run("score", long_text, "--top-n", "0", "--progress")
    assert out.returncode == 0, out.stderr
    assert "scoring" in out.stderr and f"{len(ids)}/{len(ids)}" in out.stderr
    data = json.loads(out.stdout)
    # Scored in chunks through one session, as one forward pass over the whole text would.
    logits = model.forward(ids).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert data["sum_logprob"] == pytest.approx(sum(logp[i - 1, t] for i, t in enumerate(ids) if i), abs=1e-3)


def test_ctrl_c_exits_130_without_a_traceback():
    proc = popen_taking_ctrl_c([sys.executable, "-m", "tokentrail.cli", "generate", "-"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The command waits for its prompt on stdin; interrupt it once it is there.
    wchan = f"/proc/{proc.pid}/wchan"
    for _ in range(600):
        if os.path.exists(wchan) and "pipe_read" in open(wchan).read():
            break
        time.sleep(0.1)
    else:
        time.sleep(3)  # no /proc to ask: allow for the imports
    # stdin stays open until the command has gone, so that it cannot finish by reading an empty prompt.
    ended_by_ctrl_c = press_ctrl_c(proc)
    out, err = proc.communicate(timeout=60)
    assert ended_by_ctrl_c and proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


@pytest.fixture
def hostile_checkpoints(tmp_path):
    """Tiny Hugging Face directories, each with one hostile file, and a FIFO named like a checkpoint."""
    sys.path.insert(0, str(REPO / "tests" / "fuzz"))
    from harnesses import hf_config, hf_tensors, safetensors_bytes

    def directory(name: str, config: dict | None = None, **files: str):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config or hf_config()))
        (d / "model.safetensors").write_bytes(safetensors_bytes(hf_tensors()))
        for file_name, text in files.items():
            (d / file_name.replace("__", ".")).write_text(text)
        return d

    tokenizer = (tokentrail.model.DEMO_MODEL / "tokenizer.json").read_text()
    os.mkfifo(tmp_path / "model.gguf")
    return {"heads-0": (directory("heads", hf_config(num_attention_heads=0)), "num_attention_heads"),
            "beams": (directory("beams", generation_config__json='{"num_beams": 1000000000}'), "num_beams"),
            "tokenizer-config": (directory("tokcfg", tokenizer__json=tokenizer, tokenizer_config__json="{x"),
                                 "tokenizer_config.json"),
            "fifo": (tmp_path / "model.gguf", "not a regular file")}


@pytest.mark.parametrize("command", [["generate", "x", "-n", "1"], ["chat"], ["serve"]])
def test_hostile_checkpoints_are_one_line_errors(hostile_checkpoints, command):
    """A checkpoint the loader refuses ends any command with its CheckpointError on one line, status 2."""
    for path, words in hostile_checkpoints.values():
        one_line_error(run(*command, "--model", str(path)), str(path.name), words)
