"""`saescope train-sae` end to end on a tiny real model, and the committed demo SAE it made."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from saescope.precompute.config import EMBEDDED
from saescope.precompute.saes import load_sae


@pytest.mark.slow  # a subprocess
def test_train_sae_cli_writes_a_loadable_saelens_folder(tmp_path, tiny_lm_dir, small_corpus):
    out = tmp_path / "sae"
    r = subprocess.run([sys.executable, "-m", "saescope.app.cli", "train-sae", "--model", str(tiny_lm_dir), "--hook",
                        "blocks.1.hook_resid_post", "--dataset", str(small_corpus), "--tokens", "2048",
                        "--context-len", "64", "--d-sae", "128", "--k", "8", "--steps", "60", "--batch", "256",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "explained variance" in r.stdout
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    sae = load_sae(out)  # through the same SAELens loader a downloaded SAE takes
    assert sae.cfg.d_sae == 128 and sae.cfg.d_in == 64
    rep = json.loads((out / "training_report.json").read_text())
    assert 0 < rep["explained_variance"] <= 1 and rep["l0"] <= 8 and 0 <= rep["dead_share"] <= 1
    assert "train-sae: 100%" in r.stderr and "step/s" in r.stderr  # the progress bar


def test_training_improves_reconstruction():
    """The trainer's objective goes down on data with sparse structure (an independent sanity check)."""
    from saescope.precompute.saes import SAEConfig
    from saescope.precompute.train import train_topk

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(64, 32, generator=g)
    codes = (torch.rand(4000, 64, generator=g) < 0.05).float() * torch.rand(4000, 64, generator=g) * 3
    x = codes @ dirs + 0.01 * torch.randn(4000, 32, generator=g)
    base = SAEConfig(architecture="topk", d_in=32, d_sae=128, k=4)
    _, short = train_topk(x, 128, 4, 5, 256, 1e-2, 0, base)
    _, long = train_topk(x, 128, 4, 400, 256, 1e-2, 0, base)
    assert long.explained_variance > short.explained_variance + 0.2 and long.explained_variance > 0.8


def test_the_committed_demo_sae(default_model_dir):
    sae = load_sae(EMBEDDED.sae_dir)
    rep = json.loads((EMBEDDED.sae_dir / "training_report.json").read_text())
    assert sae.cfg.architecture == "topk" and sae.cfg.d_sae >= 4096 and sae.cfg.hook_name == EMBEDDED.hook
    assert rep["explained_variance"] > 0.85 and rep["l0"] <= sae.cfg.k and rep["dead_share"] < 0.05
    norms = sae.W_dec.detach().norm(dim=-1).numpy()
    assert np.allclose(norms, norms[0], rtol=1e-2), "unit decoder rows in training space, one folded scale"


def _own_mlp_io(model_dir, corpus, layer: int, n_ctx: int, skip_ctx: int, context_len: int = 64):
    """(MLP input, MLP output) rows of one layer of a HF Llama, captured by the test's own forward hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ids = tok("\n".join(texts))["input_ids"]
    rows_in, rows_out = [], []

    def grab(_m, a, out):
        rows_in.append(a[0][0])
        rows_out.append(out[0])

    h = model.model.layers[layer].mlp.register_forward_hook(grab)
    try:
        with torch.no_grad():
            for c in range(skip_ctx, skip_ctx + n_ctx):
                chunk = [tok.bos_token_id] + ids[c * (context_len - 1):(c + 1) * (context_len - 1)]
                model(torch.tensor([chunk]))
    finally:
        h.remove()
    return torch.cat(rows_in)[1:], torch.cat(rows_out)[1:]  # drop one BOS row


def _own_topk_transcoder(folder, x):
    """f(x) = topk_relu(x W_enc + b_enc) W_dec + b_dec from the saved tensors (the test's own formula)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    w = {n: t.float() for n, t in load_file(str(folder / "sae_weights.safetensors")).items()}
    pre = x @ w["W_enc"] + w["b_enc"]
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return z, z @ w["W_dec"] + w["b_dec"]


def test_train_transcoder_cli_explains_the_mlp_output(tmp_path, tiny_lm_dir, small_corpus):
    """--hook-out trains a transcoder of layer 1's MLP: on contexts it never saw, the saved fp16 file explains
    > 0.35 of the MLP output's variance (test's own hook and formula), and load_sae computes the same thing."""
    out = tmp_path / "tc"
    r = subprocess.run([sys.executable, "-m", "saescope.app.cli", "train-sae", "--model", str(tiny_lm_dir), "--hook",
                        "blocks.1.hook_mlp_in", "--hook-out", "blocks.1.hook_mlp_out", "--dataset", str(small_corpus),
                        "--tokens", "4096", "--context-len", "64", "--d-sae", "256", "--k", "16", "--steps", "300",
                        "--batch", "256", "--lr", "3e-3", "--fp16", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "explained variance" in r.stdout
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_transcoder" and cfg["k"] == 16 and cfg["d_in"] == cfg["d_out"] == 64
    assert cfg["d_sae"] == 256 and cfg["dtype"] == "float16" and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_mlp_in" and cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    from safetensors.torch import load_file

    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {"W_enc": (64, 256), "b_enc": (256,),
                                                               "W_dec": (256, 64), "b_dec": (64,)}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    x, y = _own_mlp_io(tiny_lm_dir, small_corpus, layer=1, n_ctx=8, skip_ctx=70)  # past the 64 training contexts
    z, f = _own_topk_transcoder(out, x)
    ev = 1 - (y - f).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert ev > 0.35, f"held-out explained variance of the MLP output {ev:.3f}"
    rep = json.loads((out / "training_report.json").read_text())
    assert rep["explained_variance"] > 0.4 and rep["l0"] <= 16 and rep["hook_name_out"] == "blocks.1.hook_mlp_out"
    tc = load_sae(out)
    assert tc.is_transcoder and tc.cfg.hook_name_out == "blocks.1.hook_mlp_out"
    with torch.no_grad():
        assert torch.allclose(tc.encode(x), z, atol=1e-5) and torch.allclose(tc(x), f, atol=1e-5)


def test_transcoder_round_trips_through_load_sae(tmp_path, tiny_lm_dir, small_corpus):
    """train_topk_transcoder's model saved as float32 loads back with identical features and outputs; the MLP
    input/output pairs come from the test's own hook, and the held-out EV in the report is recomputed here."""
    from saescope.precompute.saes import SAEConfig, save_saelens
    from saescope.precompute.train import train_topk_transcoder

    x, y = _own_mlp_io(tiny_lm_dir, small_corpus, layer=2, n_ctx=48, skip_ctx=0)
    base = SAEConfig(architecture="topk_transcoder", d_in=64, d_sae=128, hook_name="blocks.2.hook_mlp_in",
                     hook_name_out="blocks.2.hook_mlp_out", apply_b_dec_to_input=False)
    tc, rep = train_topk_transcoder(x, y, 128, 8, 200, 256, 3e-3, 0, base, progress=False)
    g = torch.Generator().manual_seed(0)
    held = torch.randperm(x.shape[0], generator=g)[:max(1, x.shape[0] // 10)]  # the split the trainer documents
    with torch.no_grad():
        f = tc(x[held])
    ev = 1 - (y[held] - f).pow(2).sum() / (y[held] - y[held].mean(0)).pow(2).sum()
    assert abs(float(ev) - rep.explained_variance) < 1e-4 and rep.explained_variance > 0.3
    save_saelens(tc, tmp_path / "tc")
    back = load_sae(tmp_path / "tc")
    assert type(back) is type(tc) and back.cfg.k == 8
    with torch.no_grad():
        assert torch.equal(back.encode(x), tc.encode(x)) and torch.equal(back(x), tc(x))


def test_transcoder_hooks_are_checked(tiny_lm_dir):
    from saescope.precompute.errors import UserError
    from saescope.precompute.models import load_model
    from saescope.precompute.train import train_transcoder

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    for a, b in (("blocks.1.hook_mlp_in", "blocks.2.hook_mlp_out"), ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")):
        try:
            train_transcoder(lm, a, b, "default", Path("unused"), 128, 64, 8, 2, 1, 8, 1e-3, 0)
        except UserError as err:
            assert "hook_mlp_out of the same layer" in str(err)
        else:
            raise AssertionError("mismatched hooks were accepted")
