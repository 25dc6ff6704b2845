"""SAE quality metrics, defined exactly as SAELens's `sae_lens/evals.py` (6.54) and SAEBench's core eval.

On a batch of token contexts (B, T), with `keep` = the positions whose token is not a structural special token
(SAELens's `get_special_token_ids`: the tokenizer's bos/eos/pad/sep/decoder_start ids; additional special tokens
count as text, as in SAELens):

Downstream (three or four full forward passes per batch):
    CE_orig      mean over kept input positions t of -log p(token[t+1] | ..t), the model as is
    CE_sae       the same with the SAE's reconstruction unnorm(decode(encode(x))) spliced in at the hook at the
                 kept positions (special positions keep x), no error term
    CE_ablated   the same with the hook's output zero at every position (special ones included)
    ce_loss_score = (CE_ablated - CE_sae) / (CE_ablated - CE_orig)
    KL_sae, KL_ablated  mean over kept positions of KL(p_orig || p_new), summed over the vocabulary
    kl_div_score = (KL_ablated - KL_sae) / KL_ablated

On the hook activations x of the kept positions (N tokens) and x_hat = unnorm(decode(encode(x))):
    explained_variance = 1 - mean ||x - x_hat||^2 / (mean ||x||^2 - ||mean x||^2)     (sums in float64)
    mse     mean over tokens of ||x - x_hat||^2 (summed over dimensions)
    cossim  mean of cos(x, x_hat);  l2_norm_in/out  mean ||x||, ||x_hat||;  l2_ratio  mean ||x_hat||/||x||
            (||x|| < 1e-4 counted as 1)
    relative_reconstruction_bias = mean ||x_hat||^2 / mean <x, x_hat>    (Gao et al. eq. 10)
    l0, l1  mean over tokens of #(f != 0) and sum |f|
SAEBench core extras, from feature density d_i = (#kept tokens where f_i != 0) / N:
    frac_alive = mean(d > 0); freq_over_1_percent = mean(d > 0.01); freq_over_10_percent = mean(d > 0.1)
    normalized_freq_over_1_percent = sum(d[d > 0.01]) / sum(d) (0 if sum(d) = 0); ..._10_percent alike
    average_max_decoder_cosine_sim = mean_i max_{j != i} cos(W_dec[i], W_dec[j]); ..._encoder_ on W_enc's columns

Differences from SAELens by design: every token of the eval set is one batch for the batch-dependent
relative_reconstruction_bias (SAELens averages it over its sparsity batches, one by default); all metrics use the
same tokens (SAELens draws reconstruction and sparsity batches separately from its activation store). With
several SAEs, each is spliced alone; the original and the zero-ablated passes are shared (per hook).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .models import HookedLM
from .saes import SAE

log = logging.getLogger(__name__)

FORMULA_VERSION = "saelens-6.54-evals+saebench-core/1"
SPECIAL_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
# the stored metrics, in the store's column order (schema.QUALITY lists the same names)
METRICS = (
    "ce_loss_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
    "kl_div_score", "kl_div_with_sae", "kl_div_with_ablation",
    "explained_variance", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias",
    "l0", "l1", "frac_alive", "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
    "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
)


def special_ids(tokenizer) -> list[int]:
    """SAELens's structural special tokens (util.get_special_token_ids): bos/eos/pad/sep/decoder_start ids."""
    return sorted({int(v) for a in SPECIAL_ATTRS if (v := getattr(tokenizer, a, None)) is not None})


def keep_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) True where the token is not a structural special token."""
    sp = torch.tensor(special_ids(tokenizer), dtype=ids.dtype)
    return ~torch.isin(ids, sp) if len(sp) else torch.ones_like(ids, dtype=torch.bool)


def reconstruct(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features f, reconstruction x_hat in the raw space of x) for hook activations x (..., d_in); for a
    transcoder x_hat is its prediction of the MLP output (decoder + skip), not a reconstruction of x."""
    xs = x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    if getattr(sae, "is_transcoder", False):
        z = sae.encode(xs)
        return z, sae.decode(z) + sae.skip(xs)
    z = sae.encode(xs)
    scale, shift = sae.norm_stats(xs)
    return z, sae.decode(z) * scale + shift


def max_cosine_sim(vectors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """vectors (F, d) -> (F,): each row's largest cosine with any OTHER row (SAEBench calculate_max_cosine_sim)."""
    v = torch.nn.functional.normalize(vectors.detach().float().cpu(), p=2, dim=1)
    out = torch.empty(v.shape[0])
    for s in range(0, v.shape[0], chunk):
        sims = v[s:s + chunk] @ v.T  # (c, F)
        idx = torch.arange(sims.shape[0])
        sims[idx, idx + s] = float("-inf")
        out[s:s + chunk] = sims.max(dim=1).values
    return out


WEIGHT_METRICS = ("average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim")


def weight_metrics(sae: SAE) -> dict[str, float]:
    """The metrics that need only the weights (precompute computes them beside the stream, pipeline/weights.py)."""
    return {"average_max_encoder_cosine_sim": float(max_cosine_sim(sae.W_enc.T).mean()),
            "average_max_decoder_cosine_sim": float(max_cosine_sim(sae.W_dec).mean())}


class _Acc:
    """Float64 running sums of one SAE's metrics."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0  # kept tokens (sparsity / variance)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.s = dict.fromkeys(("sq_norm", "sq_resid", "cossim", "norm_in", "norm_out", "ratio", "xhat_sq", "dot",
                                "l0", "l1"), 0.0)
        self.fired = torch.zeros(d_sae, dtype=torch.int64)
        self.ce = self.kl = 0.0
        self.n_ce = self.n_kl = 0

    def add_acts(self, z: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Kept positions only: z (N, d_sae), x and x_hat (N, d_in)."""
        x64, h64 = x.double().cpu(), x_hat.double().cpu()
        s = self.s
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        s["sq_norm"] += float(x64.pow(2).sum())
        s["sq_resid"] += float((x64 - h64).pow(2).sum())
        n_in, n_out = x64.norm(dim=-1), h64.norm(dim=-1)
        s["norm_in"] += float(n_in.sum())
        s["norm_out"] += float(n_out.sum())
        s["ratio"] += float((n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum())
        s["cossim"] += float(((x64 / n_in[:, None]) * (h64 / n_out[:, None])).sum())  # NaN where x_hat = 0, as SAELens
        s["xhat_sq"] += float(n_out.pow(2).sum())
        s["dot"] += float((x64 * h64).sum())
        nz = z != 0
        s["l0"] += float(nz.sum())
        s["l1"] += float(z.abs().double().sum())
        self.fired += nz.sum(0).cpu()

    def result(self, base_ce: float, abl_ce: float, abl_kl: float, sae: SAE,
               from_weights: dict[str, float] | None = None) -> dict[str, float]:
        n, s = max(self.n, 1), self.s
        mse = s["sq_resid"] / n
        total_var = s["sq_norm"] / n - float((self.sum_x / n).pow(2).sum())
        ev = (1.0 if mse < 1e-10 else 0.0) if total_var < 1e-10 else 1.0 - mse / total_var
        ce = self.ce / max(self.n_ce, 1)
        kl = self.kl / max(self.n_kl, 1)
        d = self.fired.double() / n
        tot = float(d.sum())
        out = {
            "ce_loss_without_sae": base_ce, "ce_loss_with_sae": ce, "ce_loss_with_ablation": abl_ce,
            "ce_loss_score": _div(abl_ce - ce, abl_ce - base_ce),
            "kl_div_with_sae": kl, "kl_div_with_ablation": abl_kl, "kl_div_score": _div(abl_kl - kl, abl_kl),
            "explained_variance": ev, "mse": mse, "cossim": s["cossim"] / n,
            "l2_norm_in": s["norm_in"] / n, "l2_norm_out": s["norm_out"] / n, "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": _div(s["xhat_sq"], s["dot"]),
            "l0": s["l0"] / n, "l1": s["l1"] / n,
            "frac_alive": float((d > 0).double().mean()),
            "freq_over_1_percent": float((d > 0.01).double().mean()),
            "freq_over_10_percent": float((d > 0.1).double().mean()),
            "normalized_freq_over_1_percent": float(d[d > 0.01].sum()) / tot if tot > 0 else 0.0,
            "normalized_freq_over_10_percent": float(d[d > 0.1].sum()) / tot if tot > 0 else 0.0,
            **(from_weights if from_weights is not None else weight_metrics(sae)),
        }
        assert tuple(sorted(out)) == tuple(sorted(METRICS))
        return out


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def _ce_per_token(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probabilities, (B, T) ids -> (B, T-1): -log p(ids[t+1]) at input position t (TransformerLens's
    per-token loss)."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]


class _Reference:
    """The original pass's distribution, kept for KL(p_orig || p_new) = sum p_orig log p_orig - sum p_orig log p_new."""

    def __init__(self, logits: torch.Tensor):
        self.logp = torch.log_softmax(logits.float(), dim=-1)
        self.p = self.logp.exp()
        self.neg_entropy = (self.p * self.logp).sum(-1, dtype=torch.float64)  # (B, T), summed in float64

    def kl(self, logp_new: torch.Tensor) -> torch.Tensor:  # (B, T)
        return self.neg_entropy - (self.p * logp_new).sum(-1, dtype=torch.float64)


def _logits(lm: HookedLM, ids: torch.Tensor) -> torch.Tensor:
    return lm.model(input_ids=ids.to(lm.device), use_cache=False).logits


@dataclass
class EvalSAE:
    """One SAE to evaluate and the hook it reads."""

    sae: SAE
    hook: str
    sae_id: str = ""
    from_weights: dict[str, float] | None = None  # weight_metrics(sae) when already computed

    @property
    def out_hook(self) -> str:
        """Where the reconstruction is compared and spliced: the SAE's own hook, or a transcoder's output hook
        (it reads the MLP's input and predicts its output, so its variance and CE scores are of the MLP output)."""
        if getattr(self.sae, "is_transcoder", False):
            return self.sae.cfg.hook_name_out or self.hook
        return self.hook


@torch.no_grad()
def quality_metrics(lm: HookedLM, saes: Sequence[EvalSAE], tokens: np.ndarray | torch.Tensor,
                    batch_size: int = 4, progress: bool = False) -> list[dict[str, Any]]:
    """The metrics of every SAE (each spliced alone) on token contexts (N, T), in the order given.

    Per batch: one original pass (capturing every hook), one zero-ablated pass per distinct hook, one spliced
    pass per SAE, all full forwards to the logits."""
    ids_all = torch.as_tensor(np.asarray(tokens)).long()
    if ids_all.dim() != 2 or ids_all.shape[0] < 1 or ids_all.shape[1] < 2:
        raise UserError(f"quality metrics need token contexts of shape (contexts >= 1, tokens >= 2); got "
                        f"{tuple(ids_all.shape)}")
    for e in saes:
        if lm.hook_width(e.hook) != e.sae.cfg.d_in:
            raise UserError(f"SAE {e.sae_id or e.hook} reads {e.sae.cfg.d_in}-wide vectors; {e.hook} is "
                            f"{lm.hook_width(e.hook)} wide")
        if e.out_hook != e.hook and lm.hook_width(e.out_hook) != int(e.sae.W_dec.shape[-1]):
            raise UserError(f"transcoder {e.sae_id or e.hook} writes {int(e.sae.W_dec.shape[-1])}-wide vectors; "
                            f"{e.out_hook} is {lm.hook_width(e.out_hook)} wide")
    t0 = time.perf_counter()
    captured_hooks = list(dict.fromkeys([e.hook for e in saes] + [e.out_hook for e in saes]))
    hooks = list(dict.fromkeys(e.out_hook for e in saes))  # zero-ablated: where each reconstruction is spliced
    accs = [_Acc(int(e.sae.W_dec.shape[-1]), e.sae.cfg.d_sae) for e in saes]
    base_ce = base_n = 0.0
    abl = {h: [0.0, 0.0, 0, 0] for h in hooks}  # ce sum, kl sum, n_ce, n_kl
    from tqdm import tqdm

    for b0 in tqdm(range(0, ids_all.shape[0], batch_size), desc="quality", unit="batch", disable=not progress):
        ids = ids_all[b0:b0 + batch_size]
        keep = keep_mask(ids, lm.tokenizer)  # (B, T)
        keep_ce = keep[:, :-1]
        captured: dict[str, torch.Tensor] = {}

        def grab(h):
            def fn(x):
                captured[h] = x.detach()
                return x
            return fn

        with ExitStack() as st:
            for h in captured_hooks:
                st.enter_context(lm.hooks({h: grab(h)}))
            logits = _logits(lm, ids)
        ref = _Reference(logits)
        del logits
        ce = _ce_per_token(ref.logp, ids).cpu()
        base_ce += float(ce[keep_ce].double().sum())
        base_n += int(keep_ce.sum())
        for h in hooks:
            with lm.hooks({h: torch.zeros_like}):
                lg = torch.log_softmax(_logits(lm, ids).float(), dim=-1)
            a = abl[h]
            a[0] += float(_ce_per_token(lg, ids).cpu()[keep_ce].double().sum())
            a[1] += float(ref.kl(lg).cpu()[keep].double().sum())
            a[2] += int(keep_ce.sum())
            a[3] += int(keep.sum())
            del lg
        for e, acc in zip(saes, accs):
            x = captured[e.hook]
            z, x_hat = reconstruct(e.sae, x)
            k = keep.to(z.device)
            acc.add_acts(z[k], captured[e.out_hook].to(z)[k], x_hat[k])
            del z, x_hat
            kd = keep.to(x.device)

            if e.out_hook == e.hook:
                def splice(act, sae=e.sae, kd=kd):
                    _, rec = reconstruct(sae, act)
                    return torch.where(kd[..., None], rec.to(device=act.device, dtype=act.dtype), act)
                splices = {e.hook: splice}
            else:  # a transcoder: the MLP's output replaced by its prediction from the MLP's input in this pass
                seen: dict[str, torch.Tensor] = {}

                def read_in(act, seen=seen):
                    seen["x"] = act
                    return act

                def write_out(act, sae=e.sae, kd=kd, seen=seen):
                    _, rec = reconstruct(sae, seen.pop("x"))
                    return torch.where(kd[..., None], rec.to(device=act.device, dtype=act.dtype), act)
                splices = {e.hook: read_in, e.out_hook: write_out}
            with lm.hooks(splices):
                lg = torch.log_softmax(_logits(lm, ids).float(), dim=-1)
            acc.ce += float(_ce_per_token(lg, ids).cpu()[keep_ce].double().sum())
            acc.kl += float(ref.kl(lg).cpu()[keep].double().sum())
            acc.n_ce += int(keep_ce.sum())
            acc.n_kl += int(keep.sum())
            del lg
        del ref, captured
    base = base_ce / max(base_n, 1)
    seconds = time.perf_counter() - t0
    out = []
    for e, acc in zip(saes, accs):
        a = abl[e.out_hook]
        m = acc.result(base, a[0] / max(a[2], 1), a[1] / max(a[3], 1), e.sae, e.from_weights)
        m.update(n_contexts=int(ids_all.shape[0]), context_len=int(ids_all.shape[1]), n_tokens=acc.n,
                 seconds=seconds, formula_version=FORMULA_VERSION)
        out.append(m)
    return out


# ------------------------------------------------------------------ eval tokens and the store
def eval_contexts(dataset: str, text_field: str, tokenizer, context_len: int, prepend_bos: bool, skip: int,
                  n_tokens: int) -> tuple[np.ndarray, int, bool]:
    """The held-out slice: the n_tokens // context_len contexts that follow the first `skip` of the stream.

    Returns (contexts (N, T), index of the first, held_out). When the dataset has fewer contexts, the last N of the
    stream are used instead and held_out is False (they overlap the dashboard's tokens)."""
    from .data import iter_dataset_contexts

    n = max(1, n_tokens // context_len)
    it = iter_dataset_contexts(dataset, text_field, tokenizer, context_len, prepend_bos)
    tail: list[np.ndarray] = []
    total = 0
    for ctx in it:
        tail.append(ctx)
        total += 1
        if len(tail) > n:
            tail.pop(0)
        if total >= skip + n:
            break
    if not tail:
        raise UserError(f"dataset {dataset!r} yields no contexts of {context_len} tokens for the quality metrics")
    first = total - len(tail)
    return np.stack(tail), first, first >= skip


def quality_rows(results: list[dict[str, Any]], saes: Sequence[EvalSAE], dataset: str, first_ctx: int,
                 held_out: bool, lm: HookedLM) -> list[dict[str, Any]]:
    """Rows of the store's quality table (schema.QUALITY) from quality_metrics' results."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for r, e in zip(results, saes):
        row = {"sae_id": e.sae_id, "formula_version": r["formula_version"], "dataset": dataset,
               "first_ctx": first_ctx, "n_contexts": r["n_contexts"], "context_len": r["context_len"],
               "n_tokens": r["n_tokens"], "held_out": held_out, "dtype": str(lm.dtype).removeprefix("torch."),
               "seconds": r["seconds"], "created": now}
        row.update({k: (None if r[k] is None or not math.isfinite(r[k]) else float(r[k])) for k in METRICS})
        rows.append(row)
    return rows


def precompute_quality(lm: HookedLM, saes: Sequence[EvalSAE], dataset: str, text_field: str, context_len: int,
                       prepend_bos: bool, skip: int, n_tokens: int, progress: bool = False) -> list[dict[str, Any]]:
    """Quality rows for the SAEs of a precompute run: the eval slice follows the `skip` streamed contexts.

    The rows' `seconds` include reading (tokenizing) the dataset up to the slice."""
    t0 = time.perf_counter()
    ctx, first, held = eval_contexts(dataset, text_field, lm.tokenizer, context_len, prepend_bos, skip, n_tokens)
    if not held:
        log.warning("the dataset has no contexts left after the %d streamed ones; the quality metrics use the last "
                    "%d streamed contexts (not held out)", skip, len(ctx))
    res = quality_metrics(lm, saes, ctx, progress=progress)
    for r in res:
        r["seconds"] = time.perf_counter() - t0
    for e, r in zip(saes, res):
        log.info("quality of %s on %d tokens: explained variance %.4f, CE loss score %.4f, L0 %.1f (%.1f s)",
                 e.sae_id, r["n_tokens"], r["explained_variance"], r["ce_loss_score"], r["l0"], r["seconds"])
    return quality_rows(res, saes, dataset, first, held, lm)


def quality_for_run(a, lm: HookedLM, loaded: Sequence[Any], prepend_bos: bool, n_streamed: int,
                    from_weights: Sequence[dict[str, float] | None] | None = None) -> list[dict[str, Any]]:
    """precompute's one call: a = PrecomputeArgs (dataset, text_field, context_len, eval_tokens, progress), loaded =
    its SAEs (objects with .sae, .hook, .sae_id); the eval slice follows the n_streamed contexts. from_weights: per
    SAE its weight_metrics, when computed beside the stream."""
    fw = list(from_weights) if from_weights is not None else [None] * len(loaded)
    saes = [EvalSAE(x.sae, x.hook, x.sae_id, w) for x, w in zip(loaded, fw)]
    return precompute_quality(lm, saes, a.dataset, a.text_field, a.context_len, prepend_bos, n_streamed,
                              a.eval_tokens, a.progress)


def evaluate_store(store_path: Path, model: str | None = None, sae_ids: Sequence[str] | None = None,
                   eval_tokens: int | None = None, device: str = "auto", dtype: str = "auto",
                   progress: bool = True, lm: HookedLM | None = None) -> list[dict[str, Any]]:
    """`saescope eval STORE`: recompute the quality metrics of a store's SAEs (all, or sae_ids) and write them.

    The model, SAE files, dataset, context length and BOS setting are those the store records; the eval slice
    follows the streamed contexts as at precompute."""
    from .config import PRECOMPUTE
    from .models import load_model
    from .saes import load_sae
    from .store import Store
    from .store.write import write_quality

    store_path = Path(store_path)
    with Store(store_path) as st:
        infos = st.saes()
        if sae_ids:
            infos = [st.require_sae(s) for s in sae_ids]
    if not infos:
        raise UserError(f"{store_path} holds no SAEs to evaluate")
    models = {i.model_path for i in infos}
    if model is None and len(models) > 1:
        raise UserError(f"the SAEs of {store_path} come from different models ({', '.join(sorted(models))}); "
                        "evaluate them one model at a time with --sae-id")
    if lm is None:
        lm = load_model(model or infos[0].model_path, device, dtype)
    rows = []
    groups = itertools.groupby(sorted(infos, key=lambda i: (i.dataset, i.context_len, i.prepend_bos, i.n_contexts)),
                               key=lambda i: (i.dataset, i.context_len, i.prepend_bos, i.n_contexts))
    for (dataset, context_len, prepend, n_ctx), grp in groups:
        grp = list(grp)
        saes = []
        for i in grp:
            sae = load_sae(i.sae_path, i.hook)
            sae.to(lm.device)
            saes.append(EvalSAE(sae, i.hook, i.sae_id))
        n = eval_tokens if eval_tokens is not None else PRECOMPUTE.eval_tokens
        rows += precompute_quality(lm, saes, dataset, (grp[0].params or {}).get("text_field", PRECOMPUTE.text_field),
                                   context_len, bool(prepend), n_ctx, n, progress)
    write_quality(store_path, rows)
    return rows

