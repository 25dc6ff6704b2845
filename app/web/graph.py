"""The attribution graph page: /graph?prompt=...&target=...&node=0.8&edge=0.98&pinned=...&groups=...&selected=...

The worker builds the graph (POST /graph); this module lays it out as server-rendered SVG (layers bottom to top,
positions left to right, node size by influence, edge width and colour by weight and sign) and embeds the nodes
and links as JSON for static/graph.js (click a node for its card, pin nodes, group pinned nodes into labelled
supernodes; every choice is written back into the URL, so a reload shows the same view).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from saescope.precompute.config import CIRCUIT

from ..errors import AppError
from ..settings import GRAPH
from ..worker.wire import GraphIn, GraphOut
from .live_views import client_of as _client, worker_status
from .pages import store_of
from .templates import page

router = APIRouter()
CELL_W, ROW_H, MARGIN = 96, 56, 40
TOP = 90  # room above the logit row for its rotated labels


@dataclass
class Layout:
    width: int
    height: int
    nodes: list[dict]  # node JSON + x, y, r, row
    links: list[dict]  # + x1, y1, x2, y2, w (stroke width), sign
    rows: list[tuple[int, str]]  # (y, label)
    cols: list[tuple[int, str]]  # (x, token)


def layout(g: dict) -> Layout:
    meta, nodes, links = g["metadata"], g["nodes"], g["links"]
    n_layers = int((meta.get("saescope") or {}).get("n_layers") or max(
        (int(n["layer"]) for n in nodes if n["feature_type"] != "logit" and n["layer"] != "E"), default=0) + 1)
    T = len(meta["prompt_tokens"])

    def row(n):
        if n["layer"] == "E":
            return 0
        if n["feature_type"] == "logit":
            return n_layers + 1
        return int(n["layer"]) + 1

    cells: dict[tuple[int, int], list[dict]] = {}
    for n in nodes:
        cells.setdefault((row(n), n["ctx_idx"]), []).append(n)
    height = MARGIN + TOP + ROW_H * (n_layers + 1)
    width = MARGIN * 2 + CELL_W * T
    placed = []
    for (r, c), members in cells.items():
        members.sort(key=lambda n: n["influence"] if n["influence"] is not None else -1.0)
        k = len(members)
        for j, n in enumerate(members):
            dx = (j - (k - 1) / 2) * min(14, (CELL_W - 16) / max(k, 1))
            infl = n["influence"]
            rad = 7 if n["feature_type"] in ("logit", "embedding") else 3 + 7 * (1 - infl if infl is not None else 0.5)
            placed.append({**n, "x": round(MARGIN + CELL_W * (c + 0.5) + dx, 1),
                           "y": round(height - MARGIN - ROW_H * r, 1), "r": round(rad, 1), "row": r})
    at = {n["node_id"]: n for n in placed}
    wmax = max((abs(lk["weight"]) for lk in links), default=1.0) or 1.0
    drawn = []
    for lk in sorted(links, key=lambda lk: abs(lk["weight"])):
        s, t = at.get(lk["source"]), at.get(lk["target"])
        if s is None or t is None:
            continue
        drawn.append({**lk, "x1": s["x"], "y1": s["y"], "x2": t["x"], "y2": t["y"],
                      "w": round(0.4 + 3.6 * abs(lk["weight"]) / wmax, 2), "sign": "pos" if lk["weight"] >= 0 else "neg"})
    rows = [(height - MARGIN, "tokens")] + [(height - MARGIN - ROW_H * (l + 1), f"L{l}") for l in range(n_layers)]
    rows.append((height - MARGIN - ROW_H * (n_layers + 1), "logits"))
    cols = [(MARGIN + CELL_W * (c + 0.5), tok) for c, tok in enumerate(meta["prompt_tokens"])]
    return Layout(width, height, placed, drawn, rows, cols)


def _ids(value: str | None) -> list[str]:
    out = [v for v in (value or "").split(",") if v][:GRAPH.max_ids]
    if any(len(v) > GRAPH.max_id_chars for v in out):
        raise AppError(f"a node id in the URL is longer than {GRAPH.max_id_chars} characters", 422)
    return out


def _groups(value: str | None) -> list[dict]:
    """groups=label:id,id;label:id -> [{label, members}]"""
    out = []
    for part in (value or "").split(";")[:GRAPH.max_groups]:
        if ":" in part:
            label, _, members = part.partition(":")
            out.append({"label": label[:GRAPH.max_label_chars], "members": _ids(members)})
    return out


@router.get("/graph", response_class=HTMLResponse)
def graph_page(request: Request, prompt: str = Query("", max_length=GRAPH.max_prompt_chars),
               target: str = Query("", max_length=GRAPH.max_target_chars),
               node: float = Query(CIRCUIT.node_threshold, ge=0.0, le=1.0),
               edge: float = Query(CIRCUIT.edge_threshold, ge=0.0, le=1.0),
               pinned: str = Query("", max_length=GRAPH.max_list_chars),
               groups: str = Query("", max_length=GRAPH.max_list_chars),
               selected: str = Query("", max_length=GRAPH.max_id_chars)):
    ctx = {"graph_settings": GRAPH, "prompt": prompt, "target": target, "node": node, "edge": edge, "worker": worker_status(request.app),
           "pinned": _ids(pinned), "groups": _groups(groups), "selected": selected, "result": None, "error": None}
    if prompt:
        try:
            out: GraphOut = _client(request).graph(GraphIn(text=prompt, target=target or None, node_threshold=node,
                                                           edge_threshold=edge))
        except AppError as err:
            if err.status >= 500 and err.status != 504:
                raise
            ctx["error"] = err
            return page(request, "graph.html", ctx, status=err.status)
        lay = layout(out.graph)
        store = store_of(request)
        cards = {}
        by_layer = {int(k): v for k, v in out.sae_ids.items()}
        feats: dict[str, list[int]] = {}
        for n in lay.nodes:
            if n["feature_type"] == "cross layer transcoder":
                sid = by_layer.get(int(n["layer"]))
                if sid:
                    feats.setdefault(sid, []).append(int(n["node_id"].split("_")[1]))
        for sid, idx in feats.items():
            if store.sae(sid) is None:
                continue
            for i, row in store.features_by_index(sid, idx).items():
                cards[f"{sid}/{i}"] = {"top_tokens": row.top_tokens[:8], "density": row.density, "max_act": row.max_act}
        checks = {c.node_id: c.model_dump() for c in out.node_checks}
        data = {"nodes": [{k: n[k] for k in ("node_id", "feature_type", "layer", "ctx_idx", "influence", "activation",
                                              "clerp", "token_prob")} for n in lay.nodes],
                "links": [{"source": lk["source"], "target": lk["target"], "weight": lk["weight"]} for lk in lay.links],
                # feature cards and links only for transcoders with dashboards in this store (the worker may use more)
                "sae_ids": {k: v for k, v in out.sae_ids.items() if store.sae(v) is not None}, "cards": cards, "checks": checks,
                "tokens": out.graph["metadata"]["prompt_tokens"]}
        ctx["result"] = {"out": out, "lay": lay, "data_json": json.dumps(data).replace("</", "<\\/"),
                         "meta": out.graph["metadata"].get("saescope", {}), "checks": out.node_checks,
                         "edge_checks": out.edge_checks, "node_ids": {n["node_id"] for n in lay.nodes}}
    return page(request, "graph.html", ctx)
