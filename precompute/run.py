"""`saescope precompute`: one streaming pass, all features at once, crash-safe and resumable.

Per batch: forward to the hook (stopping early), encode, zero the special-token positions, and append the
nonzero activations to the work cache (sparse, one transaction per batch). Nothing per feature happens in
Python and no dense (tokens x features) matrix outlives its batch. After the stream, exact SQL over the cache
yields top examples, interval and quantile samples and histograms; logit effects and neighbours come from
the weights in chunks; the store is published atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .config import DEFAULT, EMBEDDED, PRECOMPUTE
from .data import iter_contexts, iter_texts, special_mask
from .encode import encode_batch
from .embedded import MODEL_ID, resolve_model, resolve_sae
from .logits import LOGIT_METHOD, logit_effects, nearest_features
from .models import HookedLM, load_model
from .saes import SAE, load_sae
from .store.write import ActivationCache, StoreBuilder
from .tokens import token_strings

log = logging.getLogger(__name__)
E, P = EMBEDDED, PRECOMPUTE


@dataclass
class PrecomputeArgs:
    out: Path
    model: str = E.model
    sae: str = E.sae
    hook: str | None = None
    dataset: str = E.dataset
    text_field: str = P.text_field
    tokens: int = P.tokens
    context_len: int = P.context_len
    batch_size: int = P.batch_size
    prepend_bos: str = P.prepend_bos
    top_k: int = P.top_k
    sae_id: str | None = None
    restart: bool = False
    device: str = P.device
    dtype: str = P.dtype
    n_intervals: int = P.n_intervals
    per_interval: int = P.per_interval
    n_quantiles: int = P.n_quantiles
    per_quantile: int = P.per_quantile
    hist_bins: int = P.hist_bins
    memory_limit: str = P.memory_limit
    progress: bool = True
    stop_after_batches: int | None = field(default=None, repr=False)  # tests: simulate an interrupted run
    timings: dict = field(default_factory=dict, repr=False)  # filled in: load/stream/publish seconds

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "PrecomputeArgs":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(ns).items() if k in names})


def default_sae_id(model_label: str, hook: str, sae: SAE) -> str:
    base = f"{model_label.rstrip('/').split('/')[-1]}-{hook.removeprefix('blocks.')}-{sae.cfg.architecture}-{sae.cfg.d_sae}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).lower()


def _batches(it, n_ctx: int, skip: int, batch_size: int):
    ctxs = itertools.islice(it, skip, n_ctx)
    while True:
        chunk = list(itertools.islice(ctxs, batch_size))
        if not chunk:
            return
        yield np.stack(chunk)


def run_precompute(a: PrecomputeArgs) -> Path:
    t_start = time.time()
    sae = load_sae(resolve_sae(a.sae), a.hook)  # the cheaper check first: a bad SAE fails before the model loads
    model_path = resolve_model(a.model)
    lm = load_model(model_path, a.device, a.dtype)
    sae.to(lm.device)
    hook = sae.cfg.hook_name
    width = lm.hook_width(hook)
    if sae.cfg.d_in != width:
        raise ValueError(f"SAE {a.sae!r} reads vectors of width d_in={sae.cfg.d_in}, but {hook} of model {a.model!r} "
                         f"has width {width}; pick the SAE trained on this model, or the model it was trained on")
    prepend = sae.cfg.prepend_bos if a.prepend_bos == "auto" else a.prepend_bos == "yes"
    n_ctx = a.tokens // a.context_len
    if n_ctx < 1:
        raise ValueError(f"--tokens {a.tokens} is less than one context of {a.context_len} tokens")
    model_label = MODEL_ID if a.model == DEFAULT else a.model
    sae_id = a.sae_id or default_sae_id(model_label, hook, sae)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sae_id):
        raise ValueError(f"--sae-id {sae_id!r} may only hold letters, digits, '.', '_' and '-'")
    work = a.out.with_name(a.out.name + ".work")
    fingerprint = {"model": model_path, "sae": str(resolve_sae(a.sae)), "hook": hook, "dataset": a.dataset,
                   "text_field": a.text_field, "contexts": n_ctx, "context_len": a.context_len,
                   "batch_size": a.batch_size, "prepend_bos": prepend, "device": lm.device, "dtype": str(lm.dtype)}
    cache = ActivationCache(work / "cache.duckdb", fingerprint, restart=a.restart)
    t_loaded = time.time()
    done = cache.contexts_done
    if done:
        log.info("resuming: %d of %d contexts already done", done, n_ctx)
    contexts = iter_contexts(iter_texts(a.dataset, a.text_field), lm.tokenizer, a.context_len, prepend)
    bar = tqdm(total=n_ctx * a.context_len, initial=done * a.context_len, unit="tok", unit_scale=True,
               desc="precompute", disable=not a.progress, smoothing=0.1)
    n_batches = 0
    try:
        for ids in _batches(contexts, n_ctx, done, a.batch_size):
            special = special_mask(ids, lm.tokenizer)  # (B, T), computed once per batch
            z = encode_batch(lm, sae, ids, hook, special=special)  # (B, T, d_sae)
            b, t, f = torch.nonzero(z, as_tuple=True)
            vals = z[b, t, f].float().cpu().numpy()
            counted = (~special).sum(1).astype(np.int32)
            cache.append(done, ids, counted, (b.cpu().numpy() + done).astype(np.int32), t.cpu().numpy(),
                         f.cpu().numpy(), vals)
            done += ids.shape[0]
            bar.update(ids.size)
            n_batches += 1
            if a.stop_after_batches is not None and n_batches >= a.stop_after_batches:
                raise KeyboardInterrupt  # the same path a Ctrl-C or kill takes: committed batches stay
    finally:
        bar.close()
        cache.close()
    if done < n_ctx:
        log.warning("the dataset ran out after %d contexts (%d tokens); asked for %d", done, done * a.context_len, n_ctx)
    t_stream = time.time()
    _publish(a, lm, sae, sae_id, model_label, model_path, work / "cache.duckdb", prepend, hook)
    shutil.rmtree(work, ignore_errors=True)
    t_end = time.time()
    a.timings.update(load=t_loaded - t_start, stream=t_stream - t_loaded, publish=t_end - t_stream, tokens=done * a.context_len)
    log.info("stored %s in %s (load %.0f s, stream %.0f s, tables %.0f s)", sae_id, a.out, t_loaded - t_start,
             t_stream - t_loaded, t_end - t_stream)
    return a.out


def _publish(a: PrecomputeArgs, lm: HookedLM, sae: SAE, sae_id: str, model_label: str, model_path: str,
             cache: Path, prepend: bool, hook: str) -> None:
    log.info("building per-feature tables (exact SQL over the activation cache)")
    builder = StoreBuilder(a.out, a.memory_limit)
    try:
        builder.replace_sae(sae_id)
        model_key = model_label
        builder.put_vocab(model_key, token_strings(lm.tokenizer))
        stats = builder.examples_from_cache(cache, sae_id, sae.cfg.d_sae, a.context_len, a.top_k, a.n_intervals,
                                            a.per_interval, a.n_quantiles, a.per_quantile, a.hist_bins)
        W_dec = sae.W_dec.detach().cpu()
        if sae.cfg.normalize_activations != "none":
            log.info("the SAE normalizes its input; logit effects use the raw decoder directions")
        logits = logit_effects(W_dec, lm.unembedding().cpu(), lm.final_norm_gain(), n=P.n_logits)
        neighbours = nearest_features(W_dec, n=P.n_neighbours)
        builder.put_features(sae_id, stats, logits, neighbours)
        density = stats["n"] / max(1, stats["n_counted"])
        live = density[density > 0]
        edges = (-7.0, 0.0)
        hist = np.histogram(np.log10(live), bins=30, range=edges)[0] if len(live) else np.zeros(30, int)
        builder.put_sae({
            "sae_id": sae_id, "model_id": model_label, "model_path": model_path, "model_key": model_label,
            "sae_path": str(resolve_sae(a.sae)), "hook": hook, "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dataset": a.dataset,
            "n_tokens": stats["n_ctx"] * a.context_len, "n_contexts": stats["n_ctx"], "n_counted": stats["n_counted"],
            "context_len": a.context_len, "prepend_bos": prepend, "config": sae.cfg.to_dict(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "saescope_version": __version__, "logit_method": LOGIT_METHOD,
            "dead_share": float((density == 0).mean()), "density_hist": [int(x) for x in hist],
            "density_hist_lo": edges[0], "density_hist_hi": edges[1],
            "params": {"top_k": a.top_k, "n_intervals": a.n_intervals, "per_interval": a.per_interval,
                                  "n_quantiles": a.n_quantiles, "per_quantile": a.per_quantile,
                                  "hist_bins": a.hist_bins, "device": lm.device, "dtype": str(lm.dtype),
                                  "special_tokens_excluded": True,
                                  "special_token_ids": sorted(int(i) for i in lm.tokenizer.all_special_ids)},
        })
        builder.publish()
    except BaseException:
        builder.abort()
        raise
