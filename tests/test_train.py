"""`saescope train-sae` end to end on a tiny real model, and the committed demo SAE it made."""

import json
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
