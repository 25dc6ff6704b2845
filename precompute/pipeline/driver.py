"""`run_precompute(spec)`: one streaming pass, all features at once, crash-safe and resumable.

load (loading.py) -> plan and open OUT.work/ (workdir.py) -> stream every shard (stream.py, through the executor)
-> build every feature range's tables (tables.py, through the executor) -> publish the store (publish.py).
The weights-only tables (weights.py) run in background threads meanwhile: logit effects and neighbours from the
start, the feature map once the stream has told which features are live.
After the stream, compiled kernels over the sealed activations yield top examples, interval and quantile samples and
histograms; logit effects and neighbours come from the weights in chunks; the store is published atomically.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..config import PRECOMPUTE
from ..embedded import resolve_model
from ..errors import UserError
from ..store.write import size_bytes
from .executors import LoadedRun, executor_for
from .loading import check_and_name, load_model_for, load_saes, model_label, prepend_bos
from .publish import publish
from .spec import PrecomputeSpec
from .tables import build_tables, peak_rss
from .weights import WeightsWork, live_mask
from .workdir import Plan, WorkDir

log = logging.getLogger("saescope.precompute.pipeline")


def check_spec(spec: PrecomputeSpec) -> None:
    """The checks that need nothing loaded."""
    size_bytes(spec.memory_limit)  # a bad --memory-limit fails before anything loads
    if spec.shards < 1:
        raise UserError(f"--shards {spec.shards}: give 1 (one process, no Ray) or more (Ray tasks)")
    if spec.ray and spec.shards == 1:
        raise UserError("--ray needs --shards N with N > 1 (one shard runs in this process, without Ray)")
    if not spec.saes:
        raise UserError("a run needs at least one SAE (--sae PATH or --run FILE)")


def _weights_beside_stream(lm) -> bool:
    """PRECOMPUTE.weights_beside_stream: "always", "never", or "gpu" (only when the model runs on an accelerator,
    whose stream leaves the CPU cores to the weights thread)."""
    mode = PRECOMPUTE.weights_beside_stream
    return mode == "always" or (mode == "gpu" and lm.device != "cpu")


def run_precompute(spec: PrecomputeSpec) -> Path:
    """Build (or extend) the store spec.out; resumes a run of the same settings that was stopped."""
    t_start = time.time()
    check_spec(spec)
    loaded = load_saes(spec.saes)  # the cheaper check first: a bad SAE fails before the model loads
    model_path = resolve_model(spec.model)
    lm = load_model_for(spec, loaded)
    check_and_name(spec, lm, loaded)
    prepend = prepend_bos(spec, loaded)
    n_ctx = spec.tokens // spec.context_len
    if n_ctx < 1:
        raise UserError(f"--tokens {spec.tokens} is less than one context of {spec.context_len} tokens")
    work = WorkDir(spec.out.with_name(spec.out.name + ".work"))
    fingerprint = {"model": model_path, "saes": [[x.path, x.hook] for x in loaded], "dataset": spec.dataset,
                   "text_field": spec.text_field, "contexts": n_ctx, "context_len": spec.context_len,
                   "batch_size": spec.batch_size, "prepend_bos": prepend, "device": lm.device, "dtype": str(lm.dtype)}
    plan = Plan.make(fingerprint, n_ctx, spec.context_len, spec.batch_size, [x.sae.cfg.d_sae for x in loaded],
                     spec.shards)
    work.open(plan, restart=spec.restart)
    t_loaded = time.time()
    done = work.contexts_done(plan)
    if done:
        log.info("resuming: %d of %d contexts already done", done, n_ctx)
    executor = executor_for(spec)
    run = LoadedRun(lm, loaded)
    weights = WeightsWork(lm, loaded, work.root / "weights", quality=spec.eval_tokens > 0,
                          beside_stream=_weights_beside_stream(lm))
    try:
        t_forward = executor.stream(spec, run, plan, work, prepend)
        done = work.contexts_done(plan)
        log.info("streamed %d contexts (peak memory so far %s)", done, peak_rss())
        if done < n_ctx:
            log.warning("the dataset ran out after %d contexts (%d tokens); asked for %d", done,
                        done * spec.context_len, n_ctx)
        t_stream = time.time()
        weights.stream_done()
        if spec.feature_map:  # the live features are known now: the map beside the feature ranges
            weights.start_maps([live_mask(work.counts(i, d)) for i, d in enumerate(plan.d_sae)])
        jobs = build_tables(spec, plan, work, executor)
        phases = {"ranges": time.time() - t_stream}
        publish(spec, run, model_label(spec), model_path, work, jobs, prepend, weights, phases)
    except BaseException:
        weights.cancel()
        raise
    shutil.rmtree(work.root, ignore_errors=True)
    t_end = time.time()
    spec.event("finished", load=t_loaded - t_start, stream=t_stream - t_loaded, forward=t_forward,
               publish=t_end - t_stream, tokens=done * spec.context_len, phases=phases,
               background={"logits": weights.seconds("logits"), "map": weights.seconds("map")})
    log.info("stored %s in %s (load %.0f s, stream %.0f s, tables %.0f s; peak memory %s)",
             ", ".join(x.sae_id for x in loaded), spec.out, t_loaded - t_start, t_stream - t_loaded,
             t_end - t_stream, peak_rss())
    return spec.out
