"""The committed per-layer transcoders of the embedded default, the demo that precomputes them and the home link."""

from __future__ import annotations

import json

import torch

from saescope.precompute.config import DEMO_TRANSCODERS, EMBEDDED
from saescope.precompute.embedded import demo_transcoder_dirs
from saescope.precompute.saes import load_sae

EV_MIN = 0.3  # every layer's held-out explained variance of the MLP output (measured: 0.336 to 0.941, README.md)
SIZE_MAX = 36 * 2**20  # the repository budget of the embedded default's transcoders


def test_every_layer_has_a_compact_transcoder():
    dirs = demo_transcoder_dirs()
    assert [int(p.name[-2:]) for p in dirs] == list(range(30))
    total = sum(f.stat().st_size for f in EMBEDDED.transcoder_dir.rglob("*") if f.is_file())
    assert total <= SIZE_MAX, f"{total / 2**20:.1f} MB"
    for layer, d in enumerate(dirs):
        cfg = json.loads((d / "cfg.json").read_text())
        assert cfg["dtype"] == "float16" and cfg["architecture"] == "topk_transcoder"
        tc = load_sae(d)
        assert tc.is_transcoder and tc.cfg.hook_name == f"blocks.{layer}.hook_mlp_in"
        assert tc.cfg.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert tc.cfg.d_in == 576 and tc.cfg.d_sae == DEMO_TRANSCODERS.d_sae and tc.cfg.k == DEMO_TRANSCODERS.k
        rep = json.loads((d / "training_report.json").read_text())
        assert rep["explained_variance"] > EV_MIN and rep["l0"] <= DEMO_TRANSCODERS.k, (layer, rep)


def test_demo_transcoders_explain_the_real_mlp(default_model_dir):
    """On text the trainer never saw, a few layers' transcoders explain the real MLP output (the test's own hooks
    on the HF model): a fifth of its variance or more; and they load as one set for graphs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saescope.precompute.circuits.transcoders import load_transcoders

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    text = ("The pathlib module offers classes representing filesystem paths with semantics appropriate for different "
            "operating systems. Path classes are divided between pure paths, which provide purely computational "
            "operations without I/O, and concrete paths, which inherit from pure paths but also provide I/O "
            "operations. If you have never used this module before, the class you want is probably Path.")
    ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
    layers = (0, 9, 20, 29)
    io: dict[int, tuple] = {}
    hooks = [model.model.layers[l].mlp.register_forward_hook(
        lambda _m, a, out, l=l: io.__setitem__(l, (a[0][0, 1:], out[0, 1:]))) for l in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    for l in layers:
        x, y = io[l]
        tc = load_sae(demo_transcoder_dirs([l])[0])
        with torch.no_grad():
            f = tc(x)
        ev = float(1 - (y - f).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert ev > 0.2, (l, ev)  # fresh text: below the held-out figures (the held-out rows share contexts)
    ts = load_transcoders([str(p) for p in demo_transcoder_dirs()], 30)
    assert ts.layers == list(range(30)) and ts.input_kind == "hook_mlp_in"


def test_home_links_an_example_graph_when_the_store_has_transcoders(tmp_path, tiny_lm_dir, small_corpus, tiny_store):
    from conftest import TINY_ARGS
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.saes import SAEConfig, save_saelens
    from saescope.precompute.saes.transcoder import TopKTranscoder

    torch.manual_seed(3)
    tc = TopKTranscoder(SAEConfig(architecture="topk_transcoder", d_in=64, d_sae=16, k=4, apply_b_dec_to_input=False,
                                  hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out"))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    save_saelens(tc, tmp_path / "tc")
    out = tmp_path / "tc.duckdb"
    run_precompute(PrecomputeSpec(out=out, model=str(tiny_lm_dir), saes=[SAESpec(str(tmp_path / "tc"), sae_id="tc")],
                                  dataset=str(small_corpus), feature_map=False, **{**TINY_ARGS, "tokens": 64 * 4}))
    page = TestClient(create_app(out, worker_url=None)).get("/").text
    assert 'href="/graph?prompt=import+numpy+as"' in page and EMBEDDED.graph_prompt == "import numpy as"
    plain = TestClient(create_app(tiny_store, worker_url=None)).get("/").text
    assert "/graph?" not in plain  # no transcoder, no graph link


def test_worker_graphs_use_every_demo_layer(default_model_dir):
    """On the embedded default, the worker's graphs replace every MLP: its own transcoders (here layer 5's, as a
    store with a dashboard for it would give) and the committed ones of the other 29 layers (graphs only: the
    worker's SAEs stay those it was given)."""
    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes.graph import transcoders

    tc5 = str(demo_transcoder_dirs([5])[0])
    engine = build_engine(str(default_model_dir), {"tc5": tc5}, {}, "cpu", "float32")
    assert list(engine.saes) == ["tc5"]
    assert sorted(engine.graph_saes) == sorted(f"demo-transcoder-L{layer}" for layer in range(30) if layer != 5)
    ts, by_layer = transcoders(engine, None)
    assert ts.layers == list(range(30)) and ts.covered == set(range(30))
    assert by_layer[5] == "tc5" and by_layer[7] == "demo-transcoder-L7" and len(set(by_layer.values())) == 30
    ref = load_sae(demo_transcoder_dirs([7])[0])
    assert torch.equal(ts.encoders[7].W_enc.float(), ref.W_enc.detach().float())
    assert torch.equal(ts.encoders[7].W_dec[:, 0].float(), ref.W_dec.detach().float())
    only = transcoders(engine, ["tc5", "demo-transcoder-L9"])[0]
    assert only.layers == [5, 9]
