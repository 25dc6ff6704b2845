"""POST /graph: an attribution graph over the worker's transcoders, checked against real ablations.

Its own APIRouter (create_worker_app includes it); the work runs in a thread under the engine's model lock."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from fastapi import APIRouter

from saescope.precompute.circuits.export import graph_to_json
from saescope.precompute.circuits.run import circuit
from saescope.precompute.circuits.transcoders import TranscoderSet
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError

from ...errors import AppError
from ...settings import GRAPH
from ..batcher import Engine
from ..wire import EdgeCheckOut, GraphIn, GraphOut, NodeCheckOut


def transcoders(engine: Engine, sae_ids: list[str] | None) -> tuple[TranscoderSet, dict[int, str]]:
    """The worker's transcoders (or the ones named) as one set, at most one per layer; 422 when there are none.
    Besides the store's, engine.graph_saes (on the embedded default: the demo transcoders of the other layers)."""
    have = {k: s for k, s in {**engine.graph_saes, **engine.saes}.items() if getattr(s, "is_transcoder", False)}
    if not have:
        kinds = ", ".join(f"{k} ({s.cfg.architecture} at {s.cfg.hook_name})" for k, s in engine.saes.items())
        raise AppError(f"this worker has no transcoders, so it cannot build attribution graphs (its SAEs: {kinds}). "
                       "Graphs need transcoders reading blocks.L.hook_mlp_in and writing blocks.L.hook_mlp_out "
                       "(SAELens transcoder/skip_transcoder/jumprelu_transcoder folders) in the store or on --sae", 422)
    if sae_ids:
        unknown = [k for k in sae_ids if k not in have]
        if unknown:
            raise AppError(f"unknown transcoder {unknown[0][:80]!r}; this worker's transcoders: {', '.join(sorted(have))}", 404)
        have = {k: have[k] for k in sae_ids}
    by_layer: dict[int, str] = {}
    from saescope.precompute.models import parse_hook

    for k, s in have.items():
        layer = parse_hook(s.cfg.hook_name, engine.lm.n_layers).layer
        if layer in by_layer:
            raise AppError(f"transcoders {by_layer[layer]} and {k} both read layer {layer}; name one per layer in sae_ids", 422)
        by_layer[layer] = k
    return TranscoderSet.from_saes([have[k] for k in by_layer.values()], engine.lm.n_layers), by_layer


def make_graph_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    @router.post("/graph", response_model=GraphOut, summary="attribution graph of a prompt over the transcoders, "
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
