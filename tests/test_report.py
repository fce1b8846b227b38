"""The HTML report in a real browser: the temperature slider recomputes the real softmax, offline."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import tokentrail
from tokentrail import thermo
from tokentrail.report.html import write_report


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed")
    return exe


@pytest.fixture(scope="module")
def page_and_journey(tmp_path_factory):
    exe = _chromium()
    if os.environ.get("TOKENTRAIL_REQUIRE_REFERENCE") == "1":
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    model = tokentrail.load()
    j = model.journey("The storm is", temperature=1.0)
    path = write_report(j, tmp_path_factory.mktemp("report") / "journey.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_selector(".prob")
        yield page, j, requests, errors, path
        browser.close()


def _shown(page) -> dict[int, float]:
    return {int(e.get_attribute("data-token")): float(e.inner_text()) for e in page.query_selector_all(".prob")}


def _set_temperature(page, t: float) -> None:
    page.eval_on_selector("#temp", "(e, t) => { e.value = String(t); e.dispatchEvent(new Event('input')); }", t)


@pytest.mark.parametrize("t", [1.0, 0.5, 0.05, 2.5, 0.0])
def test_slider_shows_thermo_probabilities(page_and_journey, t):
    page, j, _, errors, _ = page_and_journey
    _set_temperature(page, t)
    shown = _shown(page)
    want = thermo.probabilities(j.logits, t)
    assert len(shown) >= 5
    for token, p in shown.items():
        assert p == pytest.approx(float(want[token]), abs=6e-5), (t, token)
    # The list is the model's top candidates by logit.
    assert list(shown) == [int(i) for i in np.argsort(-j.logits, kind="stable")[: len(shown)]]
    assert not errors


def test_page_is_offline_and_complete(page_and_journey):
    page, j, requests, errors, path = page_and_journey
    assert requests == [path.as_uri()]
    assert not errors
    n_heads = j.config.n_layers * j.config.n_heads
    assert len(page.query_selector_all(".head canvas")) == n_heads
    assert len(page.query_selector_all("table.lens tr")) == j.config.n_layers + 2  # header + embed + layers
    page.click(".head >> nth=0")
    assert "layer 0, head 0" in page.inner_text("#big")
    text = page.inner_text("#attr-sum")
    assert f"{j.attribution()['logit']:.4f}" in text
