"""POST /graph: an attribution graph over the worker's transcoders (or, without any, its residual-stream SAEs),
checked against real ablations; POST /graph/intervene: node interventions on transcoder graphs (features set
to a multiple or a value) with the new top logits, frozen-attention and real, beside the clean ones.

Its own APIRouter (create_worker_app includes it); the work runs in a thread under the engine's model lock.
Built graphs are kept unpruned in a bounded LRU cache (GraphCache, keyed by prompt, target, max_feature_nodes and
the transcoders), so a reload or other pruning thresholds only re-prune and re-check."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from fastapi import APIRouter

from saescope.precompute.circuits.export import graph_to_json
from saescope.precompute.circuits.graph import Graph, prompt_ids
from saescope.precompute.circuits.intervene import FeatureEdit, intervene
from saescope.precompute.circuits.residual import ResidualSAESet, is_residual_sae
from saescope.precompute.circuits.run import build_any, from_graph
from saescope.precompute.circuits.transcoders import TranscoderSet
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError

from ...errors import AppError
from ...settings import GRAPH
from ..batcher import Engine
from ..wire import (EdgeCheckOut, GraphEditOut, GraphIn, GraphInterveneIn, GraphInterveneOut, GraphOut, LogitOut,
                    NodeCheckOut)


@dataclass
class CachedGraph:
    graph: Graph
    seconds: float  # what building it took
    nbytes: int
    results: dict = field(default_factory=dict)  # (node_threshold, edge_threshold, verify) -> GraphOut fields
    checks: dict = field(default_factory=dict)  # verify()'s memo: real-model runs by what they ablated


def graph_nbytes(g: Graph) -> int:
    return sum(t.numel() * t.element_size() for t in (g.adjacency, g.errors, g.features, g.activations)
               if t is not None)


MB = 1 << 20


class GraphCache:
    """Unpruned graphs, least recently used dropped first, at most `max_graphs` of them and `max_bytes` of their
    tensors (a graph larger than max_bytes is not kept). Thread-safe; `builds` counts the graphs built."""

    def __init__(self, max_graphs: int = GRAPH.cache_graphs, max_bytes: int = GRAPH.cache_mb * MB):
        self.max_graphs, self.max_bytes = max_graphs, max_bytes
        self._items: OrderedDict[tuple, CachedGraph] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key: tuple) -> CachedGraph | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple, item: CachedGraph) -> None:
        with self._lock:
            self._items.pop(key, None)
            if item.nbytes > self.max_bytes or self.max_graphs < 1:
                return
            self._items[key] = item
            while len(self._items) > self.max_graphs or sum(v.nbytes for v in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)


def transcoders(engine: Engine, sae_ids: list[str] | None) -> tuple[TranscoderSet | ResidualSAESet, dict[int, str]]:
    """The SAEs a graph is built on, and graph layer -> SAE id: the worker's transcoders (or the ones named), at most
    one per layer; when it has none (or the names are residual-stream SAEs), its SAEs at blocks.L.hook_resid_pre /
    hook_resid_post, one per point of the stream (precompute/circuits/residual.py: MLPs linearised at the prompt).
    422 when there are neither. Besides the store's, engine.graph_saes (on the embedded default: the demo
    transcoders of the other layers) count as transcoders."""
    from saescope.precompute.models import parse_hook

    n_layers = engine.lm.n_layers
    have = {k: s for k, s in {**engine.graph_saes, **engine.saes}.items() if getattr(s, "is_transcoder", False)}
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


def _limit_status(err: UserError) -> int:
    return 413 if "at most" in str(err) and "tokens" in str(err) else 422


def make_graph_router(engine: Engine, cache: GraphCache | None = None) -> APIRouter:
    router = APIRouter()
    cache = cache if cache is not None else GraphCache()
    router.graph_cache = cache  # tests and benchmarks read its counters

    @router.post("/graph", response_model=GraphOut, summary="attribution graph of a prompt over the transcoders "
                 "(or residual-stream SAEs), with its top nodes and edges checked by real ablations (unpruned "
                 "graphs cached: a reload or other thresholds rebuild nothing)")
    async def graph(body: GraphIn) -> GraphOut:
        ts, by_layer = transcoders(engine, body.sae_ids)
        cfg = replace(CIRCUIT, max_feature_nodes=body.max_feature_nodes)
        key = (body.text, body.target or "", body.max_feature_nodes, tuple(sorted(by_layer.items())))
        variant = (body.node_threshold, body.edge_threshold, body.verify)

        def run():
            with engine.model_lock:
                hit = cache.get(key)
                cached = hit is not None
                if hit is None:
                    t0 = time.perf_counter()
                    g = build_any(engine.lm, ts, prompt_ids(engine.lm, body.text), body.text, body.target or None, cfg)
                    hit = CachedGraph(g, time.perf_counter() - t0, graph_nbytes(g))
                    cache.builds += 1
                    cache.put(key, hit)
                if variant not in hit.results:
                    r = from_graph(engine.lm, ts, hit.graph, cfg, body.node_threshold, body.edge_threshold,
                                   check=body.verify, memo=hit.checks)
                    hit.results[variant] = _graph_fields(r, engine, body.node_threshold)
                    while len(hit.results) > GRAPH.cache_variants:  # the oldest pruning of this graph goes first
                        hit.results.pop(next(iter(hit.results)))
                return hit, cached

        t0 = time.perf_counter()
        try:
            hit, cached = await asyncio.wait_for(asyncio.to_thread(run), timeout=cfg.max_seconds + GRAPH.worker_grace_s)
        except UserError as err:
            raise AppError(str(err), _limit_status(err)) from err
        except asyncio.TimeoutError as err:
            raise AppError(f"no graph within {cfg.max_seconds:.0f} s (limit); use a shorter prompt", 504) from err
        return GraphOut(**hit.results[variant], sae_ids=by_layer, seconds=time.perf_counter() - t0, cached=cached,
                        graph_seconds=hit.seconds)

    @router.post("/graph/intervene", response_model=GraphInterveneOut,
                 summary="node interventions from a graph: features set to a multiple or a value (several at once); "
                 "the new top logits with attention frozen and in the real model, beside the clean ones")
    async def graph_intervene(body: GraphInterveneIn) -> GraphInterveneOut:
        ts, by_layer = transcoders(engine, body.sae_ids)
        if isinstance(ts, ResidualSAESet):
            raise AppError("node interventions need transcoder graphs; this worker's graphs are on residual-stream "
                           "SAEs (set a feature there through /steer or /ablate)", 422)
        edits = [FeatureEdit(e.layer, e.pos, e.feature, e.mode, e.value) for e in body.edits]

        def run():
            ids = prompt_ids(engine.lm, body.text)
            with engine.model_lock:
                return ids, intervene(engine.lm, ts, ids, edits, k=body.k)

        try:
            ids, out = await asyncio.to_thread(run)
        except UserError as err:
            raise AppError(str(err), _limit_status(err)) from err
        tok = engine.lm.tokenizer
        dec = (lambda t: tok.decode([t])) if tok is not None else str

        def top(kind: str) -> list[LogitOut]:
            logits = out["logits"][kind]
            return [LogitOut(token_id=t, token=dec(t), prob=p, logit=float(logits[t])) for t, p in out[kind]]
        return GraphInterveneOut(
            clean=top("base"), frozen=top("frozen"), real=top("real"),
            edits=[GraphEditOut(node_id=f"{e.layer}_{e.feature}_{e.pos}", mode=e.mode, value=e.value, activation=a,
                                new_activation=new) for e, (a, new) in zip(edits, out["applied"])],
            tokens=[dec(t) for t in ids], sae_ids=by_layer)

    return router


def _graph_fields(r, engine: Engine, node_threshold: float) -> dict:
    ids: dict[int, str] = {}
    data = graph_to_json(r.graph, r.pruned, r.scores, slug="saescope-graph", scan=engine.lm.name,
                         node_threshold=node_threshold, ids_out=ids)
    return dict(
        graph=data, replacement_score=r.scores[0], completeness_score=r.scores[1],
        node_checks=[NodeCheckOut(node_id=ids[c.node], estimate=c.estimate, true=c.true, agree=c.agree)
                     for c in r.node_checks],
        edge_checks=[EdgeCheckOut(source=ids[c.source], target=ids[c.target], weight=c.weight, estimate=c.estimate,
                                  true=c.true, agree=c.agree) for c in r.edge_checks])
