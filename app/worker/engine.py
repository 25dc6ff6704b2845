"""Building a worker engine: load the model and SAEs named on the command line or recorded in a store."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saescope.precompute.embedded import default_model_dir, demo_transcoder_dirs, resolve_model, resolve_sae
from saescope.precompute.encode import check_d_in
from saescope.precompute.models import HookedLM, dtype_name, load_model, parse_hook
from saescope.precompute.saes import SAE, load_sae
from saescope.precompute.errors import UserError
from saescope.precompute.store import Store

from ..settings import WORKER
from .batcher import Engine

log = logging.getLogger(__name__)


def build_engine(model: str, saes: dict[str, str], hooks: dict[str, str | None], device: str, dtype: str,
                 max_prompt_tokens: int = WORKER.max_prompt_tokens, max_batch: int = WORKER.max_batch,
                 batch_wait_ms: float = WORKER.batch_wait_ms, max_queue: int = WORKER.max_queue,
                 timeout_s: float = WORKER.request_timeout_s) -> Engine:
    lm = load_model(model, device, dtype)
    loaded = {}
    for sae_id, ref in saes.items():
        sae = load_sae(ref, hooks.get(sae_id))
        check_d_in(lm, sae, sae_name=sae_id, model_name=model)
        loaded[sae_id] = sae.to(lm.device)
    engine = Engine(lm, loaded, max_prompt_tokens, max_batch, batch_wait_ms, max_queue, timeout_s)
    engine.graph_saes = demo_graph_transcoders(model, lm, loaded)
    return engine


def demo_graph_transcoders(model: str, lm: HookedLM, saes: dict[str, SAE]) -> dict[str, SAE]:
    """On the embedded default model: its committed transcoders (precompute/data/demo_transcoders) for every layer
    that none of the worker's own transcoders reads, as `demo-transcoder-L{layer}`, for attribution graphs only
    (the demo store has dashboards for a few layers; a graph replaces every MLP). Any other model: none."""
    if not Path(model).exists() or Path(model).resolve() != default_model_dir().resolve():
        return {}
    covered = {parse_hook(s.cfg.hook_name, lm.n_layers).layer for s in saes.values() if getattr(s, "is_transcoder", False)}
    out = {}
    for folder in demo_transcoder_dirs():
        sae = load_sae(str(folder))
        layer = parse_hook(sae.cfg.hook_name, lm.n_layers).layer
        if layer not in covered:
            check_d_in(lm, sae, sae_name=folder.name, model_name=model)
            out[f"demo-transcoder-L{layer}"] = sae.to(lm.device)
    if out:
        log.info("graphs: %d demo transcoders besides the store's (layers without dashboards)", len(out))
    return out


def sources_from_store(store_path: Path) -> tuple[str, dict[str, str], dict[str, str | None]]:
    """(model, {sae_id: sae path}, {sae_id: hook}) recorded in a store's provenance."""
    with Store(store_path) as store:
        infos = store.saes()
    if not infos:
        raise UserError(f"store {store_path} holds no SAE")
    models = {s.model_path for s in infos}
    if len(models) > 1:
        raise UserError(f"store {store_path} mixes models ({', '.join(sorted(models))}); start one worker per model "
                         "with --model/--sae")
    model = infos[0].model_path
    if not Path(model).exists() and "smollm2" in model.lower():  # the embedded default's cache on another machine
        model = resolve_model("default")
    return model, {s.sae_id: s.sae_path for s in infos}, {s.sae_id: s.hook for s in infos}


def store_dtype(store_path: Path) -> str:
    """The dtype the store's activations were computed in, or 'auto' when its SAEs disagree or predate the record.

    A worker on --dtype auto runs the model in it, so that live activations match the stored ones (auto alone
    would pick bfloat16 on a bf16 CPU for a store built in float32, or float32 on a CPU for a bf16 GPU store)."""
    with Store(store_path) as store:
        names = {dtype_name(s.params["dtype"]) for s in store.saes() if s.params.get("dtype")}
    return names.pop() if len(names) == 1 else "auto"


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The engine `saescope worker` runs: SAEs from --store, or one from --model/--sae."""
    dtype = args.dtype
    if args.store:
        model, saes, hooks = sources_from_store(args.store)
        if dtype == "auto":
            dtype = store_dtype(args.store)
            log.info("model dtype %s: the one the store was built with", dtype)
    else:
        model = resolve_model(args.model)
        ref = resolve_sae(args.sae)
        sae_id = Path(ref).name or ref
        saes, hooks = {sae_id: ref}, {sae_id: args.hook}
    return build_engine(model, saes, hooks, args.device, dtype, args.max_prompt_tokens, args.max_batch,
                        args.batch_wait_ms, args.max_queue, args.timeout)
