"""LLM explanations: delphi-style prompts, real chat backends (local SmolLM2 and HTTP), detection/fuzzing, BM25.

No mock LLM: the local backend is the embedded SmolLM2-135M-Instruct; the HTTP backend talks to a real uvicorn
server on a free port serving that model through make_chat_router. The tiny model cannot judge: asked about 5
snippets it answers "[1,1,1,1,1,1,1,1,1,1..." (measured: detection on a known " the" feature gave balanced
accuracy 0.5 with every answer 1, fuzzing 40/40 unparsable), so the correct-beats-wrong check on a synthetic
one-token feature uses RuleJudge: a second, rule-based ChatBackend that reads the explanation and the snippets
from the prompt text and decides by string matching. Expected scores are derived independently.
"""

from __future__ import annotations

import json
import math
import random
import re
import time

import httpx
import numpy as np
import pytest
import torch

from saescope.precompute.config import LIMITS
from saescope.precompute.explain import (
    PROMPT_VERSION,
    ChatBackend,
    Completion,
    Example,
    ExplainConfig,
    FeatureMaterial,
    LLMError,
    LocalChatBackend,
    OpenAIChatBackend,
    detection_score,
    explain_features,
    fuzzing_score,
    material_from_contexts,
    score_explanation,
    split_material,
)
from saescope.precompute.explain.prompts import (
    active_mask,
    explainer_messages,
    parse_explanation,
    parse_judgements,
    render,
    window,
)
from saescope.precompute.explain.scoring import Judgement, balanced_accuracy
from saescope.precompute.store.search import BM25Index, highlight, terms
from tests.conftest import free_port, serve_in_thread

SMALL = ExplainConfig(n_top=3, per_group_explain=1, n_test=8, left=8, right=2, explain_max_tokens=24, n_per_prompt=2)


# ---------------------------------------------------------------------------------------------------------------
# shared material


@pytest.fixture(scope="module")
def local(default_model_dir) -> LocalChatBackend:
    return LocalChatBackend(default_model_dir)


@pytest.fixture(scope="module")
def corpus_tokens(local) -> tuple[list[list[str]], list[list[int]]]:
    """48-token contexts of the demo corpus as token strings (real SmolLM2 tokenization), and their ids."""
    from saescope.precompute.data import demo_corpus
    from saescope.precompute.tokens import token_strings

    tok = local.tokenizer
    strs = token_strings(tok)
    ids: list[int] = []
    with demo_corpus().open() as f:
        for _, line in zip(range(200), f):
            ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    ctx = [ids[i:i + 48] for i in range(0, len(ids) - 48, 48)]
    return [[strs[i] for i in c] for c in ctx], ctx


def the_feature(contexts: list[list[str]]) -> tuple[list[Example], list[list[str]]]:
    """A synthetic feature whose rule is known: 1.0 exactly on the token " the", 0 elsewhere. Non-activating
    contexts are those without "the" in any spelling (so no honest judge could call them positive)."""
    acts = [Example(c, [1.0 if t == " the" else 0.0 for t in c]) for c in contexts]
    activating = [ex for ex in acts if ex.max_act > 0]
    clean = [c for c in contexts if not re.search(r"the", "".join(c), re.IGNORECASE)]
    return activating, clean


class RuleJudge(ChatBackend):
    """A rule-based judge and explainer that reads only the prompt text (an alternative backend, not a mock).

    Explainer prompts: names the most frequent marked span of the last message. Scoring prompts: takes the
    quoted words of the "Feature description:" line; detection says 1 when a snippet contains one of them as a
    whole word, fuzzing says 1 when every marked word is one of them. No quoted word: an answer it can't give."""

    name = "rule-judge"

    def chat_batch(self, conversations, max_tokens):
        return [Completion(self._answer(c)) for c in conversations]

    def _answer(self, messages) -> str:
        last = messages[-1]["content"]
        m = re.search(r"^Feature description: (.*)$", last, re.MULTILINE)
        if m is None:
            spans = re.findall(r"<<(.*?)>>", last)
            word = max(set(spans), key=spans.count).strip() if spans else "?"
            return f'Looking at the marks.\n[EXPLANATION]: The word "{word}".'
        words = {w.lower() for w in re.findall(r'"([^"]+)"', m.group(1))}
        if not words:
            return "I am not sure what to say."
        snippets = re.findall(r"^Example \d+: (.*)$", last, re.MULTILINE)
        fuzzing = "<<" in messages[0]["content"]
        out = []
        for s in snippets:
            if fuzzing:
                marked = [w.lower() for span in re.findall(r"<<(.*?)>>", s) for w in re.findall(r"\w+", span)]
                out.append(int(bool(marked) and all(w in words for w in marked)))
            else:
                out.append(int(any(w in words for w in re.findall(r"\w+", s.lower()))))
        return "[" + ", ".join(map(str, out)) + "]"


# ---------------------------------------------------------------------------------------------------------------
# prompts and parsing


def test_explainer_prompt_uses_only_the_explain_share(corpus_tokens):
    contexts, _ = corpus_tokens
    activating, clean = the_feature(contexts)
    rng = random.Random(0)
    groups = [rng.sample(activating[10:], 5) for _ in range(4)]
    groups[1].append(activating[0])  # a context that is also a top example must not be scored
    material = FeatureMaterial(top=activating[:6], quantiles=groups, non_activating=clean)
    cfg = ExplainConfig(n_top=6, per_group_explain=1, left=10, right=3)
    split = split_material(material, cfg, seed=3)
    prompt = explainer_messages(split.explain, cfg)[-1]["content"]

    explain_keys = {ex.tokens for ex in split.explain}
    assert len(split.explain) == 6 + 4
    assert activating[0].tokens not in {ex.tokens for ex in split.test}
    assert not explain_keys & {ex.tokens for ex in split.test}
    for ex in split.explain:  # each shown example appears, marked delphi-style
        w = window(ex, cfg.left, cfg.right)
        assert render(w.tokens, active_mask(w, cfg.threshold)) in prompt
    for ex in split.test:  # no held-out example appears, in any form
        w = window(ex, cfg.left, cfg.right)
        assert render(w.tokens, active_mask(w, cfg.threshold)) not in prompt
        assert render(w.tokens) not in prompt.replace("<<", "").replace(">>", "")
    assert prompt.count("Example ") == len(split.explain)
    assert prompt.count('Activations: (" the", 10)') >= len(split.explain)  # all acts 1.0 -> strength 10
    assert all(not re.search("the", "".join(c), re.I) for c in split.non_activating)
    # deterministic for a seed; another seed picks other quantile examples
    assert split_material(material, cfg, seed=3) == split
    assert split_material(material, cfg, seed=4).explain != split.explain


def test_render_marks_runs_and_keeps_one_line():
    toks = ["<|im_start|>", "x", " = ", "a", " <<", " b", "\n", "<s>", "end"]
    assert render(toks, [0, 0, 1, 1, 0, 1, 1, 0, 0]) == "x<< = a>> <<<< b\\n>>end"
    assert "\n" not in render(toks) and "im_start" not in render(toks)  # no new line, no chat-turn token


def test_material_from_contexts_groups_by_rank():
    ctx = [[f"t{i}", f"u{i}"] for i in range(30)]
    acts = [[0.0, float(i % 15)] for i in range(30)]  # 28 activating contexts, 2 all-zero
    m = material_from_contexts(ctx, acts, n_top=4, n_groups=3, per_group=2, seed=0)
    assert [ex.max_act for ex in m.top] == [14.0, 14.0, 13.0, 13.0]
    assert [len(g) for g in m.quantiles] == [2, 2, 2]
    assert min(ex.max_act for ex in m.quantiles[0]) >= max(ex.max_act for ex in m.quantiles[2])
    assert m.non_activating == [["t0", "u0"], ["t15", "u15"]]
    with pytest.raises(ValueError, match="one activation per token"):
        Example(["a", "b"], [1.0])


@pytest.mark.parametrize("answer, n, expected", [
    ("[1,0,1]", 3, [True, False, True]),
    ("Sure! Here it is: [1, 0, 0]\nHope that helps", 3, [True, False, False]),
    ("[True, false, 'yes']", 3, [True, False, True]),
    ("[1,0] and later [0,1,1]", 3, [False, True, True]),  # the first list of the right length wins
    ("Example 0: 1\nExample 1: 0\nExample 2: 1", 3, [True, False, True]),
    ("answers: 1 0 0 1", 4, [True, False, False, True]),
    ("[1,0,1,1,1,1,1]", 3, [None, None, None]),  # too many: junk, not truncated
    ("[1,1,1,1,1,1,1,1,1,1", 5, [None] * 5),  # what SmolLM2-135M really answers to a 5-snippet prompt
    ("I think the feature is about cats.", 2, [None, None]),
    ("", 1, [None]),
    ("[2, 0]", 2, [None, None]),
])
def test_parse_judgements_is_lenient_and_never_guesses(answer, n, expected):
    assert parse_judgements(answer, n) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Step 1 ...\n[EXPLANATION]: Units of time after a number.", ("Units of time after a number.", True)),
    ('[EXPLANATION]: "The word <<the>>"\nmore', ("The word the", True)),
    ("explanation: code comments", ("code comments", True)),
    ("  \n\nThe word dog\nanother line", ("The word dog", False)),
    ("", ("", False)),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


# ---------------------------------------------------------------------------------------------------------------
# scoring arithmetic and the known-rule feature


def test_balanced_accuracy_equals_confusion_matrix_count():
    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.4
    pred = np.where(rng.random(200) < 0.7, truth, ~truth)
    parsed = rng.random(200) < 0.85
    js = [Judgement("x", bool(t), 0, bool(p) if ok else None) for t, p, ok in zip(truth, pred, parsed)]
    r = balanced_accuracy(js, "detection")
    t, p = truth[parsed], pred[parsed]
    cm = np.zeros((2, 2))  # rows: truth 0/1, cols: prediction 0/1
    np.add.at(cm, (t.astype(int), p.astype(int)), 1)
    tpr, tnr = cm[1, 1] / cm[1].sum(), cm[0, 0] / cm[0].sum()
    assert r.n_examples == 200 and r.n_judged == parsed.sum() and r.n_unparsable == 200 - parsed.sum()
    assert (r.n_activating, r.n_non_activating) == (cm[1].sum(), cm[0].sum())
    assert r.activating_accuracy == pytest.approx(tpr) and r.non_activating_accuracy == pytest.approx(tnr)
    assert r.balanced_accuracy == pytest.approx((tpr + tnr) / 2)
    always_yes = balanced_accuracy([Judgement("x", bool(t), 0, True) for t in truth], "detection")
    assert always_yes.balanced_accuracy == 0.5  # chance looks like chance
    one_class = balanced_accuracy([Judgement("x", True, 0, True)], "detection")
    assert one_class.balanced_accuracy is None


def test_known_rule_feature_correct_explanation_beats_wrong(corpus_tokens):
    contexts, _ = corpus_tokens
    activating, clean = the_feature(contexts)
    judge = RuleJudge()
    test = activating[:30]
    for fn in (detection_score, fuzzing_score):
        right = fn(judge, 'The word "the".', test, clean, seed=0)
        wrong = fn(judge, 'The word "zebra".', test, clean, seed=0)
        assert right.n_examples == right.n_judged == 60 and right.n_unparsable == 0
        assert right.balanced_accuracy == 1.0  # the rule is exactly the feature
        assert (wrong.activating_accuracy, wrong.non_activating_accuracy, wrong.balanced_accuracy) == (0.0, 1.0, 0.5)
        junk = fn(judge, "something vague", test, clean, seed=0)  # the judge cannot answer: all unparsable
        assert junk.n_unparsable == junk.n_examples == 60 and junk.balanced_accuracy is None
        again = fn(judge, 'The word "the".', test, clean, seed=0)
        assert again.judgements == right.judgements  # deterministic for a seed
        assert fn(judge, 'The word "the".', test, clean, seed=1).judgements != right.judgements


def test_partial_explanation_score_equals_hand_count(corpus_tokens):
    """'"the" or "is"': activating snippets are all caught; a non-activating one is a false positive exactly when
    the word "is" occurs in it. Count that from the snippet texts and compare with the scorer's arithmetic."""
    contexts, _ = corpus_tokens
    activating, clean = the_feature(contexts)
    r = detection_score(RuleJudge(), 'The words "the" or "is".', activating[:20], clean, seed=5)
    negatives = [j.text for j in r.judgements if not j.activating]
    false_pos = sum(bool(re.search(r"\bis\b", t, re.IGNORECASE)) for t in negatives)
    assert 0 < false_pos < len(negatives)  # the case is informative
    assert r.activating_accuracy == 1.0
    assert r.non_activating_accuracy == pytest.approx(1 - false_pos / len(negatives))
    assert r.balanced_accuracy == pytest.approx((1 + 1 - false_pos / len(negatives)) / 2)
    # fuzzing marks: activating snippets mark exactly the " the" tokens; the wrong ones mark k tokens
    f = fuzzing_score(RuleJudge(), 'The word "the".', activating[:20], clean, seed=5)
    for j in f.judgements:
        spans = re.findall(r"<<(.*?)>>", j.text)
        if j.activating:
            assert spans and all(set(s.split()) == {"the"} for s in spans)
    cfg = ExplainConfig()
    k = math.ceil(np.mean([sum(active_mask(window(ex, cfg.left, cfg.right), cfg.threshold)) for ex in activating[:20]]))
    wrong_marked = [j.text.count("<<") for j in f.judgements if not j.activating]
    assert all(1 <= n <= k for n in wrong_marked)  # adjacent marks merge into one span, so <= k
    assert f.balanced_accuracy == 1.0


def test_rule_explainer_and_held_out_scoring_round_trip(corpus_tokens):
    contexts, _ = corpus_tokens
    activating, clean = the_feature(contexts)
    groups = [activating[10 + 6 * g: 16 + 6 * g] for g in range(4)]
    material = FeatureMaterial(top=activating[:10], quantiles=groups, non_activating=clean)
    (text, prov), = explain_features(RuleJudge(), [material])
    assert text == 'The word "the".' and prov["parsed"] and prov["prompt_version"] == PROMPT_VERSION
    assert prov["llm"] == "rule-judge" and prov["n_examples"] == 14 and re.match(r"\d{4}-\d\d-\d\dT", prov["date"])
    scores = score_explanation(RuleJudge(), text, material)
    assert scores["detection"].n_activating == 4 * 5 and scores["detection"].balanced_accuracy == 1.0
    assert scores["fuzzing"].balanced_accuracy == 1.0
    dead = FeatureMaterial(top=[Example([" a"], [0.0])], non_activating=clean)
    (text2, prov2), = explain_features(RuleJudge(), [dead])
    assert text2 == "" and not prov2["parsed"] and "nothing to explain" in prov2["error"]
    with pytest.raises(ValueError, match="unknown scoring method 'simulation'"):
        score_explanation(RuleJudge(), text, material, methods=["simulation"])
    with pytest.raises(ValueError, match="non-activating"):
        detection_score(RuleJudge(), text, activating[:3], [])


# ---------------------------------------------------------------------------------------------------------------
# BM25


def brute_bm25(docs: list[str], query: str, k1: float = 1.2, b: float = 0.75) -> list[float]:
    toks = [re.findall(r"[a-z0-9]+", d.lower()) for d in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    out = []
    for d in toks:
        s = 0.0
        for q in dict.fromkeys(re.findall(r"[a-z0-9]+", query.lower())):
            n = sum(q in t for t in toks)
            tf = d.count(q)
            if tf:
                idf = math.log(1 + (len(toks) - n + 0.5) / (n + 0.5))
                s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def test_bm25_equals_formula_and_ranks_matches_first():
    docs = ["Python keywords such as def and class", "the word the", "closing parenthesis of a function call",
            "function definitions in Python code: def", "numbers", "the the the def def", "unrelated text about cats"]
    idx = BM25Index(docs)
    for q in ["python def", "the", "function call", "cats dogs", "zzz"]:
        np.testing.assert_allclose(idx.scores(q), brute_bm25(docs, q), rtol=1e-12)
    hits = idx.search("Python def")
    assert [h.index for h in hits][:2] == [3, 0] or [h.index for h in hits][:2] == [0, 3]
    assert {h.index for h in hits} == {0, 3, 5}  # every doc with a query term, none without
    assert hits[-1].index == 5 and hits[-1].matched == ("def",)
    assert all(h.matched == ("python", "def") for h in hits[:2])
    assert idx.search("zzz") == [] and len(idx.search("the def", limit=1)) == 1


def test_highlight_segments_rebuild_the_text_and_carry_no_markup():
    text = 'Python <b>"def"</b> statements; PYTHON_code & defs'
    segs = highlight(text, "python def")
    assert "".join(s for s, _ in segs) == text
    assert [s for s, on in segs if on] == ["Python", "def", "PYTHON"]
    assert terms("Café-au-lait x_y") == ["café", "au", "lait", "x", "y"]


# ---------------------------------------------------------------------------------------------------------------
# the real local backend


def test_prefix_cache_gives_the_same_answer_as_plain_generate(local):
    messages = [{"role": "system", "content": "You name the animal in a sentence. Answer with one word only."},
                {"role": "user", "content": "The dog barked at the postman."}, {"role": "assistant", "content": "dog"},
                {"role": "user", "content": "A cat sat on the mat."}]
    got = local.chat_batch([messages, messages], 6)  # the second reuses the cached prefix
    ids = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = local.tokenizer(ids, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        ref = local.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=2)
    text = local.tokenizer.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert got[0].text == got[1].text == text and text
    assert len(local._caches) >= 1  # the prefix was cached
    assert got[0].prompt_tokens == enc["input_ids"].shape[1] == local.prompt_tokens(messages)


@pytest.mark.slow  # generates with the 135M default model: the longest in-process test
def test_local_model_explains_two_real_sae_features(local, corpus_tokens):
    """Activations of the committed demo SAE on demo-corpus contexts, computed here; two features explained."""
    from saescope.precompute.config import EMBEDDED
    from saescope.precompute.data import bos_id
    from saescope.precompute.models import HookedLM
    from saescope.precompute.saes import load_sae

    contexts, ids = corpus_tokens
    sae = load_sae(EMBEDDED.sae_dir)
    lm = HookedLM(local.model, local.tokenizer, "default", "cpu")
    bos = bos_id(local.tokenizer)
    batch = torch.tensor([[bos] + c[:23] for c in ids[:24]])  # (24, 24) with BOS, as the SAE was trained
    with torch.no_grad():
        z = sae.encode(lm.activations(batch, sae.cfg.hook_name))  # (24, 24, 4096)
    z[:, 0] = 0  # BOS never counts
    toks = [[local.tokenizer.bos_token] + c[:23] for c in contexts[:24]]
    active_ctx = (z.amax(1) > 0).sum(0)  # (4096,) contexts where each feature fires
    order = torch.argsort(active_ctx, descending=True, stable=True).tolist()
    features = [f for f in order if 8 <= active_ctx[f] <= 20][:2]
    assert len(features) == 2
    materials = [material_from_contexts(toks, z[:, :, f].tolist(), n_top=3, n_groups=2, per_group=3)
                 for f in features]
    t0 = time.perf_counter()
    out = explain_features(local, materials, SMALL)
    elapsed = time.perf_counter() - t0
    for (text, prov), m in zip(out, materials):
        assert text.strip(), prov
        assert prov["llm"] == "local:smollm2-135m-instruct" and prov["prompt_version"] == PROMPT_VERSION
        assert prov["n_examples"] == 3 + 2
        print(f"explanation: {text!r} parsed={prov['parsed']}")
    print(f"local explain: {elapsed / 2:.1f} s per feature")


# ---------------------------------------------------------------------------------------------------------------
# the HTTP backend against a real OpenAI-compatible server


@pytest.fixture(scope="module")
def server(local):
    from fastapi import FastAPI

    from saescope.app.worker.chat import make_chat_router

    app = FastAPI()
    app.include_router(make_chat_router(local, model_name="smollm2", api_key="sk-test"))
    with serve_in_thread(app) as url:
        yield url


def test_http_backend_round_trip(server, local):
    conv = [{"role": "user", "content": "Name one colour."}]
    conv2 = [{"role": "user", "content": "Say hello."}]
    with OpenAIChatBackend(f"{server}/v1/", "smollm2", api_key="sk-test", max_concurrency=2) as http:
        http.check()
        assert http.list_models() == ["smollm2"]
        got = http.chat_batch([conv, conv2, conv], 8)
        want = local.chat_batch([conv, conv2], 8)
        assert [c.text for c in got] == [want[0].text, want[1].text, want[0].text]  # order kept, same text
        assert got[0].prompt_tokens == want[0].prompt_tokens and got[0].finish_reason == want[0].finish_reason
        # the raw wire format is OpenAI's
        raw = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                         json={"model": "smollm2", "messages": conv, "max_tokens": 8, "temperature": 0.7}).json()
        assert raw["object"] == "chat.completion" and raw["choices"][0]["message"]["role"] == "assistant"
        assert raw["usage"]["total_tokens"] == raw["usage"]["prompt_tokens"] + raw["usage"]["completion_tokens"]
    with pytest.raises(LLMError, match="HTTP 401.*API key"):
        OpenAIChatBackend(f"{server}/v1", "smollm2", api_key="wrong").complete(conv, 4)
    with pytest.raises(LLMError, match="model 'gpt-9' not found"):
        OpenAIChatBackend(f"{server}/v1", "gpt-9", api_key="sk-test").complete(conv, 4)
    with pytest.raises(LLMError, match="has no model 'gpt-9'; it serves: smollm2"):
        OpenAIChatBackend(f"{server}/v1", "gpt-9", api_key="sk-test").check()
    with pytest.raises(LLMError, match="does not exist.*usually ends in /v1"):
        OpenAIChatBackend(server, "smollm2", api_key="sk-test").complete(conv, 4)
    with pytest.raises(LLMError, match="could not reach"):
        OpenAIChatBackend(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=2).complete(conv, 4)
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                   json={"model": "smollm2", "messages": conv, "max_tokens": 5000})
    assert r.status_code == 400 and f"the limit is {LIMITS.max_chat_tokens}" in r.json()["error"]["message"]


def test_http_backend_settings_are_validated(monkeypatch):
    for var in ("SAESCOPE_LLM_URL", "SAESCOPE_LLM_MODEL", "SAESCOPE_LLM_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="no LLM URL given.*SAESCOPE_LLM_URL"):
        OpenAIChatBackend(model="m")
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        OpenAIChatBackend("ftp://host/v1", "m")
    with pytest.raises(ValueError, match="no LLM model name given.*SAESCOPE_LLM_MODEL"):
        OpenAIChatBackend("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIChatBackend("http://127.0.0.1:1/v1", "m", max_concurrency=0)
    monkeypatch.setenv("SAESCOPE_LLM_URL", "http://127.0.0.1:9/v1/chat/completions")
    monkeypatch.setenv("SAESCOPE_LLM_MODEL", "qwen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    b = OpenAIChatBackend()
    assert (b.base_url, b.model, b.name) == ("http://127.0.0.1:9/v1", "qwen", "qwen @ http://127.0.0.1:9/v1")
    assert b._client.headers["Authorization"] == "Bearer sk-env"
    with pytest.raises(ValueError, match="role 'robot'; valid: system, user, assistant"):
        b.complete([{"role": "robot", "content": "hi"}])
