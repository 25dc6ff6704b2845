"""Publishing: the built feature ranges, the weights-only tables (logit effects, neighbours and the feature map from
weights.py, computed beside the stream; cross-SAE matches), co-occurrence and the provenance row of every SAE, assembled by StoreBuilder into OUT.tmp and
renamed over OUT only when complete (after the fp32 spot check of a few contexts)."""

from __future__ import annotations

import datetime as dt
import logging
import time

import numpy as np
import torch

from .. import __version__
from ..config import PRECOMPUTE
from ..cooccur import cooccurrence_from_chunks  # at import: its kernels' cache folder is numba's default (featuremap.cache_umap_jit)
from ..logits import LOGIT_METHOD
from ..models import HookedLM, load_model
from ..store.write import FeatureStats, StoreBuilder, read_active
from ..tokens import token_strings
from .executors import LoadedRun
from .loading import LoadedSAE
from .spec import PrecomputeSpec
from .tables import RangeJob, peak_rss, release_memory
from .weights import WeightsWork
from .workdir import WorkDir

log = logging.getLogger(__name__)
P = PRECOMPUTE


def publish(spec: PrecomputeSpec, run: LoadedRun, model_label: str, model_path: str, work: WorkDir,
            jobs: list[RangeJob], prepend: bool, weights: WeightsWork, phases: dict[str, float] | None = None) -> None:
    """Write the store from the built ranges (jobs) and the weights-only tables (computed beside the stream by
    `weights`: waits for them); atomically replaces spec.out. phases: filled with seconds per step (benchmarks)."""
    lm, loaded = run.lm, run.saes
    phases = {} if phases is None else phases
    builder = StoreBuilder(spec.out, spec.memory_limit, temp_dir=work.root / "spill")
    try:
        builder.put_vocab(model_label, token_strings(lm.tokenizer))
        # first what needs only the stream's output, while the background threads go on (the map started with
        # the ranges; logit effects beside the stream or at its end), then what needs their results
        activation = [_activation_tables(spec, builder, x, i, work, [j for j in jobs if j.i == i], phases)
                      for i, x in enumerate(loaded)]
        if spec.eval_tokens > 0:  # SAE quality metrics on the held-out tokens after the stream (precompute/quality.py)
            from ..quality import quality_for_run

            t = time.perf_counter()
            weight_metrics = weights.quality_from_weights()  # in the weights thread, after the logit effects
            phases["wait_logits"] = time.perf_counter() - t
            builder.put_quality(quality_for_run(spec, lm, loaded, prepend, spec.tokens // spec.context_len,
                                                weight_metrics))
            release_memory()
            phases["quality"] = time.perf_counter() - t
        t = time.perf_counter()
        from_weights = weights.logits()
        phases["wait_logits"] = phases.get("wait_logits", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        maps = weights.maps() if spec.feature_map else None
        phases["wait_map"] = time.perf_counter() - t
        for i, (x, (logits, neighbours), (stats, cooc)) in enumerate(zip(loaded, from_weights, activation)):
            _feature_rows(spec, builder, lm, x, model_label, model_path, prepend, stats, cooc, logits, neighbours,
                          maps[i] if maps is not None else None, phases)
        t = time.perf_counter()
        _cross_matches(builder, loaded)
        phases["cross"] = time.perf_counter() - t
        t = time.perf_counter()
        if spec.verify_sample > 0:
            _verify_before_publish(spec, builder, lm, loaded, model_path)
        phases["verify"] = time.perf_counter() - t
        t = time.perf_counter()
        builder.publish()
        phases["write"] = time.perf_counter() - t
    except BaseException:
        builder.abort()
        raise


def _cross_matches(builder: StoreBuilder, loaded: list[LoadedSAE], n: int = 5) -> None:
    """For every pair of this run's SAEs of the same width: each feature's nearest decoder directions in the other."""
    from ..compare import nearest_across

    for x in loaded:
        for y in loaded:
            if x is not y and x.sae.cfg.d_in == y.sae.cfg.d_in:
                m = nearest_across(x.sae.W_dec.detach().cpu().float(), y.sae.W_dec.detach().cpu().float(), n=n)
                builder.put_cross(x.sae_id, y.sae_id, np.asarray(m.ids), np.asarray(m.cos))


def _activation_tables(spec: PrecomputeSpec, builder: StoreBuilder, x: LoadedSAE, i: int, work: WorkDir,
                       jobs: list[RangeJob], phases: dict[str, float]) -> tuple[FeatureStats, tuple | None]:
    """One SAE's rows that come from its activations: the built ranges and their contexts, and co-occurrence;
    returns its per-feature statistics and co-occurrence for _feature_rows."""
    sae_id, d_sae = x.sae_id, x.sae.cfg.d_sae
    t = time.perf_counter()
    builder.replace_sae(sae_id)
    stats = FeatureStats.empty(d_sae, spec.hist_bins)
    for job in jobs:  # ranges ascend: rows go in sorted by feature (zone maps serve the pages)
        builder.put_range(sae_id, job.folder, stats)
    stats.n_ctx, stats.n_counted = builder.put_contexts(sae_id, work.context_files(), stats.used_contexts())
    phases["put_ranges"] = phases.get("put_ranges", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    cooc = None
    if spec.cooccurrence:
        read = read_active(work.all_act_files(i), spec.context_len, spec.memory_limit, work.root / "spill")
        c = cooccurrence_from_chunks(read, stats.n_ctx * spec.context_len, d_sae, n=P.n_neighbours,
                                     temp_dir=work.root)
        cooc = (c.ids, c.jaccard)
        del c, read
        release_memory()  # co-occurrence's worker threads' arenas, before quality's forward passes
        log.info("co-occurrence of %s done (peak memory so far %s)", sae_id, peak_rss())
    phases["cooccurrence"] = phases.get("cooccurrence", 0.0) + time.perf_counter() - t
    return stats, cooc


def _feature_rows(spec: PrecomputeSpec, builder: StoreBuilder, lm: HookedLM, x: LoadedSAE, model_label: str,
                  model_path: str, prepend: bool, stats: FeatureStats, cooc: tuple | None,
                  logits: dict[str, np.ndarray], neighbours: tuple[np.ndarray, np.ndarray],
                  coords: np.ndarray | None, phases: dict[str, float]) -> None:
    """One SAE's features rows (activation statistics, logit effects, neighbours, co-occurrence, map) and saes row."""
    sae, sae_id = x.sae, x.sae_id
    t = time.perf_counter()
    builder.put_features(sae_id, stats, logits, neighbours, cooc, coords)
    density = stats.n / max(1, stats.n_counted)
    live = density[density > 0]
    edges = (-7.0, 0.0)
    hist = np.histogram(np.log10(live), bins=30, range=edges)[0] if len(live) else np.zeros(30, int)
    builder.put_sae({
        "sae_id": sae_id, "model_id": model_label, "model_path": model_path, "model_key": model_label,
        "sae_path": x.path, "hook": x.hook, "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dataset": spec.dataset,
        "n_tokens": stats.n_ctx * spec.context_len, "n_contexts": stats.n_ctx, "n_counted": stats.n_counted,
        "context_len": spec.context_len, "prepend_bos": prepend, "config": sae.cfg.to_dict(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "saescope_version": __version__, "logit_method": LOGIT_METHOD,
        "dead_share": float((density == 0).mean()), "density_hist": [int(v) for v in hist],
        "density_hist_lo": edges[0], "density_hist_hi": edges[1],
        "params": {"top_k": spec.top_k, "n_intervals": spec.n_intervals, "per_interval": spec.per_interval,
                   "n_quantiles": spec.n_quantiles, "per_quantile": spec.per_quantile,
                   "hist_bins": spec.hist_bins, "device": lm.device, "dtype": str(lm.dtype),
                   "special_tokens_excluded": True,
                   "special_token_ids": sorted(int(t) for t in lm.tokenizer.all_special_ids)},
        "verify": None,
    })
    phases["put_features"] = phases.get("put_features", 0.0) + time.perf_counter() - t


def _verify_before_publish(spec: PrecomputeSpec, builder: StoreBuilder, lm: HookedLM, loaded: list[LoadedSAE],
                           model_path: str) -> None:
    """Re-encode a few stored contexts with the fp32 reference path and record the result in the saes rows."""
    from ..verify import reference_copy, verify_sample

    ref_lm = lm if lm.device == "cpu" and lm.dtype == torch.float32 else load_model(model_path, "cpu", "float32")
    for x in loaded:
        ref_sae = reference_copy(x.sae)
        result = verify_sample(builder, ref_lm, ref_sae, x.sae_id, x.hook, spec.verify_sample)  # command names {store}
        del result["date"]  # it ran while the tables were built: the reader reports the row's `created` as its date
        builder.set_verify(x.sae_id, result)
        log.info("verified %s: %s = %.2g (%s); %d contexts, %d positions, %d zero/nonzero mismatches", x.sae_id,
                 result["metric"], result[result["metric"]], result["bound"], result["contexts"], result["positions"],
                 result["mismatches"])
