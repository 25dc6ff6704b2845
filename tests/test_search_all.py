"""Search a prompt across every SAE against brute force: each SAE encoded alone, every feature scored by a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.precompute.encode import encode_batch
from saescope.precompute.search_all import search_all


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tiny_sae_dir, second_sae_dir):
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    saes = [(n, s, s.cfg.hook_name) for n, s in (("tiny", load_sae(str(tiny_sae_dir))),
                                                 ("relu", load_sae(str(second_sae_dir))))]
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer("The cat sat on the warm mat today", add_special_tokens=False)["input_ids"]
    return lm, saes, ids


def brute_force(lm, saes, ids, positions) -> list[tuple[float, int, int, int]]:
    """(-score, SAE order, feature, position) of every hit, best first: each SAE encoded alone, features by a loop."""
    want = []
    chosen = positions or list(range(1, len(ids)))
    for n, (sid, sae, hook) in enumerate(saes):
        z = encode_batch(lm, sae, np.asarray([ids]), hook)[0].numpy()  # alone; BOS zeroed as special
        with torch.no_grad():
            raw = sae.encode(lm.activations(torch.tensor([ids]), hook)[0]).numpy()  # BOS not zeroed
        for f in range(z.shape[1]):
            vals = [z[p, f] for p in chosen]
            best = max(vals)
            if best > 0 and int(np.argmax(raw[:, f])) != 0:
                want.append((-best, n, f, chosen[int(np.argmax(vals))]))
    return sorted(want)


@pytest.mark.parametrize("positions", [None, [3], [2, 5]])
def test_search_all_equals_brute_force(setup, positions):
    lm, saes, ids = setup
    got = search_all(lm, saes, ids, positions, top=1000)
    want = brute_force(lm, saes, ids, positions)
    assert [(h.sae_id, h.feature, h.position) for h in got] == [(saes[n][0], f, p) for _, n, f, p in want]
    for h, w in zip(got, want):
        assert h.score == pytest.approx(-w[0], rel=1e-5)
    assert {h.sae_id for h in got} == {"tiny", "relu"}


def test_search_all_refuses_bad_positions(setup):
    from saescope.precompute.errors import UserError

    lm, saes, ids = setup
    with pytest.raises(UserError, match="outside the prompt"):
        search_all(lm, saes, ids, [len(ids)])
    with pytest.raises(UserError, match="not a special token"):
        search_all(lm, saes, ids, [0])


PROMPT = "The cat sat on the warm mat today"


@pytest.fixture(scope="module")
def two_sae_worker(tiny_lm_dir, tiny_sae_dir, second_sae_dir):
    """The worker app on the tiny model with both SAEs, in this process (TestClient)."""
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    engine = build_engine(str(tiny_lm_dir), {"tiny": str(tiny_sae_dir), "relu": str(second_sae_dir)},
                          {"tiny": None, "relu": None}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as client:
        yield client


def test_worker_search_all_equals_brute_force(setup, two_sae_worker):
    lm, saes, ids = setup
    r = two_sae_worker.post("/search_all", json={"text": PROMPT, "positions": [2, 5, 0], "top": 100})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["positions"] == [2, 5]  # BOS (special) never counts
    want = brute_force(lm, saes, ids, [2, 5])[:100]
    assert [(h["sae_id"], h["feature"], h["pos"]) for h in out["hits"]] == [(saes[n][0], f, p) for _, n, f, p in want]
    assert [h["value"] for h in out["hits"]] == pytest.approx([-w[0] for w in want], rel=1e-5)
    only = two_sae_worker.post("/search_all", json={"text": PROMPT, "positions": [3], "sae_ids": ["relu"]}).json()
    assert {h["sae_id"] for h in only["hits"]} <= {"relu"}
    bad = two_sae_worker.post("/search_all", json={"text": PROMPT, "positions": [len(ids)]})
    assert bad.status_code == 422 and f"outside the prompt's {len(ids)} tokens" in bad.text
    assert two_sae_worker.post("/search_all", json={"text": PROMPT, "positions": []}).status_code == 422
    assert "not a special token" in two_sae_worker.post("/search_all", json={"text": PROMPT, "positions": [0]}).text


def test_selection_parameter_is_strict():
    from saescope.app.errors import AppError
    from saescope.app.settings import WORKER
    from saescope.app.web.live_views import parse_selection

    assert parse_selection("3, 5,3 ,7") == [3, 5, 7] and parse_selection("") is None and parse_selection(None) is None
    for bad, says in (("3;5", "separated by commas"), ("-1", "separated by commas"), ("1e3", "separated by commas"),
                      (",".join(map(str, range(WORKER.max_search_positions + 1))), f"at most {WORKER.max_search_positions}")):
        with pytest.raises(AppError, match=says):
            parse_selection(bad)


@pytest.fixture(scope="module")
def served_two(two_sae_store):
    """A real worker (uvicorn thread) on the two-SAE store and the dashboard (uvicorn thread) using it."""
    from saescope.app.web.app import create_app
    from saescope.app.worker.engine import build_engine, sources_from_store
    from saescope.app.worker.routes import create_worker_app
    from tests.conftest import serve_in_thread

    model, saes, hooks = sources_from_store(two_sae_store)
    engine = build_engine(model, saes, hooks, "cpu", "float32")
    with serve_in_thread(create_worker_app(engine)) as wurl, \
            serve_in_thread(create_app(two_sae_store, worker_url=wurl)) as url:
        yield url


def test_inspect_selects_tokens_and_ranks_every_sae_there(served_two, browser, setup):
    """Click, shift-click and ctrl-click tokens on /inspect: the selection goes into the URL (sel=), and the table
    lists the top features of both SAEs there, equal to the JSON twin and to the brute force; a reload keeps it."""
    import httpx

    from saescope.app.settings import SERVE
    from tests.conftest import ARTIFACTS

    lm, saes, ids = setup
    order = {sid: n for n, (sid, _, _) in enumerate(saes)}
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    try:
        page.goto(f"{served_two}/inspect?sae=tiny&prompt={PROMPT.replace(' ', '+')}")
        page.wait_for_selector("#inspect-strip .tok")
        toks = page.locator("#inspect-strip .tok")

        def rows():
            return page.evaluate("[...document.querySelectorAll('#search-all-table tbody tr[data-sae]')]"
                                 ".map(r => [r.dataset.sae, Number(r.dataset.feature)])")

        def expect(positions):
            want = sorted((w[0], order[saes[w[1]][0]], w[2]) for w in brute_force(lm, saes, ids, positions))
            return [[saes[n][0], f] for _, n, f in want][:SERVE.search_top]

        toks.nth(3).click()
        page.wait_for_function("new URLSearchParams(location.search).get('sel') === '3'")
        page.wait_for_function("document.querySelector('#search-all h3').textContent.includes('token 3')")
        assert rows() == expect([3])
        toks.nth(5).click(modifiers=["Shift"])
        page.wait_for_function("new URLSearchParams(location.search).get('sel') === '3,4,5'")
        page.wait_for_function("document.querySelector('#search-all h3').textContent.includes('3, 4, 5')")
        assert page.evaluate("[...document.querySelectorAll('#inspect-strip .tok.picked')].map(t => t.dataset.pos)") == ["3", "4", "5"]
        got = rows()
        assert got == expect([3, 4, 5]) and {s for s, _ in got} == {"tiny", "relu"}
        toks.nth(7).click(modifiers=["Control"])
        page.wait_for_function("new URLSearchParams(location.search).get('sel') === '3,4,5,7'")
        page.wait_for_function("document.querySelector('#search-all h3').textContent.includes('3, 4, 5, 7')")
        got = rows()
        assert got == expect([3, 4, 5, 7])
        api = httpx.get(f"{served_two}/api/search_all", params={"prompt": PROMPT, "sel": "3,4,5,7"}, timeout=30).json()
        assert [[h["sae_id"], h["feature"]] for h in api["hits"]] == got
        page.reload()
        page.wait_for_selector("#search-all-table")
        assert page.evaluate("[...document.querySelectorAll('#inspect-strip .tok.picked')].map(t => t.dataset.pos)") == ["3", "4", "5", "7"]
        assert rows() == got
        bad = httpx.get(f"{served_two}/inspect", params={"sae": "tiny", "prompt": PROMPT, "sel": "x"}, timeout=30)
        assert bad.status_code == 422 and "separated by commas" in bad.text
        far = httpx.get(f"{served_two}/inspect", params={"sae": "tiny", "prompt": PROMPT, "sel": "99"}, timeout=30)
        assert far.status_code == 200 and "outside the prompt" in far.text
        assert httpx.get(f"{served_two}/api/search_all", params={"prompt": PROMPT}, timeout=30).status_code == 422
    finally:
        page.screenshot(path=str(ARTIFACTS / "inspect_search_all.png"), full_page=True)
        ctx.close()
