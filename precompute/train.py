"""`saescope train-sae`: train a TopK SAE on any model's activations at any hook, save it as SAELens.

TopK (Gao et al. 2024) fixes L0 at k, needs no sparsity-penalty tuning, and with the AuxK loss keeps dead
latents rare even on a short CPU run, which is why the embedded default uses it.
Activations are scaled by one constant so that E[||x||^2] = d_in while training; the constant is folded into
the saved weights, so the saved SAE reads raw activations (feature activations are unchanged by the fold).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import iter_contexts, iter_texts, special_mask
from .models import HookedLM
from .saes import SAEConfig, save_saelens
from .saes.topk import TopKSAE
from .errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    explained_variance: float
    l0: float
    dead_share: float
    dead_window_tokens: int
    train_tokens: int
    eval_tokens: int
    steps: int
    seconds: float
    scaling_factor: float


def collect_activations(lm: HookedLM, hook: str, dataset: str, tokens: int, context_len: int,
                        prepend_bos: bool, batch_size: int = 16) -> torch.Tensor:
    """(N, d_model) activations at `hook` over non-special tokens of the first `tokens` tokens."""
    n_ctx = max(1, tokens // context_len)
    ctxs = iter_contexts(iter_texts(dataset), lm.tokenizer, context_len, prepend_bos)
    out: list[torch.Tensor] = []
    with tqdm(total=n_ctx * context_len, unit="tok", desc="activations", unit_scale=True) as bar:
        batch: list[np.ndarray] = []
        for i, ctx in enumerate(ctxs):
            if i >= n_ctx:
                break
            batch.append(ctx)
            if len(batch) == batch_size or i == n_ctx - 1:
                ids = np.stack(batch)
                acts = lm.activations(torch.from_numpy(ids).long(), hook)  # (B, T, d)
                keep = torch.from_numpy(~special_mask(ids, lm.tokenizer))
                out.append(acts[keep].cpu())
                bar.update(ids.size)
                batch = []
    if not out:
        raise UserError(f"dataset {dataset!r} gave no context of {context_len} tokens")
    return torch.cat(out)


def train_topk(acts: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
               cfg_base: SAEConfig) -> tuple[TopKSAE, TrainReport]:
    """Train on acts (N, d_in); the last 10% is held out for the report."""
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    perm = torch.randperm(n, generator=g)
    n_eval = max(1, n // 10)
    train, held = acts[perm[n_eval:]], acts[perm[:n_eval]]
    scale = math.sqrt(acts.shape[1] / train.pow(2).sum(-1).mean().item())
    train, held = train * scale, held * scale
    d_in = acts.shape[1]
    cfg = SAEConfig(**{**cfg_base.to_dict(), "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k})
    sae = TopKSAE(cfg)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(train.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    dead_after = max(1, 20_000 // batch)  # a latent silent for ~20k tokens counts as dead for AuxK
    k_aux = d_in // 2
    var = (train - train.mean(0)).pow(2).sum(-1).mean()
    bar = tqdm(range(steps), desc="train-sae", unit="step")
    for step in bar:
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        x = train[idx]  # (B, d_in)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (B, d_sae)
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        recon = z @ sae.W_dec + sae.b_dec
        err = x - recon
        mse = err.pow(2).sum(-1).mean() / var
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[top.indices[top.values > 0].unique()] = True
        last_fired = torch.where(fired, torch.zeros_like(last_fired), last_fired + 1)
        dead = last_fired > dead_after
        loss = mse
        n_dead = int(dead.sum())
        if n_dead:
            ka = min(k_aux, n_dead)
            aux_pre = torch.where(dead[None], pre, torch.full_like(pre, -float("inf")))
            at = aux_pre.topk(ka, dim=-1)
            za = torch.zeros_like(pre).scatter(-1, at.indices, torch.relu(at.values))
            aux = (za @ sae.W_dec - err.detach()).pow(2).sum(-1).mean() / var
            loss = loss + (1 / 32) * min(n_dead / k_aux, 1.0) * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows unit-norm: drop the gradient along each row
            gW = sae.W_dec.grad
            gW -= (gW * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
        for group in opt.param_groups:  # linear decay over the last 20%
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{mse.item():.3f}", dead=n_dead)
    bar.close()
    with torch.no_grad():
        z = sae.encode(held)
        recon = sae.decode(z)
        ev = 1 - (held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        l0 = (z > 0).sum(-1).float().mean()
        ever = torch.zeros(d_sae, dtype=torch.bool)
        for chunk in torch.split(torch.cat([held, train[:200_000]]), 8192):
            ever |= (sae.encode(chunk) > 0).any(0)
        sae.fold_scaling_factor(scale)
    report = TrainReport(explained_variance=float(ev), l0=float(l0), dead_share=float((~ever).float().mean()),
                         dead_window_tokens=int(min(train.shape[0], 200_000) + held.shape[0]),
                         train_tokens=int(train.shape[0]), eval_tokens=int(held.shape[0]), steps=steps,
                         seconds=time.time() - t0, scaling_factor=scale)
    return sae, report


def train_sae(lm: HookedLM, hook: str, dataset: str, out: Path, tokens: int, context_len: int, d_sae: int,
              k: int, steps: int, batch: int, lr: float, seed: int, prepend_bos: bool = True,
              fp16: bool = False, model_label: str | None = None) -> TrainReport:
    torch.manual_seed(seed)
    acts = collect_activations(lm, hook, dataset, tokens, context_len, prepend_bos)
    log.info("collected %d activations of width %d at %s", acts.shape[0], acts.shape[1], hook)
    base = SAEConfig(architecture="topk", d_in=acts.shape[1], d_sae=d_sae, hook_name=hook,
                     model_name=model_label or lm.name, prepend_bos=prepend_bos, context_size=context_len,
                     dataset_path=dataset)
    sae, report = train_topk(acts, d_sae, k, steps, batch, lr, seed, base)
    save_saelens(sae, out, dtype=torch.float16 if fp16 else torch.float32,
                 extra_meta={"trained_by": "saescope train-sae"})
    (out / "training_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report
