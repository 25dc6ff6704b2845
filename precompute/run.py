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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .config import DEFAULT, EMBEDDED, PRECOMPUTE
from .data import iter_dataset_contexts, special_mask
from .encode import encode_activations
from .embedded import MODEL_ID, resolve_model, resolve_sae
from .logits import LOGIT_METHOD, logit_effects, nearest_features
from .models import HookedLM, load_model
from .quality import quality_for_run
from .saes import SAE, load_sae
from .store.spill import Plan, ShardWriter, WorkDir
from .store.write import SampleSpec, SparseActs, StoreBuilder, build_range, feature_ranges, read_active, size_bytes
from .tokens import token_strings
from .errors import UserError

log = logging.getLogger(__name__)
E, P = EMBEDDED, PRECOMPUTE
TEST_PAUSE_AFTER = int(os.environ.get("SAESCOPE_TEST_PAUSE_AFTER_BATCHES", "0"))  # tests only: 0 = never


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a run: where it is, an optional hook override and its name inside the store."""

    path: str = E.sae
    hook: str | None = None
    sae_id: str | None = None


RUN_FILE_KEYS = {"path", "hook", "id", "sae_id"}


def load_run_file(path: Path) -> list[SAESpec]:
    """SAEs listed in a TOML (`[[sae]]` tables) or JSON ({"sae": [...]} or a list) run file.

    Each entry: path (required), hook and id (optional)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--run {path}: no such file (a .toml with [[sae]] entries or a .json list)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--run {path}: unknown suffix {path.suffix!r}; valid: .toml, .json")
    except (ValueError, json.JSONDecodeError) as err:  # tomllib.TOMLDecodeError is a ValueError
        raise UserError(f"--run {path} could not be parsed: {err}") from err
    entries = data if isinstance(data, list) else data.get("sae") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--run {path} lists no SAEs; write one [[sae]] table (TOML) or a list under \"sae\" "
                         "(JSON) per SAE, each with path = ... and optionally hook = ... and id = ...")
    specs = []
    for n, e in enumerate(entries, 1):
        if not isinstance(e, dict) or "path" not in e:
            raise UserError(f"--run {path}: SAE entry {n} needs a path (and optionally hook, id); got {e!r}")
        unknown = set(e) - RUN_FILE_KEYS
        if unknown:
            raise UserError(f"--run {path}: SAE entry {n} has unknown keys {sorted(unknown)}; valid: path, hook, id")
        specs.append(SAESpec(str(e["path"]), e.get("hook"), e.get("id", e.get("sae_id"))))
    return specs


def specs_from_cli(saes: list[str] | None, hooks: list[str] | None, ids: list[str] | None,
                   run_file: Path | None) -> list[SAESpec]:
    """Repeated --sae/--hook/--sae-id (aligned by position) or a --run file -> SAE specs."""
    if run_file is not None:
        if saes or hooks or ids:
            raise UserError("give the SAEs either with --run FILE or with --sae/--hook/--sae-id, not both")
        return load_run_file(run_file)
    saes = saes or [E.sae]
    for flag, vals in (("--hook", hooks), ("--sae-id", ids)):
        if vals and len(vals) != len(saes):
            raise UserError(f"{flag} was given {len(vals)} time(s) for {len(saes)} --sae; give it once per --sae, "
                             "in the same order, or not at all")
    return [SAESpec(p, hooks[i] if hooks else None, ids[i] if ids else None) for i, p in enumerate(saes)]


@dataclass
class PrecomputeArgs:
    out: Path
    model: str = E.model
    sae: str = E.sae  # one SAE (with hook, sae_id) unless `saes` lists several
    hook: str | None = None
    saes: list[SAESpec] = field(default_factory=list)  # several SAEs fed by one forward pass
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
    rows_per_range: int = P.rows_per_range
    shards: int = 1  # > 1: context ranges streamed as Ray tasks, tables built by Ray tasks over feature ranges
    ray: str | None = None  # Ray cluster address (None: a local Ray started for this run)
    verify_sample: int = P.verify_sample  # contexts re-encoded in fp32 at the end (0: skip)
    feature_map: bool = P.feature_map  # seeded UMAP of the decoder directions
    cooccurrence: bool = P.cooccurrence  # exact Jaccard co-occurrence over active token positions
    eval_tokens: int = P.eval_tokens  # quality metrics on this many held-out tokens (precompute/quality.py; 0: skip)
    progress: bool = True
    stop_after_batches: int | None = field(default=None, repr=False)  # tests: simulate an interrupted run
    stop_after_ranges: int | None = field(default=None, repr=False)  # tests: ... interrupted while building tables
    timings: dict = field(default_factory=dict, repr=False)  # filled in: load/stream/publish seconds

    def specs(self) -> list[SAESpec]:
        return list(self.saes) or [SAESpec(self.sae, self.hook, self.sae_id)]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "PrecomputeArgs":
        names = cls.__dataclass_fields__
        kw = {k: v for k, v in vars(ns).items() if k in names and k not in ("sae", "hook", "sae_id", "saes")}
        kw["saes"] = specs_from_cli(getattr(ns, "sae", None), getattr(ns, "hook", None), getattr(ns, "sae_id", None),
                                    getattr(ns, "run", None))
        return cls(**kw)


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


def sparse_features(sae: SAE, acts: torch.Tensor, special: torch.Tensor, first_ctx: int,
                    chunk_bytes: int = P.encode_bytes) -> SparseActs:
    """Hook activations (B, T, d_in) -> the SAE's nonzero features as parallel arrays, special tokens zeroed.

    The same arithmetic as encode.encode_batch (both call encode_activations), a slice of tokens at a time so
    that the dense (tokens, d_sae) block stays within chunk_bytes however wide the SAE."""
    B, T, d_in = acts.shape
    x, sp = acts.reshape(B * T, d_in), special.reshape(B * T)
    rows = max(1, chunk_bytes // (4 * sae.cfg.d_sae))
    parts = []
    for r0 in range(0, B * T, rows):
        z = encode_activations(sae, x[r0:r0 + rows], sp[r0:r0 + rows])  # (rows, d_sae)
        r, f = torch.nonzero(z, as_tuple=True)
        parts.append((r + r0, f, z[r, f].float()))
    r = torch.cat([p[0] for p in parts]).cpu().numpy()
    return SparseActs((r // T + first_ctx).astype(np.int32), (r % T).astype(np.int16),
                      torch.cat([p[1] for p in parts]).cpu().numpy().astype(np.int32),
                      torch.cat([p[2] for p in parts]).cpu().numpy())


@dataclass
class _Loaded:
    spec: SAESpec
    sae: SAE
    sae_id: str
    hook: str
    path: str  # resolved SAE path (provenance)


def _load_saes(a: PrecomputeArgs, specs: list[SAESpec]) -> list[_Loaded]:
    out = []
    for s in specs:
        path = str(resolve_sae(s.path))
        sae = load_sae(path, s.hook)
        out.append(_Loaded(s, sae, "", sae.cfg.hook_name, path))
    return out


def run_precompute(a: PrecomputeArgs) -> Path:
    t_start = time.time()
    specs = a.specs()
    size_bytes(a.memory_limit)  # a bad --memory-limit fails before anything loads
    if a.shards < 1:
        raise UserError(f"--shards {a.shards}: give 1 (one process, no Ray) or more (Ray tasks)")
    if a.ray and a.shards == 1:
        raise UserError("--ray needs --shards N with N > 1 (one shard runs in this process, without Ray)")
    loaded = _load_saes(a, specs)  # the cheaper check first: a bad SAE fails before the model loads
    model_path = resolve_model(a.model)
    lm = load_model(model_path, a.device, a.dtype)
    model_label = MODEL_ID if a.model == DEFAULT else a.model
    for x in loaded:
        x.sae.to(lm.device)
        width = lm.hook_width(x.hook)
        if x.sae.cfg.d_in != width:
            raise UserError(f"SAE {x.spec.path!r} reads vectors of width d_in={x.sae.cfg.d_in}, but {x.hook} of model "
                             f"{a.model!r} has width {width}; pick the SAE trained on this model, or the model it was "
                             "trained on")
        x.sae_id = x.spec.sae_id or default_sae_id(model_label, x.hook, x.sae)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", x.sae_id):
            raise UserError(f"--sae-id {x.sae_id!r} may only hold letters, digits, '.', '_' and '-'")
    ids = [x.sae_id for x in loaded]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UserError(f"two SAEs of this run would both be stored as {', '.join(dup)}; give each its own --sae-id")
    if a.prepend_bos == "auto":
        wants = {x.sae.cfg.prepend_bos for x in loaded}
        if len(wants) > 1:
            raise UserError("the SAEs of this run disagree on prepend_bos (their configs); they share one token "
                             "stream, so pass --prepend-bos yes or --prepend-bos no")
        prepend = wants.pop()
    else:
        prepend = a.prepend_bos == "yes"
    n_ctx = a.tokens // a.context_len
    if n_ctx < 1:
        raise UserError(f"--tokens {a.tokens} is less than one context of {a.context_len} tokens")
    work = WorkDir(a.out.with_name(a.out.name + ".work"))
    fingerprint = {"model": model_path, "saes": [[x.path, x.hook] for x in loaded], "dataset": a.dataset,
                   "text_field": a.text_field, "contexts": n_ctx, "context_len": a.context_len,
                   "batch_size": a.batch_size, "prepend_bos": prepend, "device": lm.device, "dtype": str(lm.dtype)}
    plan = Plan.make(fingerprint, n_ctx, a.context_len, a.batch_size, [x.sae.cfg.d_sae for x in loaded], a.shards)
    work.open(plan, restart=a.restart)
    t_loaded = time.time()
    done = work.contexts_done(plan)
    if done:
        log.info("resuming: %d of %d contexts already done", done, n_ctx)
    if a.shards > 1:
        from .distributed import stream_shards

        stream_shards(a, plan, work, prepend)
        t_forward = float("nan")
    else:
        t_forward = stream_shard(a, lm, loaded, plan, work, 0, prepend)
    done = work.contexts_done(plan)
    log.info("streamed %d contexts (peak memory so far %s)", done, _peak_rss())
    if done < n_ctx:
        log.warning("the dataset ran out after %d contexts (%d tokens); asked for %d", done, done * a.context_len, n_ctx)
    t_stream = time.time()
    _publish(a, lm, loaded, model_label, model_path, work, plan, prepend)
    shutil.rmtree(work.root, ignore_errors=True)
    t_end = time.time()
    a.timings.update(load=t_loaded - t_start, stream=t_stream - t_loaded, forward=t_forward,
                     publish=t_end - t_stream, tokens=done * a.context_len)
    log.info("stored %s in %s (load %.0f s, stream %.0f s, tables %.0f s; peak memory %s)", ", ".join(ids), a.out,
             t_loaded - t_start, t_stream - t_loaded, t_end - t_stream, _peak_rss())
    return a.out


def stream_shard(a: PrecomputeArgs, lm: HookedLM, loaded: list[_Loaded], plan: Plan, work: WorkDir, s: int,
                 prepend: bool, folder: Path | None = None, progress: bool | None = None) -> float:
    """Stream shard s (contexts plan.shards[s]) into its folder and seal it; returns seconds spent in forward.

    Resumes after the shard's last recorded batch. The precompute process runs this for its one shard; a Ray
    task runs it on a cluster node (folder: a node-local folder; the sealed Parquet goes to work.sealed)."""
    if work.is_sealed(s):
        return 0.0
    c0, c1 = plan.shards[s]
    hooks = list(dict.fromkeys(x.hook for x in loaded))
    writer = ShardWriter(folder or work.shard_dir(s), c0, a.context_len, len(loaded))
    done = c0 + writer.contexts
    contexts = iter_dataset_contexts(a.dataset, a.text_field, lm.tokenizer, a.context_len, prepend)
    show = a.progress if progress is None else progress
    bar = tqdm(total=plan.n_ctx * a.context_len, initial=work.contexts_done(plan) * a.context_len, unit="tok",
               unit_scale=True, desc="precompute" if len(plan.shards) == 1 else f"shard {s}", disable=not show,
               smoothing=0.1)
    n_batches = 0
    t_forward = 0.0
    try:
        for ids_np in _batches(contexts, c1, done, a.batch_size):
            special = special_mask(ids_np, lm.tokenizer)  # (B, T), computed once per batch
            t0 = time.perf_counter()
            acts = lm.activations_multi(torch.from_numpy(ids_np).long(), hooks)  # hook -> (B, T, d_in), one pass
            t_forward += time.perf_counter() - t0
            special_t = torch.from_numpy(special)
            sparse = [sparse_features(x.sae, acts[x.hook], special_t, done) for x in loaded]
            del acts
            writer.append(ids_np, (~special).sum(1).astype(np.int32), sparse)
            done += ids_np.shape[0]
            bar.update(ids_np.size)
            n_batches += 1
            if a.stop_after_batches is not None and n_batches >= a.stop_after_batches:
                raise KeyboardInterrupt  # the same path a Ctrl-C or kill takes: recorded batches stay
            if n_batches == TEST_PAUSE_AFTER:  # lets a test's kill -9 land mid-stream on any machine
                print(f"paused after {n_batches} committed batches (for a test)", file=sys.stderr, flush=True)
                time.sleep(600)
        writer.seal(work, s, plan.d_sae)
    finally:
        bar.close()
        writer.close()
    return t_forward


def _peak_rss() -> str:
    """This process's peak resident memory so far (Linux and macOS), for the log."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{kb / 1024 / (1024 if sys.platform == 'darwin' else 1):.0f} MB"


def _sample_spec(a: PrecomputeArgs) -> SampleSpec:
    return SampleSpec(a.context_len, a.top_k, a.n_intervals, a.per_interval, a.n_quantiles, a.per_quantile,
                      a.hist_bins)


def _range_jobs(a: PrecomputeArgs, plan: Plan, work: WorkDir) -> list[tuple[int, int, int, Path, list[str]]]:
    """(SAE index, lo, hi, output folder, input files) of every feature range, in store order."""
    jobs = []
    for i, (d, width) in enumerate(zip(plan.d_sae, plan.widths)):
        counts = work.counts(i, d)
        for lo, hi in feature_ranges(counts, a.rows_per_range):
            if counts[lo:hi + 1].any():
                folder = work.root / "tables" / f"sae-{i}" / f"range-{lo:07d}-{hi:07d}"
                jobs.append((i, lo, hi, folder, work.act_files(i, width, lo, hi)))
    return jobs


def _build_tables(a: PrecomputeArgs, plan: Plan, work: WorkDir) -> list[tuple[int, int, int, Path, list[str]]]:
    """Every feature range's tables (those a killed run had not finished), locally or as Ray tasks."""
    jobs = _range_jobs(a, plan, work)
    todo = [j for j in jobs if not j[3].exists()]
    log.info("building per-feature tables: %d feature range(s), %d to do", len(jobs), len(todo))
    if a.shards > 1:
        from .distributed import build_ranges

        build_ranges(a, work, todo, _sample_spec(a))
        return jobs
    ctx_files = work.context_files()
    for n, (i, lo, hi, folder, files) in enumerate(tqdm(todo, desc="tables", unit="range",
                                                        disable=not a.progress or not todo)):
        if a.stop_after_ranges is not None and n >= a.stop_after_ranges:
            raise KeyboardInterrupt  # as a Ctrl-C between two ranges: the finished ones stay
        build_range(files, ctx_files, lo, hi, folder, _sample_spec(a), a.memory_limit, work.root / "spill")
    log.info("feature ranges built (peak memory so far %s)", _peak_rss())
    return jobs


def _publish(a: PrecomputeArgs, lm: HookedLM, loaded: list[_Loaded], model_label: str, model_path: str,
             work: WorkDir, plan: Plan, prepend: bool) -> None:
    jobs = _build_tables(a, plan, work)
    # weights-only tables next, while no DuckDB connection holds memory: peak = max(torch, DuckDB), not the sum
    from_weights = [_from_weights(lm, x) for x in loaded]
    builder = StoreBuilder(a.out, a.memory_limit, temp_dir=work.root / "spill")
    try:
        builder.put_vocab(model_label, token_strings(lm.tokenizer))
        for i, (x, (logits, neighbours)) in enumerate(zip(loaded, from_weights)):
            _publish_one(a, builder, lm, x, i, model_label, model_path, work, [j for j in jobs if j[0] == i],
                         prepend, logits, neighbours)
        _cross_matches(builder, loaded)
        if a.eval_tokens > 0:  # SAE quality metrics on the held-out tokens after the stream (precompute/quality.py)
            builder.put_quality(quality_for_run(a, lm, loaded, prepend, plan.n_ctx))
        if a.verify_sample > 0:
            _verify_before_publish(a, builder, lm, loaded, model_path)
        builder.publish()
    except BaseException:
        builder.abort()
        raise


def _cross_matches(builder: StoreBuilder, loaded: list[_Loaded], n: int = 5) -> None:
    """For every pair of this run's SAEs of the same width: each feature's nearest decoder directions in the other."""
    from .compare import nearest_across

    for x in loaded:
        for y in loaded:
            if x is not y and x.sae.cfg.d_in == y.sae.cfg.d_in:
                m = nearest_across(x.sae.W_dec.detach().cpu().float(), y.sae.W_dec.detach().cpu().float(), n=n)
                builder.put_cross(x.sae_id, y.sae_id, np.asarray(m.ids), np.asarray(m.cos))


def _from_weights(lm: HookedLM, x: _Loaded) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Logit effects and decoder-cosine neighbours of one SAE (small (d_sae, n) arrays)."""
    W_dec = x.sae.W_dec.detach().cpu()
    if x.sae.cfg.normalize_activations != "none":
        log.info("the SAE normalizes its input; logit effects use the raw decoder directions")
    logits = logit_effects(W_dec, lm.unembedding().cpu(), lm.final_norm_gain(), n=P.n_logits)
    return logits, nearest_features(W_dec, n=P.n_neighbours)


def _publish_one(a: PrecomputeArgs, builder: StoreBuilder, lm: HookedLM, x: _Loaded, i: int, model_label: str,
                 model_path: str, work: WorkDir, jobs: list, prepend: bool, logits: dict[str, np.ndarray],
                 neighbours: tuple[np.ndarray, np.ndarray]) -> None:
    sae, sae_id = x.sae, x.sae_id
    d_sae = sae.cfg.d_sae
    builder.replace_sae(sae_id)
    stats: dict = {k: np.zeros(d_sae, dtype=np.float64) for k in ("n", "mx", "mn", "mean")}
    stats.update(hist=np.zeros((d_sae, a.hist_bins), dtype=np.int64), top_tokens={}, used_ctx=[])
    for _, lo, hi, folder, _ in jobs:  # ranges ascend: rows go in sorted by feature (zone maps serve the pages)
        builder.put_range(sae_id, folder, stats)
    used = np.concatenate(stats.pop("used_ctx")) if jobs else np.zeros(0, np.int32)
    stats["n_ctx"], stats["n_counted"] = builder.put_contexts(sae_id, work.context_files(), used)
    cooc = coords = None
    if a.cooccurrence:
        from .cooccur import cooccurrence_from_chunks

        read = read_active(work.all_act_files(i), a.context_len, a.memory_limit, work.root / "spill")
        c = cooccurrence_from_chunks(read, stats["n_ctx"] * a.context_len, d_sae, n=P.n_neighbours,
                                     temp_dir=work.root)
        cooc = (c.ids, c.jaccard)
        log.info("co-occurrence of %s done (peak memory so far %s)", sae_id, _peak_rss())
    if a.feature_map:
        from .featuremap import build_feature_map

        log.info("building the feature map of %s (UMAP of %d decoder directions)", sae_id, sae.cfg.d_sae)
        live = stats["n"] > 0
        coords = build_feature_map(sae.W_dec.detach().cpu().float().numpy(),
                                   mask=live if live.sum() >= P.map_min_live else None)
    builder.put_features(sae_id, stats, logits, neighbours, cooc, coords)
    density = stats["n"] / max(1, stats["n_counted"])
    live = density[density > 0]
    edges = (-7.0, 0.0)
    hist = np.histogram(np.log10(live), bins=30, range=edges)[0] if len(live) else np.zeros(30, int)
    builder.put_sae({
        "sae_id": sae_id, "model_id": model_label, "model_path": model_path, "model_key": model_label,
        "sae_path": x.path, "hook": x.hook, "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dataset": a.dataset,
        "n_tokens": stats["n_ctx"] * a.context_len, "n_contexts": stats["n_ctx"], "n_counted": stats["n_counted"],
        "context_len": a.context_len, "prepend_bos": prepend, "config": sae.cfg.to_dict(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "saescope_version": __version__, "logit_method": LOGIT_METHOD,
        "dead_share": float((density == 0).mean()), "density_hist": [int(v) for v in hist],
        "density_hist_lo": edges[0], "density_hist_hi": edges[1],
        "params": {"top_k": a.top_k, "n_intervals": a.n_intervals, "per_interval": a.per_interval,
                   "n_quantiles": a.n_quantiles, "per_quantile": a.per_quantile,
                   "hist_bins": a.hist_bins, "device": lm.device, "dtype": str(lm.dtype),
                   "special_tokens_excluded": True,
                   "special_token_ids": sorted(int(t) for t in lm.tokenizer.all_special_ids)},
        "verify": None,
    })


def _verify_before_publish(a: PrecomputeArgs, builder: StoreBuilder, lm: HookedLM, loaded: list[_Loaded],
                           model_path: str) -> None:
    """Re-encode a few stored contexts with the fp32 reference path and record the result in the saes rows."""
    from .verify import reference_copy, verify_sample

    ref_lm = lm if lm.device == "cpu" and lm.dtype == torch.float32 else load_model(model_path, "cpu", "float32")
    for x in loaded:
        ref_sae = reference_copy(x.sae)
        result = verify_sample(builder, ref_lm, ref_sae, x.sae_id, x.hook, a.verify_sample)  # command names {store}
        del result["date"]  # it ran while the tables were built: the reader reports the row's `created` as its date
        builder.set_verify(x.sae_id, result)
        log.info("verified %s: %s = %.2g (%s); %d contexts, %d positions, %d zero/nonzero mismatches", x.sae_id,
                 result["metric"], result[result["metric"]], result["bound"], result["contexts"], result["positions"],
                 result["mismatches"])
