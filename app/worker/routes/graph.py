"""POST /graph: an attribution graph over the worker's transcoders (or, without any, its residual-stream SAEs),
checked against real ablations.

Its own APIRouter (create_worker_app includes it); the work runs in a thread under the engine's model lock."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from fastapi import APIRouter

from saescope.precompute.circuits.export import graph_to_json
from saescope.precompute.circuits.residual import ResidualSAESet, is_residual_sae
from saescope.precompute.circuits.run import circuit
from saescope.precompute.circuits.transcoders import TranscoderSet
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError

from ...errors import AppError
from ...settings import GRAPH
from ..batcher import Engine
from ..wire import EdgeCheckOut, GraphIn, GraphOut, NodeCheckOut


def transcoders(engine: Engine, sae_ids: list[str] | None) -> tuple[TranscoderSet | ResidualSAESet, dict[int, str]]:
    """The SAEs a graph is built on, and graph layer -> SAE id: the worker's transcoders (or the ones named), at most
    one per layer; when it has none (or the names are residual-stream SAEs), its SAEs at blocks.L.hook_resid_pre /
    hook_resid_post, one per point of the stream (precompute/circuits/residual.py: MLPs linearised at the prompt).
    422 when there are neither."""
    from saescope.precompute.models import parse_hook

    n_layers = engine.lm.n_layers
    have = {k: s for k, s in engine.saes.items() if getattr(s, "is_transcoder", False)}
    resid = {k: s for k, s in engine.saes.items() if is_residual_sae(s, n_layers)}
    if not have and not resid:
        kinds = ", ".join(f"{k} ({s.cfg.architecture} at {s.cfg.hook_name})" for k, s in engine.saes.items())
        raise AppError(f"this worker has no transcoders and no residual-stream SAEs, so it cannot build attribution "
                       f"graphs (its SAEs: {kinds}). Graphs need transcoders reading blocks.L.hook_mlp_in and writing "
                       "blocks.L.hook_mlp_out (SAELens transcoder/skip_transcoder/jumprelu_transcoder folders), or "
                       "SAEs (standard, jumprelu, topk, gated) at blocks.L.hook_resid_pre or blocks.L.hook_resid_post, "
                       "in the store or on --sae", 422)
    if sae_ids:
        unknown = [k for k in sae_ids if k not in have and k not in resid]
        if unknown:
            raise AppError(f"unknown transcoder or residual SAE {unknown[0][:80]!r}; this worker's transcoders: "
                           f"{', '.join(sorted(have)) or 'none'}; residual-stream SAEs: {', '.join(sorted(resid)) or 'none'}", 404)
        named_tc = [k for k in sae_ids if k in have]
        if named_tc and len(named_tc) < len(sae_ids):
            raise AppError(f"sae_ids mix transcoders ({', '.join(named_tc)}) and residual-stream SAEs; a graph uses "
                           "one kind", 422)
        if named_tc:
            have = {k: have[k] for k in sae_ids}
        else:
            have, resid = {}, {k: resid[k] for k in sae_ids}
    if not have:  # residual-stream SAEs
        ids = sorted(resid, key=lambda k: _boundary(parse_hook(resid[k].cfg.hook_name, n_layers)))
        try:
            rs = ResidualSAESet.from_saes([resid[k] for k in ids], n_layers, ids)
        except UserError as err:
            raise AppError(f"{err}; name one per point in sae_ids", 422) from err
        return rs, {k: name for k, name in enumerate(rs.names)}
    by_layer: dict[int, str] = {}
    for k, s in have.items():
        layer = parse_hook(s.cfg.hook_name, n_layers).layer
        if layer in by_layer:
            raise AppError(f"transcoders {by_layer[layer]} and {k} both read layer {layer}; name one per layer in sae_ids", 422)
        by_layer[layer] = k
    return TranscoderSet.from_saes([have[k] for k in by_layer.values()], n_layers), by_layer


def _boundary(spec) -> int:
    return spec.layer + (spec.kind == "hook_resid_post")


def make_graph_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    @router.post("/graph", response_model=GraphOut, summary="attribution graph of a prompt over the transcoders (or residual-stream SAEs), "
                 "with its top nodes and edges checked by real ablations")
    async def graph(body: GraphIn) -> GraphOut:
        ts, by_layer = transcoders(engine, body.sae_ids)
        cfg = replace(CIRCUIT, max_feature_nodes=body.max_feature_nodes)

        def run():
            with engine.model_lock:
                return circuit(engine.lm, ts, body.text, body.target or None, cfg, body.node_threshold,
                               body.edge_threshold, check=body.verify)

        t0 = time.perf_counter()
        try:
            r = await asyncio.wait_for(asyncio.to_thread(run), timeout=cfg.max_seconds + GRAPH.worker_grace_s)
        except UserError as err:
            raise AppError(str(err), 413 if "at most" in str(err) and "tokens" in str(err) else 422) from err
        except asyncio.TimeoutError as err:
            raise AppError(f"no graph within {cfg.max_seconds:.0f} s (limit); use a shorter prompt", 504) from err
        ids: dict[int, str] = {}
        data = graph_to_json(r.graph, r.pruned, r.scores, slug="saescope-graph", scan=engine.lm.name,
                             node_threshold=body.node_threshold, ids_out=ids)

        def nid(i):
            return ids[i]
        return GraphOut(
            graph=data, replacement_score=r.scores[0], completeness_score=r.scores[1],
            node_checks=[NodeCheckOut(node_id=nid(c.node), estimate=c.estimate, true=c.true, agree=c.agree)
                         for c in r.node_checks],
            edge_checks=[EdgeCheckOut(source=nid(c.source), target=nid(c.target), weight=c.weight, estimate=c.estimate,
                                      true=c.true, agree=c.agree) for c in r.edge_checks],
            sae_ids=by_layer, seconds=time.perf_counter() - t0)

    return router
