"""The journey page in a real browser: offline, explorable, the sampler's maths, readable at 10 and 200 tokens."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil

import numpy as np
import pytest

import tokentrail
from tokentrail.cli import main
from tokentrail.journey import follow_generation
from tokentrail.report.html import report_data, write_report
from tokentrail.sampling import Sampler

SHORT = "The storm is near the old farm and the"  # 10 tokens with BOS on the demo model
LONG = ("Once upon a time there was a little cat who lived near the lake. " * 12) + "The storm is"
NEW_TOKENS = 4
OPTIONS = {"temperature": 0.8, "top_k": 20}
SEED = 1


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed")
    return exe


def _playwright():
    if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
        from playwright.sync_api import sync_playwright
        return sync_playwright
    return pytest.importorskip("playwright.sync_api").sync_playwright


@pytest.fixture(scope="module")
def model():
    return tokentrail.load()


@pytest.fixture(scope="module")
def pages(model, tmp_path_factory):
    """The short page (several generated tokens) and the 200-token page, written once."""
    d = tmp_path_factory.mktemp("report")
    short = follow_generation(model, SHORT, NEW_TOKENS, seed=SEED, **OPTIONS)
    long_ids = model.encode(LONG)[:200]
    long = [model.journey(long_ids, temperature=0)]
    return {"short": (write_report(short, d / "short.html"), short),
            "long": (write_report(long, d / "long.html"), long)}


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    with _playwright()() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path, width=1280, height=900):
    page = browser.new_page(viewport={"width": width, "height": height}, reduced_motion="reduce")
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page


@pytest.fixture(scope="module")
def short_page(browser, pages):
    page = _open(browser, pages["short"][0])
    yield page, pages["short"][1]
    page.close()


def test_the_page_is_one_offline_file(pages, browser):
    for name in ("short", "long"):
        path = pages[name][0]
        text = path.read_text(encoding="utf-8")
        assert "Content-Security-Policy" in text and "default-src 'none'" in text
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", text)
        assert "@import" not in text and "url(http" not in text
        page = _open(browser, path)
        assert page.requests == [path.as_uri()] and not page.errors
        page.close()


def test_cli_report_with_new_tokens(model, tmp_path):
    out = tmp_path / "j.html"
    assert main(["report", SHORT, "--new-tokens", "3", "--temperature", "0.9", "--seed", "4", "-o", str(out)]) == 0
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>',
                                out.read_text(encoding="utf-8"), re.S).group(1))
    want = model.generate(SHORT, max_new_tokens=3, temperature=0.9, seed=4).token_ids
    assert [s["chosen"]["id"] for s in data["steps"]] == want
    assert main(["report", SHORT, "--new-tokens", "0", "-o", str(out)]) == 2
    assert main(["report", SHORT, "-o", str(tmp_path)]) == 2    # a directory: one-line error


def test_report_data_carries_the_engines_numbers(pages, model):
    journeys = pages["short"][1]
    data = report_data(journeys)
    for j, step in zip(journeys, data["steps"]):
        logits = np.frombuffer(base64.b64decode(step["logits"]), "<f4")
        np.testing.assert_array_equal(logits, j.logits)        # bit for bit
    att = data["attention"]
    raw = np.frombuffer(base64.b64decode(att["data"]), "<u2").astype(np.float64) / att["scale"]
    last = journeys[-1]
    n = len(last.ids)
    assert att["queries"] == list(range(n))
    block = n * (n + 1) // 2
    for layer in range(model.config.n_layers):
        _, tables = last.attention_tables(layer)
        for h in range(model.config.n_heads):
            got = raw[(layer * model.config.n_heads + h) * block:][:block]
            want = np.concatenate([tables[h, q, : q + 1] for q in range(n)])
            np.testing.assert_allclose(got, want, atol=0.5 / 65535 + 1e-9)


SETTINGS = [(0.8, 20, 1.0), (1.0, 0, 1.0), (0.35, 0, 0.6), (1.7, 7, 0.9), (0.0, 0, 1.0), (0.05, 3, 0.5),
            (2.5, 50, 0.05), (1.25, 1, 1.0)]


@pytest.mark.parametrize("t, k, p", SETTINGS)
def test_sliders_compute_what_the_sampler_computes(short_page, t, k, p):
    page, journeys = short_page
    page.click(".strip .tok.generated >> nth=1")
    j = journeys[1]
    page.evaluate("""([t, k, p]) => {
        for (const [id, v] of [["temp", t], ["topk", k], ["topp", p]]) {
            const e = document.getElementById(id); e.value = String(v); e.dispatchEvent(new Event("input"));
        }}""", [t, k, p])
    shown = {int(e.get_attribute("data-token")): float(e.get_attribute("data-p"))
             for e in page.query_selector_all(".probs .prob")}
    want = Sampler(temperature=t, top_k=k, top_p=p, seed=0).step(j.logits, j.ids).probs
    assert len(shown) == 15
    for token, prob in shown.items():
        assert prob == pytest.approx(float(want[token]), rel=1e-9, abs=1e-13), (t, k, p, token)
        assert (prob == 0) == (want[token] == 0)
    assert int(page.get_attribute("#kept", "data-kept")) == int((want > 0).sum())
    # The list is the model's most likely tokens, by logit.
    assert list(shown) == [int(i) for i in np.argsort(-j.logits, kind="stable")[:15]]
    assert not page.errors


def test_token_strip_switches_between_journeys(short_page, model):
    page, journeys = short_page
    want = model.generate(SHORT, max_new_tokens=NEW_TOKENS, seed=SEED, **OPTIONS).token_ids
    assert [j.chosen for j in journeys] == want
    assert len(page.query_selector_all(".strip .tok.generated")) == NEW_TOKENS
    for k, j in enumerate(journeys):
        page.click(f".strip .tok.generated >> nth={k}")
        chip = page.query_selector_all(".strip .tok.generated")[k]   # the strip is redrawn on a click
        assert "active" in chip.get_attribute("class")
        assert f"step {k + 1} of {NEW_TOKENS}" in page.inner_text("#step-line")
        picked = page.inner_text("#chain-draw .cand.picked .tok")
        assert picked == j.token(j.chosen).replace(" ", "·")   # spaces are drawn as middle dots
        # The chain stages on the page are the journey's.
        titles = [e.inner_text() for e in page.query_selector_all("#chain .stagecard h4")]
        assert titles == ["softmax", "1 · temperature", "2 · top-k", "the draw"]
        removed = [s.data["removed"] for s in j if s.kind == "sampler"]
        assert f"removes {removed[1]} tokens" in page.inner_text("#chain-2")
        # The sliders start at the run's settings.
        assert page.input_value("#temp") == "0.8" and page.input_value("#topk") == "20"
        # The followed token is outlined in the strip.
        followed = page.query_selector(".strip .tok.followed")
        if k == 0:
            assert followed.get_attribute("title").startswith(f"position {j.position} ")
        else:  # a generated token is followed: the one chosen at the step before
            assert followed.get_attribute("data-step") == str(k - 1)
    page.click("#prev-token")
    assert f"step {NEW_TOKENS - 1} of" in page.inner_text("#step-line")


def test_layers_heads_and_patterns(short_page, model):
    page, journeys = short_page
    page.click(".strip .tok.generated >> nth=0")
    j = journeys[0]
    H, L = model.config.n_heads, model.config.n_layers
    assert len(page.query_selector_all(".node.layer")) == L
    page.focus("#node-L1")
    page.keyboard.press("Enter")                 # the cards work from the keyboard too
    assert "Inside layer 1" in page.inner_text("#layer-title")
    page.click("#node-L2")
    assert "Inside layer 2" in page.inner_text("#layer-title")
    assert len(page.query_selector_all("#heads .head canvas")) == H
    page.click("#head-1")
    assert page.inner_text("#head-title").startswith("Layer 2, head 1: the whole attention pattern")
    # Lines go from the followed token to the keys it reads; the labels are the head's real weights.
    paths = page.query_selector_all("#lines svg path")
    row = j.attention(2)[1]
    assert 1 <= len(paths) <= 12 and len(paths) == min(12, int((row >= 0.005).sum()))
    labels = [float(e.inner_text()) for e in page.query_selector_all("#lines .w")]
    assert labels == [float(f"{v:.2f}") for v in sorted(row, reverse=True)[: len(labels)]]
    # Hovering a cell of the pattern reads out its weight.
    strongest = int(np.argmax(row))
    page.evaluate("() => document.getElementById('heat').scrollIntoView({block: 'center'})")
    box = page.query_selector("#heat").bounding_box()
    geometry = page.evaluate("""() => { const c = document.getElementById('heat');
        return [parseFloat(c.style.width), document.getElementById('zoom').value]; }""")
    width, cell = geometry[0], int(geometry[1])
    n = len(j.ids)
    label_w = width - 8 - n * cell
    page.mouse.move(box["x"] + label_w + (strongest + 0.5) * cell, box["y"] + (j.position + 0.5) * cell)
    readout = page.inner_text("#heat-readout")
    assert f"query {j.position}" in readout and f"key {strongest}" in readout
    assert float(readout.rsplit(":", 1)[1]) == pytest.approx(float(row[strongest]), abs=1e-4)
    # The colour scale has a legend with ticks from 0 to 1.
    ticks = [e.inner_text() for e in page.query_selector_all("#legend .ticks span")]
    assert ticks == ["0", "0.05", "0.2", "0.5", "1"]   # the square-root scale by default
    page.select_option("#scale", "linear")
    assert [e.inner_text() for e in page.query_selector_all("#legend .ticks span")] == ["0", "0.25", "0.5", "0.75", "1"]
    # Clicking an attribution bar of a head opens that head.
    page.click("#attr .name.link >> nth=0")
    assert "Inside layer" in page.inner_text("#layer-title")
    assert not page.errors


def test_logit_lens_and_attribution_show_numbers(short_page, model):
    page, journeys = short_page
    page.click(".strip .tok.generated >> nth=0")
    j = journeys[0]
    lens = j.logit_lens()
    rows = page.query_selector_all("#ladder table tr")
    assert len(rows) == model.config.n_layers + 2
    last = rows[-1].inner_text()
    assert f"{lens['top_probs'][-1][0]:.2f}" in last
    grid_rows = page.query_selector_all("table.grid tbody tr")
    assert len(grid_rows) == len(journeys[-1].ids)
    assert "followed" in page.get_attribute(f"#grid-{j.position}", "class")
    a = j.attribution()
    assert f"{a['logit']:.4f}" in page.inner_text("#attr-sum")
    assert page.inner_text("#attr .val.total") == f"{a['total']:+.3f}"


def test_step_through_follows_the_stages(short_page):
    page, journeys = short_page
    page.click(".strip .tok.generated >> nth=0")
    j = journeys[0]
    page.evaluate("() => { for (let i = 0; i < 200; i++) document.getElementById('prev-stage').click(); }")
    titles = []
    for i, stage in enumerate(j.stages):
        titles.append(page.inner_text("#stage-title"))
        assert page.inner_text("#stage-text") == stage.text
        current = page.query_selector(".current")
        if stage.kind == "attention":
            assert current.get_attribute("id") == f"node-L{stage.layer}"
            assert f"Inside layer {stage.layer}" in page.inner_text("#layer-title")
        if stage.kind == "choice":
            assert page.query_selector("#chain-draw.current") is not None
        if i + 1 < len(j.stages):
            page.click("#next-stage")
    assert titles == [s.title for s in j.stages]
    assert page.is_disabled("#next-stage")
    page.keyboard.press("ArrowLeft")
    assert page.inner_text("#stage-title") == j.stages[-2].title


def _layout_problems(page) -> dict:
    return page.evaluate("""() => {
        const vw = document.documentElement.clientWidth, out = {overflow: [], small: []};
        const clipped = e => { for (let a = e.parentElement; a; a = a.parentElement) {
            const o = getComputedStyle(a).overflowX; if (o === 'auto' || o === 'scroll' || o === 'hidden') return a !== document.body && a !== document.documentElement; }
            return false; };
        for (const e of document.querySelectorAll('body *')) {
            const r = e.getBoundingClientRect(), cs = getComputedStyle(e);
            if (r.width === 0 || cs.visibility === 'hidden' || cs.display === 'none') continue;
            if (!clipped(e) && (r.right > vw + 1 || r.left < -1)) out.overflow.push(e.tagName + '#' + e.id + '.' + e.className);
            const text = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
            if (text && parseFloat(cs.fontSize) < 10) out.small.push(e.tagName + '.' + e.className + ' ' + cs.fontSize);
        }
        out.pageWidth = document.documentElement.scrollWidth; out.viewport = vw;
        return out; }""")


@pytest.mark.parametrize("name", ["short", "long"])
@pytest.mark.parametrize("width", [1280, 760])
def test_readable_without_overflow(browser, pages, name, width, tmp_path):
    path, journeys = pages[name]
    n = len(journeys[-1].ids)
    assert n == (10 + NEW_TOKENS - 1 if name == "short" else 200)
    page = _open(browser, path, width=width)
    page.click("#node-L1")
    problems = _layout_problems(page)
    assert problems["pageWidth"] <= problems["viewport"], problems
    assert problems["overflow"] == [] and problems["small"] == [], problems
    # The pattern of the selected head is drawn: many colours, not a blank canvas.
    colours = page.evaluate("""() => { const c = document.getElementById('heat'), g = c.getContext('2d');
        const d = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < d.length; i += 4 * 7) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); return seen.size; }""")
    assert colours > 20
    shot = tmp_path / f"{name}-{width}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Zooming in keeps the page itself from overflowing: the pattern scrolls inside its frame.
    page.evaluate("() => { const z = document.getElementById('zoom'); z.value = '28'; z.dispatchEvent(new Event('input')); }")
    problems = _layout_problems(page)
    assert problems["pageWidth"] <= problems["viewport"] and problems["overflow"] == [], problems
    assert not page.errors
    page.close()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_page_for_other_families(browser, tmp_path, family):
    """Learned positions and LayerNorm (GPT-2), biases and no tokenizer (ids only): the page still works."""
    from conftest import require
    from reference_models import build

    require("torch")
    require("transformers")
    build(family, tmp_path / family)
    model = tokentrail.load(tmp_path / family)
    journeys = follow_generation(model, [1, 17, 200, 5, 99, 42], 3, seed=2, temperature=1.0)
    path = write_report(journeys, tmp_path / "page.html")
    page = _open(browser, path)
    assert not page.errors
    assert len(page.query_selector_all(".node.layer")) == model.config.n_layers
    assert ("position vector" in page.inner_text("#node-embed")) == (family == "gpt2")
    page.click(".strip .tok.generated >> nth=2")
    assert page.inner_text("#chain-draw .cand.picked .tok") == journeys[2].token(journeys[2].chosen)
    page.close()


def test_byte_tokens_on_the_page(browser, tmp_path):
    """A sentencepiece model's byte tokens appear as <0xNN> escapes, never as U+FFFD."""
    from conftest import require_stories

    model = tokentrail.load(require_stories() / "stories260K.bin")
    path = write_report(model.journey("日本 storm", temperature=0), tmp_path / "bytes.html")
    page = _open(browser, path)
    strip = page.inner_text("#strip")
    assert "<0xE6>" in strip and "\ufffd" not in strip and not page.errors
    page.close()


def test_page_without_whole_tables(browser, model, tmp_path, monkeypatch):
    """Past FULL_ATTENTION_LIMIT only the followed rows are kept; the page says so and still draws them."""
    import tokentrail.journey as journey_module

    monkeypatch.setattr(journey_module, "FULL_ATTENTION_LIMIT", 5)
    j = model.journey(SHORT, temperature=0)
    assert not j.full_attention
    path = write_report(j, tmp_path / "rows.html")
    page = _open(browser, path)
    page.click("#node-L0")
    assert "the followed token's row" in page.inner_text("#head-title") and not page.errors
    assert len(page.query_selector_all("#lines svg path")) >= 1
    page.close()


@pytest.mark.parametrize("family", ["gemma2", "mixtral"])
def test_family_pages(browser, tmp_path, family):
    """A softcapping, sliding-window family and a mixture of experts: the page tells their particulars and its
    attribution adds up to the engine's logit through the softcap."""
    from conftest import require
    from reference_models import build

    require("torch")
    require("transformers")
    build(family, tmp_path / family)
    model = tokentrail.load(tmp_path / family)
    journeys = follow_generation(model, [1, 17, 200, 5, 99, 42, 42, 7, 250, 3], 2, seed=3, temperature=0.9)
    j = journeys[0]
    a = report_data(journeys)["steps"][0]["attribution"]
    page = _open(browser, write_report(journeys, tmp_path / "page.html"))
    assert not page.errors
    page.click(".strip .tok.generated >> nth=0")
    text = page.inner_text("#attr-sum")
    assert f"{float(j.logits[j.chosen]):.4f}" in text
    if model.config.final_softcap:
        assert a["softcap"] == model.config.final_softcap
        assert abs(a["capped_total"] - a["logit"]) <= 1e-4 * max(1.0, abs(a["logit"]))
        assert f"{a['capped_total']:.4f} is the logit" in text
        assert page.inner_text("#attr .name.total") == "sum, before the softcap"
    else:
        assert a["softcap"] is None and abs(a["total"] - a["logit"]) <= 1e-4 * max(1.0, abs(a["logit"]))
    # Step to the first layer's MLP stage: its narration is the journey's (experts for a mixture).
    page.evaluate("() => { for (let i = 0; i < 200; i++) document.getElementById('prev-stage').click(); }")
    mlp = next(i for i, s in enumerate(j.stages) if s.kind == "mlp")
    for _ in range(mlp):
        page.click("#next-stage")
    assert page.inner_text("#stage-text") == j.stages[mlp].text
    if model.config.n_experts:
        assert "the router sends" in j.stages[mlp].text and "experts" in page.inner_text("#stage-title")
    if model.config.attn_softcap:
        assert any("softcapped" in s.text for s in j.stages if s.kind == "attention")
    page.close()
