"""The terminal journey: attention tables that fit any prompt and keep every head's strongest key."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from rich.console import Console

import tokentrail
from tokentrail.cli import main
from tokentrail.report.terminal import _head_groups, _width_of, attention_columns, print_journey

LONG = ("Once upon a time there was a little cat who lived near the lake. " * 8) + "The storm is"


@pytest.fixture(scope="module")
def model():
    return tokentrail.load()


def _render(j, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), highlight=False)
    print_journey(j, console=console)
    return console.export_text()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_attention_columns_keep_every_strongest_key(model, width):
    j = model.journey(LONG, temperature=0)
    assert len(j.ids) > 100
    max_columns = (width - 6) // 8
    for layer in range(model.config.n_layers):
        pattern = j.attention(layer)
        groups = _head_groups(pattern, max_columns)
        assert sorted(h for g in groups for h in g) == list(range(model.config.n_heads))
        for heads in groups:
            shown = attention_columns(pattern[heads], max_columns)
            assert _width_of(set(shown), pattern.shape[1]) <= max_columns
            for h in heads:
                assert int(np.argmax(pattern[h])) in shown
            assert len(j.ids) - 1 in shown  # the followed token itself


@pytest.mark.parametrize("width", [60, 80])
def test_printed_tables_fit_and_mark_what_is_hidden(model, width):
    text = _render(model.journey(LONG, temperature=0), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "keys shown; …N columns: N hidden keys" in text
    # The marker columns say how many keys they stand for, and these add up with the shown ones.
    n = len(model.encode(LONG))
    assert f"of {n} keys shown" in text
    assert "\ufffd" not in text and not re.search(r"-0\.0+(?![0-9])", text)  # no negative zeros


def test_short_prompt_hides_nothing(model):
    text = _render(model.journey("The storm is", temperature=0), 80)
    assert "keys shown" not in text and "…" not in text.split("logit lens")[0].split("attention")[1]


def test_byte_tokens_print_as_escapes(model, capsys):
    assert main(["journey", "日本 is 🎉", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "\ufffd" not in out and "<0xE6>" in out and "<0xF0>" in out


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "top"), (["--top", "-3"], "top"), (["--width", "10"], "width"),
    (["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top_p"),
])
def test_bad_values_are_one_line_errors(capsys, args, message):
    assert main(["journey", "The storm is", *args]) == 2
    err = capsys.readouterr().err
    assert re.match(r"tokentrail( journey)?: error: ", err) and message in err and len(err.strip().splitlines()) == 1


def test_softcapped_attribution_says_where_the_sum_meets_the_logit(tmp_path):
    """With a final logit softcap the parts add up to the logit before it; the printout says so, with numbers."""
    from conftest import require
    from reference_models import build

    require("torch")
    require("transformers")
    build("gemma2", tmp_path / "gemma2")
    model = tokentrail.load(tmp_path / "gemma2")
    j = model.journey([1, 17, 200, 5, 99, 42, 42, 7, 250, 3])
    a = j.attribution()
    text = _render(j, 200)
    cap = model.config.final_softcap
    assert f"sum of all {len(a['parts'])} parts {a['total']:+.4f}; after the final softcap {cap:g}·tanh(sum/{cap:g}) " \
           f"= {a['capped_total']:+.4f} = logit {a['logit']:+.4f}" in text
    assert abs(a["capped_total"] - a["logit"]) <= 1e-4 * max(1.0, abs(a["logit"]))
    assert "h·u (the logit before any softcap)" in text
