"""`saescope train-sae`: train a TopK SAE on any model's activations at any hook, save it as SAELens.

TopK (Gao et al. 2024) fixes L0 at k, needs no sparsity-penalty tuning, and with the AuxK loss keeps dead
latents rare even on a short CPU run, which is why the embedded default uses it.
Activations are scaled by one constant so that E[||x||^2] = d_in while training; the constant is folded into
the saved weights, so the saved SAE reads raw activations (feature activations are unchanged by the fold).

`train_transcoder` trains a TopK transcoder with the same loop: the input is the MLP's input (hook_mlp_in), the
target the MLP's output (hook_mlp_out), and the loss is the MLP output's reconstruction error. Input and target
get one scale each, both folded into the saved weights. `train_transcoders` trains one per layer from a single
forward pass per batch (every layer's input and output captured at once).
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
from .saes.transcoder import TopKTranscoder
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


def _mean_and_var(t: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and E||s t - mean||² of the rows of s * t, a block of rows at a time (t may be float16)."""
    n = t.shape[0]
    mean = sum(c.float().sum(0) for c in torch.split(t, 65536)) * s / n
    var = sum((c.float() * s - mean).pow(2).sum() for c in torch.split(t, 65536)) / n
    return mean, var


def _topk_loop(model, train_x: torch.Tensor, train_y: torch.Tensor, k: int, steps: int, batch: int, lr: float,
               g: torch.Generator, desc: str, sx: float = 1.0, sy: float = 1.0, progress: bool = True) -> None:
    """TopK + AuxK training of `model` (an SAE: y = x, inputs centred by b_dec; a transcoder: y = the MLP output).

    Rows are read as float and scaled by sx (inputs) and sy (targets) a batch at a time."""
    d_sae, d_out = model.W_dec.shape
    center = bool(model.cfg.apply_b_dec_to_input)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    dead_after = max(1, 20_000 // batch)  # a latent silent for ~20k tokens counts as dead for AuxK
    k_aux = d_out // 2
    var = _mean_and_var(train_y, sy)[1]
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, train_x.shape[0], (batch,), generator=g)
        x, y = train_x[idx].float() * sx, train_y[idx].float() * sy  # (B, d_in), (B, d_out)
        pre = ((x - model.b_dec) if center else x) @ model.W_enc + model.b_enc  # (B, d_sae)
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        recon = z @ model.W_dec + model.b_dec
        err = y - recon
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
            aux = (za @ model.W_dec - err.detach()).pow(2).sum(-1).mean() / var
            loss = loss + (1 / 32) * min(n_dead / k_aux, 1.0) * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows unit-norm: drop the gradient along each row
            gW = model.W_dec.grad
            gW -= (gW * model.W_dec).sum(-1, keepdim=True) * model.W_dec
        for group in opt.param_groups:  # linear decay over the last 20%
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        opt.step()
        with torch.no_grad():
            model.W_dec.div_(model.W_dec.norm(dim=-1, keepdim=True))
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{mse.item():.3f}", dead=n_dead)
    bar.close()


def _split(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training rows and of the held-out 10%."""
    perm = torch.randperm(n, generator=g)
    n_eval = max(1, n // 10)
    return perm[n_eval:], perm[:n_eval]


def _init_unit_decoder(model, g: torch.Generator) -> None:
    d_sae, d_out = model.W_dec.shape
    w = torch.randn(d_sae, d_out, generator=g)
    model.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))


def _dead_share(encode, chunks: torch.Tensor, d_sae: int) -> float:
    ever = torch.zeros(d_sae, dtype=torch.bool)
    for chunk in torch.split(chunks, 8192):
        ever |= (encode(chunk.float()) > 0).any(0)
    return float((~ever).float().mean())


def train_topk(acts: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
               cfg_base: SAEConfig) -> tuple[TopKSAE, TrainReport]:
    """Train on acts (N, d_in); the last 10% is held out for the report."""
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    tr, ev_idx = _split(acts.shape[0], g)
    train, held = acts[tr], acts[ev_idx]
    scale = math.sqrt(acts.shape[1] / train.pow(2).sum(-1).mean().item())
    train, held = train * scale, held * scale
    d_in = acts.shape[1]
    cfg = SAEConfig(**{**cfg_base.to_dict(), "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k})
    sae = TopKSAE(cfg)
    with torch.no_grad():
        _init_unit_decoder(sae, g)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(train.mean(0))
    _topk_loop(sae, train, train, k, steps, batch, lr, g, "train-sae")
    with torch.no_grad():
        z = sae.encode(held)
        recon = sae.decode(z)
        ev = 1 - (held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        l0 = (z > 0).sum(-1).float().mean()
        dead = _dead_share(sae.encode, torch.cat([held, train[:200_000]]), d_sae)
        sae.fold_scaling_factor(scale)
    report = TrainReport(explained_variance=float(ev), l0=float(l0), dead_share=dead,
                         dead_window_tokens=int(min(train.shape[0], 200_000) + held.shape[0]),
                         train_tokens=int(train.shape[0]), eval_tokens=int(held.shape[0]), steps=steps,
                         seconds=time.time() - t0, scaling_factor=scale)
    return sae, report


@dataclass
class TranscoderReport(TrainReport):
    output_scaling_factor: float = 1.0  # the target's scale (the input's is scaling_factor)
    hook_name: str = ""
    hook_name_out: str = ""


def train_topk_transcoder(x: torch.Tensor, y: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float,
                          seed: int, cfg_base: SAEConfig, progress: bool = True,
                          max_norm_ratio: float | None = None) -> tuple[TopKTranscoder, TranscoderReport]:
    """Train a TopK transcoder from inputs x (N, d_in) to targets y (N, d_out); 10% held out for the report.

    explained_variance is the held-out MLP output's: 1 - Σ||y - f(x)||² / Σ||y - ȳ||².
    max_norm_ratio: leave out training rows whose target norm exceeds this multiple of the median (the rare
    'massive activations' some MLPs write, which otherwise dominate the loss); held-out rows are never dropped."""
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    tr, ev_idx = _split(x.shape[0], g)
    if max_norm_ratio is not None:
        norms = y[tr].float().norm(dim=-1)
        tr = tr[norms <= max_norm_ratio * norms.median()]
    sx = math.sqrt(x.shape[1] / x[tr].float().pow(2).sum(-1).mean().item())
    sy = math.sqrt(y.shape[1] / y[tr].float().pow(2).sum(-1).mean().item())
    train_x, train_y = x[tr], y[tr]  # kept in their storage dtype (float16 for many layers); scaled per batch
    held_x, held_y = x[ev_idx].float() * sx, y[ev_idx].float() * sy
    cfg = SAEConfig(**{**cfg_base.to_dict(), "architecture": "topk_transcoder", "d_in": x.shape[1], "d_sae": d_sae,
                       "k": k, "apply_b_dec_to_input": False})
    tc = TopKTranscoder(cfg)

    with torch.no_grad():
        _init_unit_decoder(tc, g)
        tc.W_enc.copy_(torch.randn(x.shape[1], d_sae, generator=g) / math.sqrt(x.shape[1]))
        tc.b_dec.copy_(_mean_and_var(train_y, sy)[0])
    _topk_loop(tc, train_x, train_y, k, steps, batch, lr, g, "train-transcoder", sx, sy, progress)
    with torch.no_grad():
        z = tc.encode(held_x)
        recon = tc.decode(z)
        ev = 1 - (held_y - recon).pow(2).sum() / (held_y - held_y.mean(0)).pow(2).sum()
        l0 = (z > 0).sum(-1).float().mean()
        window = torch.cat([held_x, train_x[:200_000].float() * sx])
        dead = _dead_share(tc.encode, window, d_sae)
        tc.W_enc.mul_(sx)  # raw input: (x sx) W_enc = x (sx W_enc)
        tc.W_dec.div_(sy)  # raw output: f(x) / sy
        tc.b_dec.div_(sy)
    report = TranscoderReport(explained_variance=float(ev), l0=float(l0), dead_share=dead,
                              dead_window_tokens=int(window.shape[0]), train_tokens=int(train_x.shape[0]),
                              eval_tokens=int(held_x.shape[0]), steps=steps, seconds=time.time() - t0,
                              scaling_factor=sx, output_scaling_factor=sy, hook_name=cfg.hook_name or "",
                              hook_name_out=cfg.hook_name_out or "")
    return tc, report


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


def collect_activations_multi(lm: HookedLM, hooks: list[str], dataset: str, tokens: int, context_len: int,
                              prepend_bos: bool, batch_size: int = 16, dtype: torch.dtype = torch.float32,
                              progress: bool = True) -> dict[str, torch.Tensor]:
    """{hook: (N, d_model)} over the same non-special tokens, every hook from one forward pass per batch.

    `dtype` float16 halves the memory of many layers (training reads the rows back as float32)."""
    n_ctx = max(1, tokens // context_len)
    ctxs = iter_contexts(iter_texts(dataset), lm.tokenizer, context_len, prepend_bos)
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    with tqdm(total=n_ctx * context_len, unit="tok", desc="activations", unit_scale=True, disable=not progress) as bar:
        batch: list[np.ndarray] = []
        for i, ctx in enumerate(ctxs):
            if i >= n_ctx:
                break
            batch.append(ctx)
            if len(batch) == batch_size or i == n_ctx - 1:
                ids = np.stack(batch)
                acts = lm.activations_multi(torch.from_numpy(ids).long(), hooks)  # {hook: (B, T, d)}
                keep = torch.from_numpy(~special_mask(ids, lm.tokenizer))
                for h in hooks:
                    out[h].append(acts[h][keep].to(dtype).cpu())
                bar.update(ids.size)
                batch = []
    if not out[hooks[0]]:
        raise UserError(f"dataset {dataset!r} gave no context of {context_len} tokens")
    return {h: torch.cat(v) for h, v in out.items()}


def _check_transcoder_hooks(lm: HookedLM, hook_in: str, hook_out: str) -> None:
    from .models import parse_hook

    a, b = parse_hook(hook_in, lm.n_layers), parse_hook(hook_out, lm.n_layers)
    if a.kind not in ("hook_mlp_in", "hook_resid_mid") or b.kind != "hook_mlp_out" or a.layer != b.layer:
        raise UserError(f"a transcoder reads blocks.L.hook_mlp_in (or hook_resid_mid) and writes blocks.L.hook_mlp_out "
                        f"of the same layer; got --hook {hook_in} --hook-out {hook_out}")


def _save_transcoder(tc: TopKTranscoder, report: TranscoderReport, out: Path, fp16: bool) -> None:
    save_saelens(tc, out, dtype=torch.float16 if fp16 else torch.float32,
                 extra_meta={"trained_by": "saescope train-sae --hook-out"})
    (out / "training_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")


def train_transcoders(lm: HookedLM, pairs: list[tuple[str, str]], dataset: str, out_dirs: list[Path], tokens: int,
                      context_len: int, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
                      prepend_bos: bool = True, fp16: bool = False, model_label: str | None = None,
                      progress: bool = True) -> list[TranscoderReport]:
    """One TopK transcoder per (hook_in, hook_out) pair; activations of every pair from one pass per batch."""
    for hook_in, hook_out in pairs:
        _check_transcoder_hooks(lm, hook_in, hook_out)
    torch.manual_seed(seed)
    hooks = list(dict.fromkeys(h for pair in pairs for h in pair))
    store = torch.float16 if len(hooks) > 2 else torch.float32
    acts = collect_activations_multi(lm, hooks, dataset, tokens, context_len, prepend_bos, dtype=store,
                                     progress=progress)
    reports = []
    for (hook_in, hook_out), out in zip(pairs, out_dirs):
        base = SAEConfig(architecture="topk_transcoder", d_in=lm.d_model, d_sae=d_sae, hook_name=hook_in,
                         hook_name_out=hook_out, model_name=model_label or lm.name, prepend_bos=prepend_bos,
                         context_size=context_len, dataset_path=dataset, apply_b_dec_to_input=False)
        tc, report = train_topk_transcoder(acts[hook_in], acts[hook_out], d_sae, k, steps, batch, lr, seed, base,
                                           progress)
        _save_transcoder(tc, report, out, fp16)
        log.info("%s -> %s: explained variance %.3f, L0 %.1f, dead %.1f%% (%.0f s)", hook_in, hook_out,
                 report.explained_variance, report.l0, 100 * report.dead_share, report.seconds)
        reports.append(report)
    return reports


def train_transcoder(lm: HookedLM, hook_in: str, hook_out: str, dataset: str, out: Path, tokens: int,
                     context_len: int, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
                     prepend_bos: bool = True, fp16: bool = False, model_label: str | None = None) -> TranscoderReport:
    """`saescope train-sae --hook IN --hook-out OUT`: a TopK transcoder from IN (the MLP's input) to OUT (its output)."""
    return train_transcoders(lm, [(hook_in, hook_out)], dataset, [out], tokens, context_len, d_sae, k, steps, batch,
                             lr, seed, prepend_bos, fp16, model_label)[0]


def train_demo_transcoders(out_root: Path, layers: list[int] | None = None, progress: bool = True) -> list[TranscoderReport]:
    """The embedded default's per-layer transcoders (precompute/data/demo_transcoders), from config.DEMO_TRANSCODERS.

    Regenerate with `python -m saescope.precompute.train` (takes tens of minutes on 2 shared CPU cores)."""
    from .config import DEMO_TRANSCODERS as D, EMBEDDED
    from .embedded import MODEL_ID, resolve_model
    from .models import load_model

    lm = load_model(resolve_model(EMBEDDED.model), "cpu", "float32")
    layers = list(range(lm.n_layers)) if layers is None else layers
    pairs = [(f"blocks.{l}.hook_mlp_in", f"blocks.{l}.hook_mlp_out") for l in layers]
    outs = [out_root / D.folder_name.format(layer=l) for l in layers]
    reports = train_transcoders(lm, pairs, EMBEDDED.dataset, outs, D.tokens, D.context_len, D.d_sae, D.k, D.steps,
                                D.batch, D.lr, D.seed, fp16=True, model_label=MODEL_ID, progress=progress)
    summary = {"model": MODEL_ID, "dataset": EMBEDDED.dataset, "tokens": D.tokens, "d_sae": D.d_sae, "k": D.k,
               "steps": D.steps, "batch": D.batch, "lr": D.lr, "layers": {
                   str(l): {"explained_variance": round(r.explained_variance, 4), "l0": round(r.l0, 2),
                            "dead_share": round(r.dead_share, 4), "seconds": round(r.seconds, 1)}
                   for l, r in zip(layers, reports)}}
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return reports


if __name__ == "__main__":  # regenerate the committed demo transcoders
    import sys

    from .config import EMBEDDED as _E

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _layers = [int(a) for a in sys.argv[1:]] or None
    train_demo_transcoders(_E.transcoder_dir, _layers)
