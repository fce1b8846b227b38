"""The command line, run as a user runs it, on the bundled demo model."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import tokentrail
from conftest import REPO


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
    out = run("generate", "The storm is", "-n", "3", "-t", "0.7", "--top-k", "5", "--seed", "2", "--show-probs")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model:") == 3 and out.stdout.count("sampled:") == 3
    again = run("generate", "The storm is", "-n", "3", "-t", "0.7", "--top-k", "5", "--seed", "2", "--show-probs")
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


def test_bad_input_is_a_clear_error(tmp_path):
    out = run("generate", "x", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such checkpoint" in out.stderr
    out = run("generate", "x", "--temperature", "-1")
    assert out.returncode == 2 and "temperature" in out.stderr
    assert "Traceback" not in out.stderr
