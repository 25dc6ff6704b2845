"""Graph JSON in circuit-tracer's / Neuronpedia's format, and its importer.

    {"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version, ...},
     "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos},
     "nodes": [{node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
                reverse_ctx_idx, jsNodeId, clerp, influence, activation}],
     "links": [{source, target, weight}]}

Node ids as circuit-tracer writes them: features `{layer}_{feature}_{pos}`, errors `0_{layer}_{pos}`, tokens
`E_{token}_{pos}`, logits `{n_layers + 1}_{token}_{pos}` (an error id that would equal a layer-0 feature's id,
`0_{layer}_{pos}` = `0_{feature}_{pos}`, gets the suffix `_error`: circuit-tracer's scheme is ambiguous there); `influence` is the cumulative influence share at the
node's rank (what circuit-tracer's pruning returns). saescope adds its scores and method (residual graphs: what it assumes and each graph layer's hook) under
`metadata.saescope` (readers that do not know the key ignore it). `load_graph_json(to_json(...))` gives back
exactly what was written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError
from .graph import Graph
from .prune import Pruned

NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
               "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation")
FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
MAX_NODES, MAX_LINKS = 20_000, 500_000  # an imported graph saescope draws (a pruned graph has hundreds of nodes)
SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_json(g: Graph, i: int, cumulative: float, clerp: str = "") -> dict[str, Any]:
    n = g.node(i)
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": clerp,
            "influence": float(cumulative), "activation": None}
    if n["kind"] == "feature":
        l, f, p = n["layer"], n["feature"], n["pos"]
        return {"node_id": f"{l}_{f}_{p}", "feature": cantor(l, f), "layer": str(l), "ctx_idx": p,
                "feature_type": "cross layer transcoder", **base, "jsNodeId": f"{l}_{f}-0", "activation": n["activation"]}
    if n["kind"] == "error":
        l, p = n["layer"], n["pos"]
        return {"node_id": f"0_{l}_{p}", "feature": -1, "layer": str(l), "ctx_idx": p,
                "feature_type": "mlp reconstruction error", **base, "jsNodeId": f"{l}_{p}-0"}
    if n["kind"] == "token":
        t, p = n["token"], n["pos"]
        return {"node_id": f"E_{t}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                **base, "jsNodeId": f"E_{t}-{p}"}
    t, p, k = n["token"], n["pos"], i - g.logit_start
    tok = g.logit_strs[k]
    out = {"node_id": f"{g.n_layers + 1}_{t}_{p}", "feature": t, "layer": str(g.n_layers + 1), "ctx_idx": p,
           "feature_type": "logit", **base, "jsNodeId": f"L_{t}-{p}"}
    out.update(token_prob=n["prob"], is_target_logit=k == 0, clerp=f'Output "{tok}" (p={n["prob"]:.3f})', influence=None)
    return {f: out[f] for f in NODE_FIELDS}


def graph_to_json(g: Graph, pruned: Pruned, scores: tuple[float, float], slug: str = "saescope-graph",
                  scan: str = "saescope", clerp: Callable[[int, int], str] | None = None,
                  node_threshold: float | None = None, extra: dict | None = None,
                  ids_out: dict[int, str] | None = None) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's JSON; clerp(layer, feature) labels feature nodes (explanations)."""
    nodes, ids, seen = [], {}, set()
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        n = g.node(i)
        label = clerp(n["layer"], n["feature"]) if clerp and n["kind"] == "feature" else ""
        node = node_json(g, i, float(pruned.cumulative[i]), label or "")
        node = {f: node[f] for f in NODE_FIELDS}
        if node["node_id"] in seen:  # circuit-tracer's error id 0_{layer}_{pos} can equal a layer-0 feature's id
            node["node_id"] += "_error"
        seen.add(node["node_id"])
        nodes.append(node)
        ids[i] = node["node_id"]
    if ids_out is not None:
        ids_out.update(ids)
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": ids[s], "target": ids[t], "weight": float(g.adjacency[t, s])}
             for t, s in zip(dst.tolist(), src.tolist()) if s in ids and t in ids]
    linked = {x for lk in links for x in (lk["source"], lk["target"])}
    nodes = [n for n in nodes if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    rep, comp = scores
    meta = {"slug": slug, "scan": scan, "transcoder_list": [str(t) for t in g.meta.get("transcoders", [])],
            "prompt_tokens": list(g.token_strs), "prompt": g.prompt, "node_threshold": node_threshold,
            "schema_version": 1,
            "saescope": {"replacement_score": rep, "completeness_score": comp, "method": g.meta.get("method", ""),
                         "feature_layers": g.meta.get("feature_layers", []), "n_layers": g.n_layers,
                         "active_features": g.n_active, "feature_nodes": g.n_features,
                         "nodes_before_pruning": g.n_nodes, "edges_before_pruning": int((g.adjacency != 0).sum()),
                         "tokens": list(g.tokens),
                         **{k: g.meta[k] for k in ("assumes", "layer_labels", "layer_hooks") if k in g.meta},
                         **(extra or {})}}
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""}, "nodes": nodes, "links": links}


@dataclass
class GraphFile:
    """An imported graph JSON: what the page draws and what is written back unchanged."""

    metadata: dict[str, Any]
    qParams: dict[str, Any] | None
    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys other writers add

    def to_json(self) -> dict[str, Any]:
        out = {"metadata": self.metadata}
        if self.qParams is not None:
            out["qParams"] = self.qParams
        return {**out, "nodes": self.nodes, "links": self.links, **self.extra}

    @property
    def scores(self) -> tuple[float | None, float | None]:
        s = self.metadata.get("saescope") or {}
        return s.get("replacement_score"), s.get("completeness_score")


def _need(d: dict, key: str, types: tuple, where: str):
    if key not in d:
        raise UserError(f"graph JSON: {where} has no {key!r}")
    if not isinstance(d[key], types) or (isinstance(d[key], bool) and bool not in types):
        raise UserError(f"graph JSON: {where}.{key} is {type(d[key]).__name__}; expected {'/'.join(t.__name__ for t in types)}")
    return d[key]


def load_graph_json(data: str | bytes | dict) -> GraphFile:
    """Read (and check) a circuit-tracer / Neuronpedia graph JSON."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise UserError(f"graph JSON: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise UserError("graph JSON: expected an object with metadata, nodes and links")
    meta = _need(data, "metadata", (dict,), "the file")
    for k in ("prompt_tokens",):
        _need(meta, k, (list,), "metadata")
    _need(meta, "prompt", (str,), "metadata")
    nodes = _need(data, "nodes", (list,), "the file")
    links = _need(data, "links", (list,), "the file")
    if len(nodes) > MAX_NODES or len(links) > MAX_LINKS:
        raise UserError(f"graph JSON: {len(nodes)} nodes and {len(links)} links; saescope draws at most {MAX_NODES} "
                        f"nodes and {MAX_LINKS} links (prune the graph further)")
    n_pos = len(meta["prompt_tokens"])
    ids = set()
    for i, n in enumerate(nodes):
        if not isinstance(n, dict):
            raise UserError(f"graph JSON: nodes[{i}] is not an object")
        nid = _need(n, "node_id", (str,), f"nodes[{i}]")
        if nid in ids:
            raise UserError(f"graph JSON: nodes[{i}].node_id {nid[:80]!r} appears twice (node ids must be unique)")
        ids.add(nid)
        _need(n, "feature_type", (str,), f"nodes[{i}]")
        ctx = _need(n, "ctx_idx", (int,), f"nodes[{i}]")
        if not 0 <= ctx < n_pos:
            raise UserError(f"graph JSON: nodes[{i}].ctx_idx is {ctx}; metadata.prompt_tokens has {n_pos} tokens, "
                            f"so it must be 0 to {n_pos - 1}")
        layer = _need(n, "layer", (str, int), f"nodes[{i}]")
        if layer != "E" and not (isinstance(layer, int) or str(layer).isdigit()):
            raise UserError(f"graph JSON: nodes[{i}].layer is {str(layer)[:20]!r}; expected \"E\" (embeddings) or a "
                            "layer number")
        for k in ("influence", "activation", "token_prob"):
            v = n.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UserError(f"graph JSON: nodes[{i}].{k} is {str(v)[:20]!r}; expected a finite number or null")
    for i, lk in enumerate(links):
        if not isinstance(lk, dict):
            raise UserError(f"graph JSON: links[{i}] is not an object")
        for k in ("source", "target"):
            if _need(lk, k, (str,), f"links[{i}]") not in ids:
                raise UserError(f"graph JSON: links[{i}].{k} {lk[k][:80]!r} is not a node_id of any node")
        if not math.isfinite(_need(lk, "weight", (int, float), f"links[{i}]")):
            raise UserError(f"graph JSON: links[{i}].weight is {lk['weight']}; expected a finite number")
    q = data.get("qParams")
    if q is not None and not isinstance(q, dict):
        raise UserError("graph JSON: qParams is not an object")
    extra = {k: v for k, v in data.items() if k not in ("metadata", "qParams", "nodes", "links")}
    return GraphFile(meta, q, nodes, links, extra)


def write_graph_files(data: dict[str, Any], folder) -> "Path":
    """Write `{slug}.json` and update `graph-metadata.json` in `folder`, the layout circuit-tracer's local server
    (`circuit-tracer start-server --graph_file_dir`) and Neuronpedia's uploader read."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slug = data["metadata"]["slug"]
    out = folder / f"{slug}.json"
    out.write_text(json.dumps(data))
    index = folder / "graph-metadata.json"
    meta = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
    meta["graphs"] = [g for g in meta.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    index.write_text(json.dumps(meta, indent=2))
    return out


def check_slug(slug: str) -> str:
    if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug):
        raise UserError(f"graph slug {str(slug)[:80]!r}: use 1 to 80 letters, digits, '-' or '_' (starting with a "
                        "letter or digit)")
    return slug


def slug_for(text: str) -> str:
    """A slug from a prompt or a file name: its words joined by '-', at most 40 characters."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    return "-".join(words)[:40].strip("-") or "graph"


def stored_row(gf: GraphFile, slug: str, source: str, target: str = "", sae_ids: dict | None = None) -> dict[str, Any]:
    """A checked graph as the store's graphs row (precompute/store/schema.py GRAPHS, without `created`): its JSON
    text is what `load_graph_json` reads back unchanged."""
    check_slug(slug)
    rep, comp = gf.scores
    s = gf.metadata.get("saescope") or {}
    ids = {str(k): str(v) for k, v in (sae_ids if sae_ids is not None else s.get("sae_ids") or {}).items()}
    return {"slug": slug, "prompt": gf.metadata["prompt"], "target": target or "", "source": source,
            "n_nodes": len(gf.nodes), "n_links": len(gf.links),
            "replacement_score": rep if isinstance(rep, (int, float)) else None,
            "completeness_score": comp if isinstance(comp, (int, float)) else None,
            "sae_ids": ids, "graph": json.dumps(gf.to_json())}
