"""Headless Chromium (Debian's, driven by Playwright) against a real `saescope serve` with its model worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from saescope.app.web.format import fmt
from saescope.precompute.store import Store
from tests.conftest import ARTIFACTS, free_port, stop_group

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM) and os.environ.get("SAESCOPE_SKIP_BROWSER") == "1":
    pytest.skip("SAESCOPE_SKIP_BROWSER=1 and no /usr/bin/chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def server(demo_store):
    port, wport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "serve", str(demo_store), "--port", str(port),
                             "--worker-port", str(wport)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    up = False
    while time.time() < deadline and not up:
        try:
            up = httpx.get(f"{base}/", timeout=0.5).status_code == 200 and \
                httpx.get(f"http://127.0.0.1:{wport}/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            time.sleep(0.3)
    assert up, "server or worker did not come up"
    yield base
    stop_group(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium (make browser) for the browser tests"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, request):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    ctx.close()


@pytest.fixture(scope="module")
def facts(demo_store):
    with Store(demo_store) as s:
        sae = s.saes()[0]
        index = s.features(sae.sae_id, sort="density", desc=True, limit=1)[0].index
        return {"sae": sae.sae_id, "index": index, "top": s.examples(sae.sae_id, index, "top"),
                "feature": s.feature(sae.sae_id, index)}


def tip(page, selector: str) -> str:
    return page.eval_on_selector(selector, "el => getComputedStyle(el, '::after').content")


def test_hover_and_focus_show_the_exact_value(server, page, facts):
    page.goto(f"{server}/sae/{facts['sae']}/feature/{facts['index']}")
    first = "#top-examples li.ex:first-child .tok.max"
    ex = facts["top"][0]
    want = f"→ {fmt(ex.value, 4)}"
    page.hover(first)
    assert want in tip(page, first)
    page.mouse.move(0, 0)
    # keyboard: tab into the page until the max token of the first example has focus
    page.focus("body")
    for _ in range(200):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.matches('#top-examples li.ex:first-child .tok.on')"):
            break
    active_tip = page.evaluate("getComputedStyle(document.activeElement, '::after').content")
    value = float(page.evaluate("document.activeElement.dataset.tip.split('→ ')[1]"))
    assert active_tip.strip('"') == page.evaluate("document.activeElement.dataset.tip")
    pos = page.evaluate("[...document.activeElement.parentElement.querySelectorAll('.tok')].indexOf(document.activeElement)")
    lo = max(0, ex.pos - 24)
    assert value == pytest.approx(ex.acts[lo + pos], rel=1e-3, abs=1e-3)


def test_context_width_changes_in_place_and_in_the_url(server, page, facts):
    page.goto(f"{server}/sae/{facts['sae']}/feature/{facts['index']}")
    count = lambda: page.eval_on_selector("#top-examples li.ex:first-child .strip", "s => s.querySelectorAll('.tok').length")
    before = count()
    page.fill("#left", "2")
    page.dispatch_event("#left", "change")
    page.wait_for_function("location.search.includes('left=2')")
    page.wait_for_function("document.querySelector('#top-examples li.ex .strip').querySelectorAll('.tok').length <= 11")
    assert count() <= 2 + 1 + 8 < before
    q = parse_qs(urlparse(page.url).query)
    assert q["left"] == ["2"] and q["right"] == ["8"]
    page.wait_for_selector("#samples h3.group")  # samples followed the new width


def test_search_and_paginate(server, page, facts):
    word = next(t.strip() for t in facts["feature"].top_tokens if len(t.strip()) >= 3)
    page.goto(f"{server}/sae/{facts['sae']}")
    page.fill("input[name=q]", word)
    page.press("input[name=q]", "Enter")
    page.wait_for_selector("table.features tbody tr td a")
    assert "q=" in page.url
    rows = page.locator("table.features tbody tr td:first-child a").all_inner_texts()
    assert rows and all(r.isdigit() for r in rows)
    # paginate the feature list with htmx: the URL follows
    page.goto(f"{server}/sae/{facts['sae']}")
    page.click("a[rel=next] >> nth=0")
    page.wait_for_function("location.search.includes('page=2')")
    page.wait_for_selector("text=51–100 of 4,096")
    first = page.locator("table.features tbody tr td:first-child a").first.inner_text()
    assert first == "50"
    page.go_back()
    page.wait_for_function("!location.search.includes('page=2')")


def test_arrow_keys_step_between_features(server, page, facts):
    i = facts["index"]
    page.goto(f"{server}/sae/{facts['sae']}/feature/{i}")
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"**/feature/{i + 1}")
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(f"**/feature/{i}")


def test_a_shared_link_reproduces_the_view(server, page, facts):
    url = f"{server}/sae/{facts['sae']}/feature/{facts['index']}?left=3&right=1&samples=quantile"
    page.goto(url)
    assert page.input_value("#left") == "3" and page.input_value("#right") == "1"
    page.wait_for_selector("#samples [role=tab][aria-selected=true]")
    assert "quantiles" in page.inner_text("#samples [role=tab][aria-selected=true]")
    n = page.eval_on_selector("#top-examples li.ex:first-child .strip", "s => s.querySelectorAll('.tok').length")
    assert n <= 5


def test_inspect_a_prompt_and_read_a_feature_value(server, page, facts):
    page.goto(f"{server}/inspect")
    page.fill("textarea[name=prompt]", "The file descriptor of the socket is closed.")
    page.click("form.inspect button")
    page.wait_for_selector("#top-features tbody tr td a")
    assert "prompt=" in page.url
    index = int(page.locator("#top-features tbody tr td a").first.inner_text())
    shown = float(page.locator("#top-features tbody tr td.live-val").first.inner_text())
    live = httpx.get(f"{server}/api/saes/{facts['sae']}/features/{index}/activations",
                     params={"text": "The file descriptor of the socket is closed."}).json()
    assert shown == pytest.approx(live["max_value"], rel=1e-3)
    page.click(".inspect-tokens a.tok >> nth=3")
    page.wait_for_selector("#token-detail h2")
    assert "Token 3" in page.inner_text("#token-detail h2") and "pos=3" in page.url
    page.keyboard.press("Tab")  # keyboard focus on the next token shows its features too
    page.wait_for_function("document.querySelector('#token-detail h2').textContent.includes('Token 4')")
    assert "pos=4" in page.url
    # the feature page's own live box agrees
    page.goto(f"{server}/sae/{facts['sae']}/feature/{index}")
    page.fill(".live textarea", "The file descriptor of the socket is closed.")
    page.click(".live button")
    page.wait_for_selector("#live-max")
    assert float(page.inner_text("#live-max")) == pytest.approx(live["max_value"], rel=1e-3)


def test_phone_width_and_dark_mode(server, browser, facts):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    pg = ctx.new_page()
    pg.goto(f"{server}/sae/{facts['sae']}/feature/{facts['index']}")
    width = pg.evaluate("document.documentElement.scrollWidth")
    bg = pg.evaluate("getComputedStyle(document.body).backgroundColor")
    pg.screenshot(path=str(ARTIFACTS / "phone_dark_feature.png"), full_page=False)
    ctx.close()
    assert width <= 400, "no horizontal scrolling at phone width"
    assert bg == "rgb(22, 24, 27)"


def test_steering_panel_shows_default_and_steered_completions(server, page, facts):
    """From a feature page: type a prompt into the steering panel, steer, read both completions; the URL keeps
    the whole state, and opening it again reproduces the view."""
    page.goto(f"{server}/sae/{facts['sae']}/feature/{facts['index']}")
    panel = page.locator("section.steer")
    panel.locator("textarea[name=prompt]").fill("The buffer is")
    panel.locator("input[name=value]").fill("40")
    panel.locator("input[name=n]").fill("8")
    panel.locator("button").click()
    page.wait_for_selector("#steered-completion", timeout=60_000)
    default = page.inner_text("#default-completion").strip()
    steered = page.inner_text("#steered-completion").strip()
    assert default and steered and default != steered, (default, steered)
    q = parse_qs(urlparse(page.url).query)
    assert q["feature"] == [str(facts["index"])] and q["value"] == ["40"] and q["prompt"] == ["The buffer is"]
    again = page.context.new_page()
    again.goto(page.url)
    assert again.inner_text("#steered-completion").strip() == steered
    again.close()


def test_chat_page_steers_a_conversation_and_continues_it(server, page, facts):
    """Type a message, steer, read both replies; continue with the steered one; the URL reproduces the view."""
    page.goto(f"{server}/chat?sae={facts['sae']}")
    form = page.locator("#chat-form")
    form.locator("textarea[name=say]").fill("What is a file?")
    form.locator("input[name=edit]").fill(f"{facts['index']}:add:40")
    form.locator("input[name=n]").fill("6")
    form.locator("button").click()
    page.wait_for_selector("#steered-reply", timeout=90_000)
    assert page.inner_text("#chat-turns").strip().startswith("user")
    default, steered = page.inner_text("#default-reply").strip(), page.inner_text("#steered-reply").strip()
    assert default and steered
    # hover over a generated token shows its log-probability
    page.hover("#steered-reply .tok")
    assert "log p" in tip(page, "#steered-reply .tok")
    page.click("#continue-steered")
    page.wait_for_selector("#chat-turns li.assistant", timeout=60_000)
    q = parse_qs(urlparse(page.url).query)
    assert q["m"][0] == "user:What is a file?" and q["m"][-1].startswith("assistant:")
    again = page.context.new_page()
    again.goto(page.url)
    assert again.locator("#chat-turns li").count() == 2
    again.close()


def test_patching_page_draws_the_heatmap_with_real_and_estimated_shares(server, page, facts):
    page.goto(f"{server}/patch?sae={facts['sae']}")
    form = page.locator("#patch-form")
    form.locator("textarea[name=clean]").fill("The file is closed")
    form.locator("textarea[name=corrupted]").fill("The file is open")
    form.locator("input[name=n_features]").fill("4")
    form.locator("button").click()
    page.wait_for_selector("#patch-heatmap", timeout=90_000)
    assert page.locator("#patch-heatmap thead th a").count() == 4
    cell = page.locator("#patch-heatmap td[data-real]").first
    assert cell.get_attribute("data-estimate") is not None
    q = parse_qs(urlparse(page.url).query)
    assert q["clean"] == ["The file is closed"] and q["n_features"] == ["4"]
    again = page.context.new_page()
    again.goto(page.url)
    assert again.locator("#patch-heatmap tbody tr").count() == page.locator("#patch-heatmap tbody tr").count()
    again.close()
