"""`saescope check`: every kind passes and fails on purpose on the tiny real model and store, with the numbers
recomputed here independently (the HF model loaded on its own, forward hooks written in this file, the TopK
encoder and the splice written out from the SAE's weight file); JUnit structure; exit codes; bad files."""

from __future__ import annotations

import json
import math
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from saescope.precompute.errors import UserError

CODE = ["def f(x):\n    return x + 1", "import os\nprint(os.getcwd())", "for i in range(10):\n    pass",
        "class A:\n    def __init__(self):\n        self.x = []", "x = [i * i for i in range(5)]",
        "with open('f') as fh:\n    data = fh.read()", "try:\n    pass\nexcept ValueError as e:\n    raise",
        "lambda a, b: a + b"]
PROSE = ["The cat sat on the mat.", "It was a sunny day in the park.", "She opened the letter slowly.",
         "Rivers carry water to the sea.", "He laughed at the old joke again.", "Autumn leaves fell on the road.",
         "The train was late this morning.", "Music filled the quiet room."]
THR = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Ref:
    """The tiny model and SAE without saescope: HF from_pretrained, the weight file, hooks written here."""

    def __init__(self, lm_dir: Path, sae_dir: Path):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(lm_dir)
        self.model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
        w = load_file(str(sae_dir / "sae_weights.safetensors"))
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
        self.k = json.loads((sae_dir / "cfg.json").read_text())["k"]
        self.layer = self.model.model.layers[1]  # blocks.1.hook_resid_post = output of decoder layer 1

    def ids(self, text: str) -> list[int]:
        return [self.tok.bos_token_id] + self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., 64) -> (..., 96)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    @torch.no_grad()
    def acts(self, text: str) -> torch.Tensor:
        got = {}
        h = self.layer.register_forward_hook(lambda m, a, out: got.setdefault("x", out[0] if isinstance(out, tuple) else out))
        try:
            self.model(input_ids=torch.tensor([self.ids(text)]))
        finally:
            h.remove()
        z = self.encode(got["x"][0])
        z[0] = 0  # BOS is special: never an activation
        return z

    def max_acts(self, texts: list[str]) -> torch.Tensor:  # (n, 96)
        return torch.stack([self.acts(t).max(0).values for t in texts])

    @torch.no_grad()
    def last_logprobs(self, ids: list[int], ablate: list[int] = (), add: tuple[int, float] | None = None) -> torch.Tensor:
        def edit(m, a, out):
            x = out[0] if isinstance(out, tuple) else out
            z = self.encode(x)
            z2 = z.clone()
            z2[..., list(ablate)] = 0
            new = x + (z2 - z) @ self.W_dec
            if add is not None:
                new = new + add[1] * self.W_dec[add[0]]
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        h = self.layer.register_forward_hook(edit) if (ablate or add) else None
        try:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
        finally:
            if h is not None:
                h.remove()
        return torch.log_softmax(logits.float(), -1)

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int, add: tuple[int, float] | None = None) -> list[int]:
        def edit(m, a, out):
            x = out[0] if isinstance(out, tuple) else out
            new = x + add[1] * self.W_dec[add[0]]
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        h = self.layer.register_forward_hook(edit) if add else None
        try:
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                                      pad_token_id=2)
        finally:
            if h is not None:
                h.remove()
        return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def ref(tiny_lm_dir, tiny_sae_dir) -> Ref:
    return Ref(tiny_lm_dir, tiny_sae_dir)


@pytest.fixture(scope="module")
def picked(ref):
    """Features whose behaviour on the two sets is known from the reference: F fires on some but not all code
    texts and on fewer prose texts; G is the feature most active at the prose prompts' last tokens."""
    on = (ref.max_acts(CODE) >= THR).float()  # (n, 96)
    off = (ref.max_acts(PROSE) >= THR).float()
    k_on, k_off = on.sum(0), off.sum(0)
    ok = (k_on > 0) & (k_on < len(CODE)) & (k_off > 0) & (k_off < k_on)
    assert ok.any(), "no feature separates the sets on this tiny model"
    F = int(torch.where(ok, k_on - k_off, torch.tensor(-99.0)).argmax())
    last = torch.stack([ref.acts(t)[-1] for t in PROSE]).mean(0)
    G = int(last.argmax())
    return {"F": F, "k_on": int(k_on[F]), "k_off": int(k_off[F]), "G": G,
            "off_active": [i for i in range(len(PROSE)) if off[i, F]]}


def _sets() -> str:
    return (f"[sets.code]\ntexts = {json.dumps(CODE)}\n[sets.prose]\ntexts = {json.dumps(PROSE)}\n")


def _write(tmp_path: Path, body: str, name: str = "checks.toml") -> Path:
    p = tmp_path / name
    p.write_text(_sets() + textwrap.dedent(body))
    return p


def test_fires_and_monitor_pass_and_fail(tmp_path, tiny_store, ref, picked):
    from saescope.precompute.checks.run import run_checks

    F, n = picked["F"], len(CODE)
    pct_on, pct_off = 100.0 * picked["k_on"] / n, 100.0 * picked["k_off"] / len(PROSE)
    path = _write(tmp_path, f"""
    [[check]]
    name = "fires exactly as measured"
    kind = "fires"
    feature = {F}
    threshold = {THR}
    on = "code"
    min_pct = {pct_on!r}
    off = "prose"
    max_pct = {pct_off!r}

    [[check]]
    name = "fires on more code than it does"
    kind = "fires"
    features = [{F}]
    threshold = {THR}
    on = "code"
    min_pct = {min(100.0, pct_on + 1)!r}

    [[check]]
    name = "quiet on prose: too strict"
    kind = "fires"
    features = [{F}]
    threshold = {THR}
    on = "code"
    min_pct = 0
    off = "prose"
    max_pct = {pct_off - 1!r}

    [[check]]
    name = "monitor within bounds"
    kind = "monitor"
    features = [{F}]
    threshold = {THR}
    texts = "prose"
    max_pct = {pct_off!r}

    [[check]]
    name = "monitor trips"
    kind = "monitor"
    features = [{F}]
    threshold = {THR}
    texts = "prose"
    max_pct = 0
    """)
    run = run_checks(path, tiny_store, progress=False)
    r = {x.name: x for x in run.results}
    assert [x.passed for x in run.results] == [True, False, False, True, False]
    assert r["fires exactly as measured"].measured["on_pct"] == pct_on
    assert r["fires exactly as measured"].measured["off_pct"] == pct_off
    assert r["monitor trips"].measured["tripped"] == picked["off_active"]
    # the per-text maxima equal the reference's (a separate forward per text, its own hook and encoder)
    ref_max = ref.max_acts(CODE)[:, F]
    got = [t["max_act"] for t in r["fires exactly as measured"].measured["per_text_on"]]
    assert got == pytest.approx(ref_max.tolist(), abs=1e-4)
    # evidence: the texts that fired come first, with tokens and per-token activations
    ev = r["monitor trips"].evidence[0]
    assert ev["active"] and ev["text"] == PROSE[picked["off_active"][0]]
    assert ev["acts"] == pytest.approx(ref.acts(ev["text"])[:, F].tolist(), abs=1e-4)
    assert run.provenance["saes"]["tiny"]["verify_ok"] is True
    assert len(run.provenance["model"]["sha256"]) == 64 and len(run.provenance["saes"]["tiny"]["sha256"]) == 64


def test_ablation_passes_and_fails(tmp_path, tiny_store, ref, picked):
    from saescope.precompute.checks.run import run_checks

    G = picked["G"]
    the = ref.tok(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1
    target = the[0]
    deltas = []
    for t in PROSE:
        ids = ref.ids(t)
        deltas.append(float(ref.last_logprobs(ids, ablate=[G])[target] - ref.last_logprobs(ids)[target]))
    m = sum(deltas) / len(deltas)
    assert abs(m) > 1e-3, "the ablation must move the target for the check to mean anything"
    way, wrong = ("lower", "raise") if m < 0 else ("raise", "lower")
    path = _write(tmp_path, f"""
    [[check]]
    name = "ablation moves the target"
    kind = "ablation"
    features = [{G}]
    prompts = "prose"
    targets = [" the"]
    direction = "{way}"
    min_nats = {abs(m) / 2!r}

    [[check]]
    name = "ablation moves it twice as much"
    kind = "ablation"
    features = [{G}]
    prompts = "prose"
    target_ids = [{target}]
    direction = "{way}"
    min_nats = {abs(m) * 2!r}

    [[check]]
    name = "ablation the wrong way"
    kind = "ablation"
    features = [{G}]
    prompts = "prose"
    target_ids = [{target}]
    direction = "{wrong}"
    min_nats = 0
    """)
    run = run_checks(path, tiny_store, progress=False)
    assert [x.passed for x in run.results] == [True, False, False]
    for x in run.results:
        assert x.measured["mean_delta_logprob"] == pytest.approx(m, abs=1e-4)
    assert [e["delta_logprob"] for e in run.results[0].evidence] == pytest.approx(deltas, abs=1e-4)


def test_steering_passes_and_fails(tmp_path, tiny_store, ref, picked):
    from saescope.precompute.checks.run import run_checks

    F, s = picked["F"], 8.0
    ids0 = ref.ids(PROSE[0])
    target = int((ref.last_logprobs(ids0, add=(F, s)).exp() - ref.last_logprobs(ids0).exp()).argmax())
    incs = [float(ref.last_logprobs(ref.ids(t), add=(F, s)).exp()[target] - ref.last_logprobs(ref.ids(t)).exp()[target])
            for t in PROSE]
    mean = sum(incs) / len(incs)
    assert mean > 0
    n = 6
    changed_big = [ref.greedy(ref.ids(t), n, add=(F, 200.0)) != ref.greedy(ref.ids(t), n) for t in PROSE]
    changed_tiny = [ref.greedy(ref.ids(t), n, add=(F, 1e-6)) != ref.greedy(ref.ids(t), n) for t in PROSE]
    assert all(changed_big) and not any(changed_tiny)
    path = _write(tmp_path, f"""
    [[check]]
    name = "steering raises the target"
    kind = "steering"
    feature = {F}
    strength = {s}
    prompts = "prose"
    target_ids = [{target}]
    min_prob_increase = {mean / 2!r}

    [[check]]
    name = "steering raises it a lot"
    kind = "steering"
    feature = {F}
    strength = {s}
    prompts = "prose"
    target_ids = [{target}]
    min_prob_increase = {min(1.0, mean * 2)!r}

    [[check]]
    name = "strong steering changes the output"
    kind = "steering"
    feature = {F}
    strength = 200
    prompts = "prose"
    expect = "output_changes"
    min_pct = 100
    max_new_tokens = {n}

    [[check]]
    name = "feeble steering changes the output"
    kind = "steering"
    feature = {F}
    strength = 1e-6
    prompts = "prose"
    expect = "output_changes"
    min_pct = 1
    max_new_tokens = {n}
    """)
    run = run_checks(path, tiny_store, progress=False)
    assert [x.passed for x in run.results] == [True, False, True, False]
    assert run.results[0].measured["mean_increase"] == pytest.approx(mean, abs=1e-5)
    assert run.results[2].measured["changed_pct"] == 100.0 and run.results[3].measured["changed_pct"] == 0.0
    assert [e["steered_ids"] for e in run.results[2].evidence] == [ref.greedy(ref.ids(t), n, add=(F, 200.0)) for t in PROSE]


# ------------------------------------------------------------------ reports and the command
def _check_junit(xml: bytes, n: int, failures: int, errors: int) -> ET.Element:
    """The structure of the JUnit schema CI systems read (junit-10.xsd, as Jenkins/GitLab/GitHub reporters)."""
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    suites = list(root)
    assert suites and all(s.tag == "testsuite" for s in suites)
    for s in suites:
        for attr in ("name", "tests", "failures", "errors", "time"):
            assert attr in s.attrib, attr
        assert int(s.get("tests")) == n and int(s.get("failures")) == failures and int(s.get("errors")) == errors
        float(s.get("time"))
        kids = [c.tag for c in s]
        assert set(kids) <= {"properties", "testcase", "system-out", "system-err"}
        if "properties" in kids:  # at most once, before every testcase
            assert kids.count("properties") == 1 and kids.index("properties") == 0
            assert all(p.tag == "property" and {"name", "value"} <= set(p.attrib) for p in s.find("properties"))
        cases = s.findall("testcase")
        assert len(cases) == n
        got_f = got_e = 0
        for c in cases:
            assert c.get("name") and c.get("classname")
            float(c.get("time"))
            tags = [x.tag for x in c]
            assert set(tags) <= {"skipped", "error", "failure", "system-out", "system-err"}
            assert tags.count("failure") + tags.count("error") + tags.count("skipped") <= 1
            for x in c:
                if x.tag in ("failure", "error"):
                    assert "message" in x.attrib and "type" in x.attrib
            got_f += tags.count("failure")
            got_e += tags.count("error")
        assert (got_f, got_e) == (failures, errors)
    assert int(root.get("tests")) == n and int(root.get("failures")) == failures
    return root


def test_cli_exit_codes_json_and_junit(tmp_path, tiny_store, picked, capsys):
    from saescope.app.cli import main

    F = picked["F"]
    good = _write(tmp_path, f"""
    [[check]]
    name = "fires on code"
    kind = "fires"
    feature = {F}
    threshold = {THR}
    on = "code"
    min_pct = 1
    """, "good.toml")
    bad = _write(tmp_path, f"""
    [[check]]
    name = "fires on code"
    kind = "fires"
    feature = {F}
    threshold = {THR}
    on = "code"
    min_pct = 1

    [[check]]
    name = "never fires on <prose> & \\"friends\\""
    kind = "monitor"
    features = [{F}]
    threshold = {THR}
    texts = "prose"
    max_pct = 0

    [[check]]
    name = "ablating it lowers token 5"
    kind = "ablation"
    features = [{F}]
    prompts = "prose"
    target_ids = [999999]
    direction = "lower"
    min_nats = 0
    """, "bad.toml")
    out = tmp_path / "res"
    assert main(["check", str(good), "--store", str(tiny_store), "--out", str(out), "--no-progress"]) == 0
    _check_junit((out / "good.junit.xml").read_bytes(), 1, 0, 0)
    # an id outside the vocabulary is caught after the tokenizer loads and before any check runs: exit 2
    assert main(["check", str(bad), "--store", str(tiny_store), "--out", str(out), "--no-progress"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    bad.write_text(bad.read_text().replace("target_ids = [999999]", "target_ids = [5]"))
    assert main(["check", str(bad), "--store", str(tiny_store), "--out", str(out), "--no-progress"]) == 1
    root = _check_junit((out / "bad.junit.xml").read_bytes(), 3, 2, 0)
    names = [c.get("name") for c in root.iter("testcase")]
    assert names[1] == 'never fires on <prose> & "friends"'
    doc = json.loads((out / "bad.json").read_text())
    assert doc["ok"] is False and doc["failures"] == 2 and doc["tests"] == 3
    assert doc["provenance"]["saescope_version"] and doc["provenance"]["check_file"]["sha256"]
    assert doc["results"][1]["evidence"][0]["text"] in PROSE
    printed = capsys.readouterr().out
    assert "FAIL  never fires on" in printed and "2 failed" in printed


@pytest.mark.parametrize("body, where, says", [
    ('[[check]]\nname = "a"\nkind = "firez"\nfeature = 1\nthreshold = 1\non = "code"\nmin_pct = 5\n', 3,
     "unknown kind 'firez'; allowed: fires, ablation, steering, monitor"),
    ('[[check]]\nname = "b"\nkind = "fires"\nfeature = 96\nthreshold = 1\non = "code"\nmin_pct = 5\n', 4,
     "feature 96 is not a feature of tiny; allowed: 0..95"),
    ('[[check]]\nname = "c"\nkind = "fires"\nsae = "nope"\nfeature = 1\nthreshold = 1\non = "code"\nmin_pct = 5\n', 4,
     "there is no SAE 'nope' in the store; valid: tiny"),
    ('[[check]]\nname = "d"\nkind = "fires"\nfeature = 1\nthreshold = -1\non = "code"\nmin_pct = 5\n', 5,
     "threshold -1 is out of range; allowed: a number >= 0"),
    ('[[check]]\nname = "e"\nkind = "monitor"\nfeatures = [1]\nthreshold = 1\ntexts = "code"\nmax_pct = 150\n', 7,
     "max_pct 150 is out of range; allowed: a number >= 0 and <= 100"),
    ('[[check]]\nname = "f"\nkind = "fires"\nfeature = 1\nthreshold = 1\non = "poetry"\nmin_pct = 5\n', 6,
     "on names the set 'poetry', which is not defined; sets: code, prose"),
])
def test_bad_check_files_fail_before_any_model_loads(tmp_path, tiny_store, body, where, says):
    from saescope.precompute.checks.run import run_checks

    p = tmp_path / "bad.toml"
    p.write_text(_sets() + body)
    # a model that cannot load: the check file's error must come first
    with pytest.raises(UserError) as err:
        run_checks(p, tiny_store, model=str(tmp_path / "no-such-model"), progress=False)
    msg = str(err.value)
    assert f"line {where + 4}," in msg and says in msg, msg  # _sets() takes 4 lines
    assert "check '" in msg


def test_check_run_page_served_next_to_the_store(tmp_path, tiny_store, picked):
    import httpx

    from conftest import serve_in_thread
    from saescope.app.cli import main
    from saescope.app.web.app import create_app

    F = picked["F"]
    path = _write(tmp_path, f"""
    [[check]]
    name = "monitor <b>trips</b>"
    kind = "monitor"
    features = [{F}]
    threshold = {THR}
    texts = "prose"
    max_pct = 0
    """, "page.toml")
    assert main(["check", str(path), "--store", str(tiny_store), "--no-progress"]) == 1  # default --out: STORE.checks/
    assert (tiny_store.with_name(tiny_store.name + ".checks") / "page.json").is_file()
    with serve_in_thread(create_app(tiny_store)) as base:
        html = httpx.get(f"{base}/checks/page").text
        assert "FAIL" in html and "monitor &lt;b&gt;trips&lt;/b&gt;" in html and "<b>trips" not in html
        assert f'href="/sae/tiny/feature/{F}"' in html and 'class="strip"' in html
        assert "verified" in html  # the store's verify badge
        assert httpx.get(f"{base}/checks/nope").status_code == 404
        assert "page" in httpx.get(f"{base}/checks").text
