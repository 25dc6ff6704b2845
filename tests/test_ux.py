"""Issue 17's page-level fixes, through the in-process ASGI client on real stores: untrusted text isolated and its
control characters shown (item 8), visible spaces in tokens, neighbour chips, explanation-less search, dead ends,
the one worker notice, steering's edit rows, offline /docs. The browser-side halves are in tests/test_browser.py."""

from __future__ import annotations

import html
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from starlette.datastructures import URL

from saescope.precompute.store.explanations import non_activating_contexts
from saescope.app.settings import SERVE
from saescope.app.web.app import create_app
from saescope.app.web.launch import WorkerSupervisor
from saescope.app.web.live_views import explain_request, first_difference
from saescope.app.web.lookups import Pager
from saescope.app.web.templates import ENV
from saescope.app.web.tokens import shown, untrusted, visible
from saescope.app.worker.wire import ExplainOut
from saescope.precompute.explain import ExplainConfig
from saescope.precompute.store import Store
from saescope.precompute.store.write import add_explanations
from tests.conftest import free_port

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: reverses the text after it until the paragraph ends
EVIL = f"{RLO}gnp.exe"


@pytest.fixture(scope="module")
def explained(tmp_path_factory, tiny_store):
    """A copy of the tiny store with hostile explanations (U+202E in the text and in the LLM's name)."""
    path = tmp_path_factory.mktemp("bidi") / "tiny.duckdb"
    shutil.copy(tiny_store, path)
    add_explanations(path, "tiny", [{"feature": 3, "text": f"fires on {EVIL} words", "llm": f"llm{RLO}x",
                                     "prompt_version": "v1", "score_detection": 0.9, "score_fuzzing": 0.8,
                                     "n_scored": 20}], "test")
    return path


@pytest.fixture(scope="module")
def client(explained):
    return TestClient(create_app(explained))


@pytest.fixture(scope="module")
def plain(tiny_store):
    """The tiny store as built: no explanations, one SAE, no worker."""
    return TestClient(create_app(tiny_store))


class Isolation(HTMLParser):
    """Walks a page and records every place untrusted text (RLO raw, or its visible form \\u202e) shows up, with
    whether it sits inside an isolating element: <bdi>, an element with dir="auto", or <title> (not laid out)."""

    VOID = {"input", "br", "meta", "link", "img", "hr", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.raw_text: list[str] = []  # text nodes holding a raw RLO (must stay empty)
        self.unisolated: list[str] = []  # text nodes showing \u202e outside any isolating element
        self.isolated = 0
        self.bad_attrs: list[str] = []  # attributes holding a raw RLO on an element without dir="auto"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if any(v and RLO in v for v in a.values()) and a.get("dir") != "auto":
            self.bad_attrs.append(f"<{tag} {a}>")
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if RLO in data:
            if self.stack and self.stack[-1][0] == "textarea" and self.stack[-1][1].get("dir") == "auto":
                self.isolated += 1  # a prompt box keeps the user's exact text, isolated by dir="auto"
            else:
                self.raw_text.append(data)
        if "\\u202e" in data:
            if any(t in ("bdi", "title") or a.get("dir") == "auto" for t, a in self.stack):
                self.isolated += 1
            else:
                self.unisolated.append(data)


def isolation(text: str) -> Isolation:
    p = Isolation()
    p.feed(text)
    return p


def test_untrusted_text_is_isolated_and_its_controls_shown():
    out = str(untrusted(f"<b>{EVIL}</b>\nline"))
    assert out.startswith('<bdi class="u">') and out.endswith("</bdi>")
    assert RLO not in out and "\\u202e" in out and "&lt;b&gt;" in out and "\nline" in out
    assert shown("a\u200db") == "a\u200db"  # a zero-width joiner (emoji, many scripts) is kept
    assert shown("bell\x07") == "bell\\x07"


@pytest.mark.parametrize("url", [
    "/sae/tiny/list?name={e}&f=3&note={e}",
    "/sae/tiny/search?q={e}",
    "/sae/tiny/search?q={e}&by=explanation",
    "/sae/tiny/search?q=words&by=explanation",
    "/sae/tiny/feature/3",
    "/steer?sae=tiny&prompt={e}&edit=3:add:2",
    "/inspect?sae=tiny&prompt={e}",
    "/sae/tiny/feature/{e}",
    "/sae/{e}",
])
def test_pages_isolate_text_with_a_bidi_override(client, url):
    """Before: a list name, a note, a query, a prompt or an explanation with U+202E reversed the page's own
    sentences after it. Now every such text is inside an isolating element with the override written out."""
    r = client.get(url.format(e=EVIL))
    assert r.status_code in (200, 404, 422), r.status_code
    p = isolation(r.text)
    assert not p.raw_text, p.raw_text  # never emitted as a working control character in the page's text
    assert not p.unisolated, p.unisolated
    assert not p.bad_attrs, p.bad_attrs
    assert p.isolated >= 1  # and the text is there, visibly


def test_visible_marks_spaces_in_chips_and_strips(plain, tiny_store):
    assert visible(" big") == "·big" and visible("  x y") == "··x y" and visible(" ") == "·" and visible("") == "∅"
    with Store(tiny_store) as s:
        f = s.features("tiny", sort="density", desc=True, limit=1)[0]
        logits = [t for t, _ in s.feature("tiny", f.index).logit_pos]
        toks = [t for e in s.examples("tiny", f.index, "top") for t in e.tokens]
        first = s.examples("tiny", f.index, "top")[0]
        shown_toks = first.tokens[max(0, first.pos - SERVE.show_left):first.pos + SERVE.show_right + 1]
    spaced = [t for t in f.top_tokens if t.startswith(" ")]
    assert spaced and any(t.startswith(" ") for t in toks)
    listing = plain.get("/sae/tiny", params={"sort": "density", "order": "desc", "size": 1}).text
    for t in spaced[:8]:  # chips of the feature list
        assert f'<code class="chip">{escape(visible(t))}</code>' in listing and visible(t).startswith("·")
    r = plain.get(f"/sae/tiny/feature/{f.index}")
    for t in logits:  # chips of the logit tables
        assert f'<code class="chip">{escape(visible(t))}</code>' in r.text
    strip = r.text.split('id="top-examples"')[1].split("</li>")[0]
    spaced_shown = [t for t in shown_toks if t.startswith(" ")]
    assert spaced_shown
    for t in spaced_shown:  # and the strips
        assert f">{escape(visible(t))}</span>" in strip


def test_nearest_and_cooccurring_features_carry_top_token_chips(plain, tiny_store):
    with Store(tiny_store) as s:
        f = s.feature("tiny", s.features("tiny", sort="density", desc=True, limit=1)[0].index)
        near = {j: s.feature("tiny", j) for j, _ in f.neighbours + f.cooc}
    r = plain.get(f"/sae/tiny/feature/{f.index}")
    section = r.text.split('id="neighbours"')[1].split('id="provenance"')[0]
    for j, g in near.items():
        li = re.search(rf'<li><a href="/sae/tiny/feature/{j}">{j}</a>(.*?)</li>', section, re.S)
        assert li, j
        if g.n_active and g.top_tokens:
            chips = re.findall(r'<code class="chip">(.*?)</code>', li.group(1))
            assert chips == [str(escape(visible(t))) for t in g.top_tokens[:4]]
        else:
            assert "dead" in li.group(1)


def test_feature_page_has_an_in_page_navigation_and_folded_samples(plain):
    r = plain.get("/sae/tiny/feature/3?samples=interval")
    toc = re.search(r'<nav class="toc" id="toc".*?</nav>', r.text, re.S).group(0)
    targets = re.findall(r'href="#([\w-]+)"', toc)
    assert {"explanations", "examples", "samples", "try", "steer", "neighbours", "provenance"} <= set(targets)
    for t in targets:
        assert f'id="{t}"' in r.text, t
    assert r.text.count('<details class="group">') >= 1 and '<details class="group" open' not in r.text


def test_search_without_explanations_says_how_to_get_them(plain, client):
    from saescope.app.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    r = plain.get("/sae/tiny/search", params={"q": "qqqzzzxxy"})
    note = re.search(r'<p class="notice" id="no-explanations">(.*?)</p>', r.text, re.S)
    assert note, r.text[-2000:]
    named = set(re.findall(r"saescope ([a-z-]+)", note.group(1)))
    assert {"explain", "import-explanations"} <= named <= commands
    assert "<table" not in r.text.split('id="results"')[1]  # no empty result table to dead-end in
    # a store with explanations searches them instead
    r = client.get("/sae/tiny/search", params={"q": "words", "by": "explanation"})
    assert 'id="no-explanations"' not in r.text and "/sae/tiny/feature/3" in r.text.split('id="results"')[1]


def test_score_columns_and_filters_show_only_when_something_is_scored(plain, client):
    bare = plain.get("/sae/tiny").text
    assert 'name="min_score"' not in bare and "sort=score" not in bare and '<option value="score"' not in bare
    scored = client.get("/sae/tiny").text
    assert 'name="min_score"' in scored and "sort=score" in scored and '<option value="score"' in scored


@pytest.mark.parametrize("tail, near, how", [("abc", 0, "first"), ("99999", None, "nearest"), ("-3", 0, "nearest")])
def test_a_feature_url_that_names_no_feature_links_to_the_nearest_one(plain, tiny_store, tail, near, how):
    with Store(tiny_store) as s:
        d_sae = s.sae("tiny").d_sae
    near = d_sae - 1 if near is None else near
    r = plain.get(f"/sae/tiny/feature/{tail}")
    assert r.status_code in (404, 422)
    links = dict((h, t) for h, t in re.findall(r'<a href="([^"]+)" class="way-back">([^<]+)</a>', r.text))
    assert links.get("/sae/tiny") == "browse tiny"
    assert links.get(f"/sae/tiny/feature/{near}") == f"feature {near}, the {how} that exists"
    assert plain.get(f"/sae/tiny/feature/{near}").status_code == 200  # and it leads somewhere
    assert r.text.count('href="/"') == 2  # the brand and "all SAEs" once, not twice


def test_one_sae_store_shows_no_compare_link(plain):
    r = plain.get("/sae/tiny")
    assert "/compare/" not in r.text


def test_a_page_past_the_end_renders_empty_with_a_link_to_the_last(plain):
    tmpl = ENV.get_template("_macros.html").make_module({})
    here = URL("http://x/sae/tiny/search?q=the&page=9&size=10")
    out = str(tmpl.pagination(Pager(9, 10, 25), None, None, "#results", here))
    assert "page 9 is past the end: the 25 results fill 3 pages" in out
    link = re.search(r'href="([^"]+)" rel="last"', out).group(1)
    assert parse_qs(urlparse(html.unescape(link)).query) == {"q": ["the"], "page": ["3"], "size": ["10"]}
    assert "past the end" not in str(tmpl.pagination(Pager(3, 10, 25), "/p2", None, "#results", here))


def test_the_worker_notice_appears_once_and_polls(tiny_store):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = TestClient(create_app(tiny_store, worker_url=dead))
    for url in ("/inspect?sae=tiny&prompt=hello", "/steer?sae=tiny&prompt=hello&edit=3:add:2"):
        r = c.get(url)
        assert r.text.count("model worker is unavailable") == 1, url
        notice = re.search(r'<div id="worker-status"[^>]*>', r.text).group(0)
        assert 'hx-get="/live/status"' in notice and 'hx-trigger="every 2s"' in notice
        assert 'worker-up[' in r.text  # the form re-runs itself when the worker is back
    frag = c.get("/live/status")
    assert frag.text.count("model worker is unavailable") == 1 and "HX-Trigger" not in frag.headers
    # htmx asking for the result of a live page gets the notice as an out-of-band swap, not a second copy
    r = c.get("/inspect?sae=tiny&prompt=hello", headers={"HX-Request": "true"})
    assert r.text.count("model worker is unavailable") == 1 and 'hx-swap-oob="true"' in r.text
    # --no-worker: said once, and nothing to poll for
    r = TestClient(create_app(tiny_store)).get("/live/status")
    assert "--no-worker" in r.text and "hx-get" not in r.text


def test_the_supervisor_names_the_real_cause(tiny_store):
    sup = WorkerSupervisor(tiny_store, "127.0.0.1", free_port())  # not started: its reasoning only
    sup._tail.extend(["12:00:00 INFO saescope.app.worker.batcher: batch of 4", 'INFO:  127.0.0.1 - "GET /health" 200'])
    assert sup._exit_reason(-9) == ("the worker process ended (killed by signal 9, SIGKILL: out of memory, or "
                                    "kill -9)")  # no random log line as the "reason"
    sup._tail.extend(["error: could not load model 'models/x'", "12:00:01 INFO x: bye"])
    assert sup._exit_reason(2) == "the worker process ended (exit code 2): could not load model 'models/x'"
    sup._tail.append("RuntimeError: CUDA out of memory")
    assert sup._exit_reason(1).endswith(": RuntimeError: CUDA out of memory")
    sup.last_exit = sup._exit_reason(-9)
    sup.load_s = 7.0
    assert re.search(r"restarting, about \d+ s", sup.reason())


def test_steer_page_has_structured_edit_rows_with_chips(plain, tiny_store):
    with Store(tiny_store) as s:
        f = s.features("tiny", sort="density", desc=True, limit=1)[0]
    r = plain.get("/steer", params=[("sae", "tiny"), ("prompt", "hi"), ("edit", f"{f.index}:clamp:1.5"),
                                    ("edit", "7:ablate")])
    rows = re.findall(r'<div class="edit-row">(.*?)</div>', r.text, re.S)
    assert len(rows) == 2
    assert f'name="edit" value="{f.index}:clamp:1.5"' in rows[0] and 'class="e-feature"' in rows[0]
    assert re.search(r"<option selected>clamp</option>", rows[0]) and re.search(r"<option selected>ablate</option>", rows[1])
    chips = re.findall(r'<code class="chip">(.*?)</code>', rows[0].split('class="e-chips"')[1])
    assert chips == [str(escape(visible(t))) for t in f.top_tokens[:6]]
    assert 'id="add-edit"' in r.text and 'href="/steer"' in r.text  # "+ edit", and steering in the header
    frag = plain.get(f"/sae/tiny/feature/{f.index}/chips")  # what a new row fetches
    assert re.findall(r'<code class="chip">(.*?)</code>', frag.text) == chips
    assert plain.get("/sae/tiny/feature/999999/chips").status_code == 404


def test_first_difference():
    assert first_difference(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_difference(["a", "b"], ["a", "b"]) is None
    assert first_difference(["a"], ["a", "b"]) == 1


def test_explain_offers_scoring_and_says_the_model_is_tiny(tiny_store):
    with Store(tiny_store) as s:
        f = s.features("tiny", sort="density", desc=True, limit=1)[0].index
        body = explain_request(s, "tiny", f, score=True)
        plain_body = explain_request(s, "tiny", f)
        provable = non_activating_contexts(s, "tiny", f, min(ExplainConfig().n_test, 64))
    assert body.score and body.non_activating == provable and not plain_body.score and not plain_body.non_activating
    assert body.max_tokens == ExplainConfig().explain_max_tokens  # the CLI's budget: a whole sentence
    out = ExplainOut(explanation=f"words {EVIL}", parsed=True, llm="SmolLM2-135M-Instruct", prompt_version="v1",
                     n_examples=10, seconds=9.5)
    macros = ENV.get_template("_explanation.html").module
    got = str(macros.live_result(out, None, "tiny", f, f"saescope explain STORE --sae tiny --features {f}"))
    assert "tiny model" in got and 'id="explain-score"' in got and '"score": "true"' in html.unescape(got)
    assert f"saescope explain STORE --sae tiny --features {f}" in got
    assert not isolation(got).raw_text and not isolation(got).unisolated


def test_docs_are_served_without_a_cdn(plain):
    r = plain.get("/docs")
    assert r.status_code == 200
    srcs = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
    assert srcs and not [s for s in srcs if s.startswith(("http:", "https:", "//"))], srcs
    for s in re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text):
        a = plain.get(s)
        assert a.status_code == 200 and len(a.content) > 100, s
    assert plain.get("/openapi.json").json()["info"]["title"] == "saescope"
