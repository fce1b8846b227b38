"""The fuzz harnesses of tests/fuzz: the seeds and every input that ever failed go through each
reader raising nothing but TokentrailError, and a short fuzzing run of each finds nothing.

The short runs take about 30 s together; tests/fuzz/README.md has the commands for a long
campaign and for the suite under AddressSanitizer + UBSan.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import harnesses  # noqa: E402

HARNESSES = sorted(harnesses.HARNESSES)
# Seconds of fuzzing per harness inside the suite (the whole budget is about 30 s).
SHORT_RUN = int(os.environ.get("TOKENTRAIL_FUZZ_SECONDS", "4"))


def inputs(kind: str, harness: str) -> list[Path]:
    return sorted(p for p in (FUZZ / kind / harness).glob("*") if p.is_file() and p.name != "README.md")


@pytest.mark.parametrize("harness", HARNESSES)
def test_seeds_load(harness):
    """Every seed is a valid model of its reader, so that fuzzing starts from deep inside it."""
    seeds = inputs("corpus", harness)
    assert seeds
    for seed in seeds:
        harnesses.HARNESSES[harness](seed.read_bytes())
        random_edits = harness == "gguf_structured" and seed.name == "edits"  # edits of any outcome
        assert harnesses.last_loaded or random_edits, f"seed {seed.name} of {harness} does not load"


@pytest.mark.parametrize("harness", HARNESSES)
def test_regressions(harness):
    """Inputs that once escaped as another exception, crashed or hung: now TokentrailError or a model."""
    for path in inputs("regressions", harness):
        harnesses.HARNESSES[harness](path.read_bytes())


@pytest.mark.parametrize("harness", HARNESSES)
def test_short_fuzzing_run(harness, tmp_path):
    run = subprocess.run([sys.executable, str(FUZZ / "run.py"), harness, "--seconds", str(SHORT_RUN),
                          "--corpus", str(tmp_path / "corpus"), "--artifacts", str(tmp_path / "artifacts")],
                         capture_output=True, text=True, timeout=SHORT_RUN + 120)
    found = sorted((tmp_path / "artifacts").glob("*"))
    assert run.returncode == 0 and not found, (
        f"fuzzing {harness} found {[p.name for p in found]}; keep each under tests/fuzz/regressions/{harness}/\n"
        + run.stderr[-4000:] + run.stdout[-2000:])
