"""`saescope diff`: what changed between two versions of a model (same architecture), seen through one SAE.

One pass over the same token contexts with each model: at every batch both models read the same ids, their
activations at the SAE's hook go through `encode.encode_activations` (the precompute path), and per feature we
accumulate, for A and B, the active-token count, the activation sum and max, and the contexts where the two differ
most (max over positions of |z_B - z_A|, the top n kept with both rows of activations). Special tokens count for
nothing, as in a store. The SAE's reconstruction quality on each model's activations, in the SAE's input space
(after its normalisation, where it was trained):

    MSE = mean over counted tokens and dimensions of (x - decode(encode(x)))^2
    explained variance = 1 - sum ||x - decode(encode(x))||^2 / sum ||x - mean(x)||^2

Per feature, with N the counted tokens: density = n_active / N, mean = sum / n_active (when active, as a store's
mean_act), max; the ranking score is the change of the feature's mean activation per token, (sum_B - sum_A) / N:
it moves with both how often and how strongly the feature fires. `up` ranks the largest increases, `down` the
largest decreases.

Output: a folder (not a store table: a diff is one comparison of two models that no store owns, small, read whole
by its page and by the HTML report; a folder of JSON + Parquet + CSV needs no schema version and opens in any tool):

    diff.json          models (paths, file hashes), SAE, dataset, tokens, quality of each side, warnings, rankings
    features.parquet   one row per feature (density/mean/max of A and B, their changes, the score)
    features.csv       the same, for a spreadsheet
    examples.json      for each ranked feature: its top differing contexts, tokens and A/B activations per token
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import DIFF
from .data import iter_dataset_contexts, special_mask
from .embedded import resolve_model, resolve_sae
from .encode import encode_activations
from .errors import UserError
from .models import HookedLM, load_model
from .saes import SAE, load_sae

log = logging.getLogger(__name__)

FEATURE_COLUMNS = ("feature", "density_a", "density_b", "d_density", "mean_a", "mean_b", "d_mean", "max_a", "max_b",
                   "d_max", "n_active_a", "n_active_b", "score")


@dataclass
class DiffArgs:
    model_a: str
    model_b: str
    sae: str
    out: Path
    hook: str | None = None
    dataset: str = "default"
    text_field: str = "text"
    tokens: int = DIFF.tokens
    context_len: int = DIFF.context_len
    batch_size: int = DIFF.batch_size
    n_examples: int = DIFF.n_examples
    n_rank: int = DIFF.n_rank
    force: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


class DiffAccumulator:
    """Per-feature sums over batches of (z_A, z_B) and the SAE's reconstruction error on each side."""

    def __init__(self, d_sae: int, d_in: int, context_len: int, n_examples: int):
        self.n_counted = 0
        self.n_active = np.zeros((2, d_sae), np.int64)
        self.sum = np.zeros((2, d_sae), np.float64)
        self.max = np.zeros((2, d_sae), np.float64)
        self.err2 = np.zeros(2)  # sum of squared reconstruction errors
        self.x_sum = np.zeros((2, d_in))
        self.x2_sum = np.zeros((2, d_in))
        k, T = n_examples, context_len
        self.best = torch.full((k, d_sae), -1.0)  # |z_B - z_A| max over a context, top k per feature
        self.best_ctx = torch.full((k, d_sae), -1, dtype=torch.long)
        self.best_a = torch.zeros((k, d_sae, T))
        self.best_b = torch.zeros((k, d_sae, T))

    def add(self, side: int, sae: SAE, x: torch.Tensor, counted: torch.Tensor) -> None:
        """Reconstruction quality of one side: x (B, T, d_in) raw activations, counted (B, T) bool."""
        with torch.no_grad():
            xs = x.to(sae.W_enc.dtype)
            xn = sae.normalize(xs)[counted].double()  # (N, d_in) in the SAE's input space
            rec = sae.decode(sae.encode(xs))[counted].double()
        self.err2[side] += float((xn - rec).pow(2).sum())
        self.x_sum[side] += xn.sum(0).numpy()
        self.x2_sum[side] += xn.pow(2).sum(0).numpy()

    def add_features(self, za: torch.Tensor, zb: torch.Tensor, counted: torch.Tensor, first_ctx: int) -> None:
        """za, zb (B, T, d_sae) with special positions already zeroed; counted (B, T)."""
        self.n_counted += int(counted.sum())
        for side, z in ((0, za), (1, zb)):
            zd = z.double()
            self.n_active[side] += (z > 0).sum((0, 1)).numpy()
            self.sum[side] += zd.sum((0, 1)).numpy()
            self.max[side] = np.maximum(self.max[side], zd.amax((0, 1)).numpy())
        B, T, d = za.shape
        score = (zb - za).abs().amax(1).float()  # (B, d_sae)
        k = self.best.shape[0]
        cand = torch.cat([self.best, score])  # (k + B, d)
        ctx = torch.cat([self.best_ctx, (first_ctx + torch.arange(B))[:, None].expand(B, d)])
        top = cand.topk(k, dim=0, sorted=True)
        idx = top.indices  # (k, d)
        pad = self.best_a.shape[2]
        za_t = torch.zeros((B, d, pad))
        zb_t = torch.zeros((B, d, pad))
        za_t[:, :, :T] = za.permute(0, 2, 1).float()
        zb_t[:, :, :T] = zb.permute(0, 2, 1).float()
        g = idx[:, :, None].expand(k, d, pad)
        self.best_a = torch.cat([self.best_a, za_t]).gather(0, g)
        self.best_b = torch.cat([self.best_b, zb_t]).gather(0, g)
        self.best_ctx = ctx.gather(0, idx)
        self.best = top.values

    def quality(self, side: int) -> dict[str, float]:
        n, d = self.n_counted, self.x_sum.shape[1]
        var = float((self.x2_sum[side] - self.x_sum[side] ** 2 / max(n, 1)).sum())
        return {"mse": self.err2[side] / max(n * d, 1), "explained_variance": 1.0 - self.err2[side] / var if var > 0 else float("nan")}

    def table(self) -> dict[str, np.ndarray]:
        N = max(self.n_counted, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.n_active > 0, self.sum / np.maximum(self.n_active, 1), 0.0)
        dens = self.n_active / N
        return {"feature": np.arange(self.sum.shape[1]), "density_a": dens[0], "density_b": dens[1],
                "d_density": dens[1] - dens[0], "mean_a": mean[0], "mean_b": mean[1], "d_mean": mean[1] - mean[0],
                "max_a": self.max[0], "max_b": self.max[1], "d_max": self.max[1] - self.max[0],
                "n_active_a": self.n_active[0], "n_active_b": self.n_active[1], "score": (self.sum[1] - self.sum[0]) / N}


def rank(score: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Features with the largest increase and the largest decrease of the score (only those that moved)."""
    order = np.argsort(-score, kind="stable")
    up = [int(i) for i in order[:n] if score[i] > 0]
    down = [int(i) for i in np.argsort(score, kind="stable")[:n] if score[i] < 0]
    return up, down


def _check_pair(a: HookedLM, b: HookedLM, sae: SAE, hook: str) -> None:
    for lm in (a, b):
        if lm.hook_width(hook) != sae.cfg.d_in:
            raise UserError(f"the SAE reads {sae.cfg.d_in}-wide activations but {hook} of {lm.name} is "
                            f"{lm.hook_width(hook)} wide; diff two versions of the model the SAE was trained on")
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        raise UserError(f"{a.name} and {b.name} have different tokenizers ({len(va):,} and {len(vb):,} tokens); a diff "
                        "reads the same token ids with both, so give two versions of one model")
    if a.n_layers != b.n_layers:
        raise UserError(f"{a.name} has {a.n_layers} layers and {b.name} {b.n_layers}: not the same architecture")


def run_diff(a: DiffArgs) -> dict[str, Any]:
    t0 = time.perf_counter()
    from .checks.run import HASHED_MODEL_FILES, hash_path
    from tqdm.auto import tqdm

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")
    n_ctx = a.tokens // a.context_len
    if n_ctx < 1:
        raise UserError(f"--tokens {a.tokens} is less than one context of {a.context_len} tokens")
    sae_path = resolve_sae(a.sae)
    sae = load_sae(sae_path, a.hook).float()
    hook = sae.cfg.hook_name
    pa, pb = resolve_model(a.model_a), resolve_model(a.model_b)
    lm_a, lm_b = load_model(pa, a.device, a.dtype), load_model(pb, a.device, a.dtype)
    _check_pair(lm_a, lm_b, sae, hook)
    sae.to(lm_a.device)
    acc = DiffAccumulator(sae.cfg.d_sae, sae.cfg.d_in, a.context_len, a.n_examples)
    contexts = iter_dataset_contexts(a.dataset, a.text_field, lm_a.tokenizer, a.context_len, sae.cfg.prepend_bos)
    all_ids: list[np.ndarray] = []
    bar = tqdm(total=n_ctx * a.context_len, unit="tok", desc="diff", disable=not a.progress)
    batch: list[np.ndarray] = []

    def flush() -> None:
        ids = np.stack(batch)  # (B, T)
        special = torch.from_numpy(special_mask(ids, lm_a.tokenizer))
        t = torch.from_numpy(ids).long()
        xa, xb = lm_a.activations(t, hook), lm_b.activations(t, hook)  # (B, T, d_in) each
        counted = ~special
        acc.add(0, sae, xa, counted)
        acc.add(1, sae, xb, counted)
        za = encode_activations(sae, xa, special).cpu()
        zb = encode_activations(sae, xb, special).cpu()
        acc.add_features(za, zb, counted, len(all_ids))
        all_ids.extend(batch)
        bar.update(ids.size)
        batch.clear()

    for ctx in contexts:
        batch.append(ctx)
        if len(batch) == a.batch_size:
            flush()
        if len(all_ids) + len(batch) >= n_ctx:
            break
    if batch:
        flush()
    bar.close()
    if not all_ids:
        raise UserError(f"the dataset {a.dataset!r} gave no context of {a.context_len} tokens")
    table = acc.table()
    up, down = rank(table["score"], a.n_rank)
    qa, qb = acc.quality(0), acc.quality(1)
    warnings = []
    if qa["explained_variance"] - qb["explained_variance"] > DIFF.worse_ev:
        warnings.append(f"the SAE explains {qb['explained_variance']:.3f} of the variance of model B's activations "
                        f"against {qa['explained_variance']:.3f} of model A's: B has moved off the distribution the "
                        "SAE was trained on, so its features describe B less faithfully (read the changes with care)")
    tok = lm_a.tokenizer
    examples = {}
    for f in dict.fromkeys(up + down):
        rows = []
        for j in range(a.n_examples):
            c = int(acc.best_ctx[j, f])
            if c < 0 or float(acc.best[j, f]) <= 0:
                continue
            ids = all_ids[c]
            T = len(ids)
            act_a, act_b = acc.best_a[j, f, :T].tolist(), acc.best_b[j, f, :T].tolist()
            pos = int(np.argmax(np.abs(np.asarray(act_b) - np.asarray(act_a))))
            rows.append({"ctx": c, "pos": pos, "diff": float(acc.best[j, f]), "tokens": [tok.decode([i]) for i in ids.tolist()],
                         "token_ids": ids.tolist(), "acts_a": act_a, "acts_b": act_b})
        examples[str(f)] = rows
    meta = {
        "saescope_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_a": {**hash_path(pa, HASHED_MODEL_FILES), "name": a.model_a},
        "model_b": {**hash_path(pb, HASHED_MODEL_FILES), "name": a.model_b},
        "sae": {**hash_path(sae_path), "hook": hook, "d_sae": sae.cfg.d_sae, "architecture": sae.cfg.architecture},
        "dataset": a.dataset, "n_contexts": len(all_ids), "context_len": a.context_len, "n_tokens": len(all_ids) * a.context_len,
        "n_counted": acc.n_counted, "quality": {"a": qa, "b": qb}, "warnings": warnings,
        "score": "(sum of B's activations - sum of A's) / counted tokens", "up": up, "down": down,
        "seconds": time.perf_counter() - t0,
    }
    _write(out, meta, table, examples, a.force)
    return meta


def _write(out: Path, meta: dict, table: dict[str, np.ndarray], examples: dict, force: bool) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t = pa.table({c: table[c] for c in FEATURE_COLUMNS})
    pq.write_table(t, tmp / "features.parquet")
    pcsv.write_csv(t, tmp / "features.csv")
    (tmp / "examples.json").write_text(json.dumps(examples, ensure_ascii=False))
    (tmp / "diff.json").write_text(json.dumps(_finite(meta), indent=1, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


@dataclass
class Diff:
    """A diff folder read back (for its page and the HTML report)."""

    path: Path
    meta: dict[str, Any]
    features: dict[str, np.ndarray]
    examples: dict[str, list[dict[str, Any]]]

    def row(self, f: int) -> dict[str, float]:
        return {c: self.features[c][f].item() for c in FEATURE_COLUMNS}


def read_diff(path: Path | str) -> Diff:
    import pyarrow.parquet as pq

    path = Path(path)
    if not (path / "diff.json").is_file():
        raise UserError(f"{path} is not a diff folder (no diff.json); make one with `saescope diff --out {path}`")
    meta = json.loads((path / "diff.json").read_text())
    t = pq.read_table(path / "features.parquet")
    feats = {c: t.column(c).to_numpy() for c in FEATURE_COLUMNS}
    ex = json.loads((path / "examples.json").read_text())
    return Diff(path, meta, feats, ex)
