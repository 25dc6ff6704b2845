"""`saescope export --format html`: a self-contained folder that a real Chromium opens from file:// with no request
leaving the folder, every link relative and present, and hostile token strings (in the store's vocabulary, in check
texts, in a diff's examples) shown as text, never run."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import duckdb
import pytest

from saescope.precompute.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
EVIL = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "<style>body{display:none}</style>",
        "javascript:alert(1)", "<a href='http://example.com/'>x</a>"]


@pytest.fixture(scope="module")
def hostile_store(tiny_store, tmp_path_factory) -> tuple[Path, list[int]]:
    """A copy of the tiny store whose vocabulary holds hostile strings at feature 3's top example."""
    copy = tmp_path_factory.mktemp("hostile_report") / "h.duckdb"
    shutil.copyfile(tiny_store, copy)
    with Store(tiny_store) as s:
        ex = s.examples("tiny", 3, "top")[0]
        key = s.sae("tiny").model_key
    ids = ex.token_ids[max(1, ex.pos - len(EVIL) + 1):ex.pos + 1]
    con = duckdb.connect(str(copy))
    for tid, s_ in zip(reversed(ids), EVIL):
        con.execute("UPDATE vocab SET token = ? WHERE model_key = ? AND token_id = ?", [s_, key, tid])
    con.close()
    return copy, ids


@pytest.fixture(scope="module")
def report(hostile_store, tmp_path_factory):
    """Export features 3 and 5 plus a check run (hostile texts) and a diff (hostile tokens in an example)."""
    from saescope.app.web.report import export_html
    from saescope.precompute.checks.report import write_json
    from saescope.precompute.checks.run import run_checks

    store, _ = hostile_store
    root = tmp_path_factory.mktemp("report_src")
    toml = root / "evil.toml"
    toml.write_text(textwrap.dedent(f"""
    [sets.evil]
    texts = {json.dumps(EVIL)}

    [[check]]
    name = {json.dumps(EVIL[1])}
    kind = "monitor"
    features = {list(range(96))}
    threshold = 0
    texts = "evil"
    max_pct = 0
    """))
    run = run_checks(toml, store, progress=False)
    write_json(run, root / "evil.json")
    # a diff folder whose example tokens are hostile (as a tokenizer might decode them)
    diff = root / "evil-diff"
    diff.mkdir()
    examples = {"3": [{"ctx": 0, "pos": 1, "diff": 1.0, "tokens": EVIL[:3], "token_ids": [0, 1, 2],
                       "acts_a": [0.0, 1.0, 0.0], "acts_b": [0.0, 2.0, 0.5]}]}
    (diff / "examples.json").write_text(json.dumps(examples))
    with Store(store) as s:
        sae = s.sae("tiny")
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from saescope.precompute.diff import FEATURE_COLUMNS

    d = sae.d_sae
    cols = {c: np.zeros(d) for c in FEATURE_COLUMNS}
    cols["feature"] = np.arange(d)
    cols["score"][3] = 1.0
    t = pa.table(cols)
    pq.write_table(t, diff / "features.parquet")
    pcsv.write_csv(t, diff / "features.csv")
    meta = {"saescope_version": "x", "created": "now", "model_a": {"path": EVIL[0], "name": EVIL[0], "sha256": None},
            "model_b": {"path": EVIL[1], "name": EVIL[1], "sha256": None},
            "sae": {"path": sae.sae_path, "hook": sae.hook, "d_sae": d, "sha256": None}, "dataset": EVIL[2],
            "n_tokens": 3, "n_counted": 3, "quality": {"a": {"mse": 0.1, "explained_variance": 0.9},
                                                        "b": {"mse": 0.5, "explained_variance": 0.2}},
            "warnings": [EVIL[0]], "score": "s", "up": [3], "down": []}
    (diff / "diff.json").write_text(json.dumps(meta))
    out = tmp_path_factory.mktemp("report_out") / "report"
    r = export_html(store, out, "tiny", features=[3, 5], checks=[root / "evil.json"], diff=diff, list_name=EVIL[0])
    return out, r


def test_report_folder_is_self_contained(report):
    out, r = report
    files = sorted(p.name for p in out.iterdir())
    assert {"index.html", "feature-3.html", "feature-5.html", "checks-evil.html", "diff-evil-diff.html"} <= set(files)
    assert r["features"] == 2 and r["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    for p in out.glob("*.html"):
        html = p.read_text()
        assert "<script" not in html and "<link" not in html, p.name  # inline CSS, no scripts at all
        for ref in re.findall(r'(?:href|src)="([^"]*)"', html):
            assert not re.match(r"^(?:[a-z]+:|/)", ref), (p.name, ref)  # relative only
            assert (out / ref.split("#")[0]).is_file(), (p.name, ref)
    idx = (out / "index.html").read_text()
    assert "verified" in idx and 'href="feature-3.html"' in idx and 'href="checks-evil.html"' in idx


@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_offline_in_chromium_and_hostile_strings_stay_inert(report, browser):
    out, _ = report
    assert os.path.exists(CHROMIUM), "install Debian's chromium for the browser tests"
    requests, left, dialogs = [], [], []
    if True:  # the session's Chromium (conftest.browser); a context of its own
        ctx = browser.new_context()

        def guard(route):
            url = route.request.url
            requests.append(url)
            if url.startswith(out.resolve().as_uri() + "/"):
                route.continue_()
            else:
                left.append(url)
                route.abort()
        ctx.route("**/*", guard)
        page = ctx.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        for name in ("index.html", "feature-3.html", "feature-5.html", "checks-evil.html", "diff-evil-diff.html"):
            page.goto((out / name).resolve().as_uri())
            page.wait_for_load_state("load")
            assert page.locator("img").count() == 0 and page.locator("main script, main style").count() == 0, name
            assert page.evaluate("document.querySelectorAll('a[href^=\"http\"]').length") == 0, name
            text = page.inner_text("body")
            if name in ("feature-3.html", "checks-evil.html", "diff-evil-diff.html"):
                assert "<script>alert(1)</script>" in text, name  # shown as text
            if name in ("checks-evil.html", "diff-evil-diff.html"):
                assert '"><img src=x onerror=alert(1)>' in text, name
            # the page is styled by its inlined CSS (no stylesheet request needed)
            assert page.evaluate("getComputedStyle(document.querySelector('header.top')).display") != "none"
        # hovering an active token shows its tip from CSS alone
        page.goto((out / "feature-3.html").resolve().as_uri())
        tok = page.locator("#top-examples .tok.on").first
        tok.hover()
        assert "→" in page.evaluate("e => getComputedStyle(e, '::after').content", tok.element_handle())
        ctx.close()
    assert dialogs == []
    assert left == [], left
    assert requests and all(u.startswith("file://") for u in requests)
