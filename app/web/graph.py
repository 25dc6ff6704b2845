"""The attribution graph pages.

/graph?prompt=...&target=...&node=0.8&edge=0.98&pinned=...&groups=...&selected=...&edit=...: the worker builds the
graph (POST /graph; it caches unpruned graphs, so a reload rebuilds nothing). /graph/SLUG: a graph stored in the
store (`saescope graph STORE`), drawn without the worker; /graph/SLUG.json its circuit-tracer JSON file.
POST /graph/upload: a circuit-tracer / Neuronpedia JSON file, checked by the importer, kept in memory (LRU,
GRAPH.uploads_kept) and shown at /graph/upload/KEY (not written to the store: the dashboard only reads it).

This module lays a graph out as server-rendered SVG (layers bottom to top, positions left to right, node size by
influence, edge width and colour by weight and sign) and embeds the nodes and links as JSON for static/graph.js
(click a node for its card, pin nodes, group pinned nodes into labelled supernodes, add node interventions; every
choice is written back into the URL, so a reload shows the same view). Node interventions (edit=NODE:scale:K or
edit=NODE:set:V, repeatable) run on the worker (POST /graph/intervene) and show the new top logits, frozen-attention
and real, beside the clean ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from saescope.precompute.circuits.export import SLUG_RE, load_graph_json
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError

from ..errors import AppError, echo
from ..settings import GRAPH, WORKER
from ..worker.wire import GraphEditIn, GraphIn, GraphInterveneIn, GraphOut
from .live_views import client_of as _client, note_down, worker_status
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
        members.sort(key=lambda n: n.get("influence") if n.get("influence") is not None else -1.0)
        k = len(members)
        for j, n in enumerate(members):
            dx = (j - (k - 1) / 2) * min(14, (CELL_W - 16) / max(k, 1))
            infl = n.get("influence")
            n = {**n, "clerp": n.get("clerp") or "", "influence": infl}
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
    labels = (meta.get("saescope") or {}).get("layer_labels") or [f"L{l}" for l in range(n_layers)]  # residual: hooks
    rows = [(height - MARGIN, "tokens")] + [(height - MARGIN - ROW_H * (l + 1), labels[l]) for l in range(n_layers)]
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


NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
EDIT_RE = re.compile(rf"(\d{{1,4}})_(\d{{1,9}})_(\d{{1,5}}):(scale|set):({NUMBER})")
EDIT_FORMAT = ("NODE:scale:K (the feature's activation times K) or NODE:set:V (set to V), NODE a feature node id "
               "LAYER_FEATURE_POS, e.g. 3_120_5:scale:-1 or 3_120_5:set:0")


def parse_edits(values: list[str]) -> list[GraphEditIn]:
    """edit=NODE:scale:K / edit=NODE:set:V (repeatable) -> checked wire edits; a bad one is a 422 naming the form."""
    if len(values) > WORKER.max_edits:
        raise AppError(f"{len(values)} node edits; at most {WORKER.max_edits} (max_edits)", 422)
    out = []
    for v in values:
        m = EDIT_RE.fullmatch(v.strip()) if len(v) <= GRAPH.max_id_chars + 40 else None
        if not m:
            raise AppError(f"edit {echo(v)} is not {EDIT_FORMAT}", 422)
        value = float(m.group(5))
        if not math.isfinite(value) or abs(value) > WORKER.max_abs_value:
            raise AppError(f"edit {echo(v)}: the value must be a number from -{WORKER.max_abs_value:g} to "
                           f"{WORKER.max_abs_value:g} (max_abs_value)", 422)
        if int(m.group(3)) >= CIRCUIT.max_tokens:
            raise AppError(f"edit {echo(v)}: position {m.group(3)} is beyond a graph's {CIRCUIT.max_tokens} tokens", 422)
        out.append(GraphEditIn(layer=int(m.group(1)), feature=int(m.group(2)), pos=int(m.group(3)), mode=m.group(4),
                               value=value))
    return out


def _view(request: Request, graph: dict, sae_ids: dict, node_checks: list[dict], edge_checks: list[dict],
          scores: tuple, note: str) -> dict:
    """What graph.html draws: layout, feature cards from the store, checks, the JSON for graph.js."""
    lay = layout(graph)
    store = store_of(request)
    cards = {}
    by_layer = {int(k): v for k, v in (sae_ids or {}).items()}
    feats: dict[str, list[int]] = {}
    for n in lay.nodes:
        if n["feature_type"] == "cross layer transcoder":
            sid = by_layer.get(int(n["layer"]))
            parts = str(n["node_id"]).split("_")
            if sid and len(parts) == 3 and parts[1].isdigit():
                feats.setdefault(sid, []).append(int(parts[1]))
    for sid, idx in feats.items():
        if store.sae(sid) is None:
            continue
        d_sae = store.sae(sid).d_sae
        for i, row in store.features_by_index(sid, [i for i in idx if 0 <= i < d_sae]).items():
            cards[f"{sid}/{i}"] = {"top_tokens": row.top_tokens[:8], "density": row.density, "max_act": row.max_act}
    sae_links = {str(k): v for k, v in by_layer.items() if store.sae(v) is not None}
    data = {"nodes": [{k: n.get(k) for k in ("node_id", "feature_type", "layer", "ctx_idx", "influence", "activation",
                                               "clerp", "token_prob")} for n in lay.nodes],
            "links": [{"source": lk["source"], "target": lk["target"], "weight": lk["weight"]} for lk in lay.links],
            "sae_ids": sae_links, "cards": cards, "checks": {c["node_id"]: c for c in node_checks},
            "tokens": graph["metadata"]["prompt_tokens"]}
    return {"lay": lay, "data_json": json.dumps(data).replace("</", "<\\/"),
            "meta": graph["metadata"].get("saescope") or {}, "checks": node_checks, "edge_checks": edge_checks,
            "replacement_score": scores[0], "completeness_score": scores[1], "note": note,
            "node_ids": {n["node_id"] for n in lay.nodes}}


def _ctx(request: Request, prompt: str, target: str, node: float, edge: float, pinned: str, groups: str,
         selected: str, edit: list[str]) -> dict:
    return {"graph_settings": GRAPH, "prompt": prompt, "target": target, "node": node, "edge": edge,
            "worker": worker_status(request.app), "pinned": _ids(pinned), "groups": _groups(groups),
            "selected": selected, "result": None, "error": None, "edits": parse_edits(edit), "edit_specs": edit,
            "intervention": None, "intervention_error": None, "stored": None, "upload": None,
            "stored_graphs": store_of(request).graphs(), "edit_format": EDIT_FORMAT}


def _intervene(request: Request, ctx: dict, text: str, sae_ids: dict) -> None:
    """Run the URL's node edits on the worker; a failure is shown beside the graph, never instead of it."""
    if not ctx["edits"]:
        return
    try:
        ctx["intervention"] = _client(request).graph_intervene(GraphInterveneIn(
            text=text, edits=ctx["edits"], sae_ids=sorted(set(sae_ids.values())) or None))
    except AppError as err:
        note_down(ctx, err)
        ctx["intervention_error"] = err


Q_PINNED = Query("", max_length=GRAPH.max_list_chars)
Q_SELECTED = Query("", max_length=GRAPH.max_id_chars)


@router.get("/graph", response_class=HTMLResponse)
def graph_page(request: Request, prompt: str = Query("", max_length=GRAPH.max_prompt_chars),
               target: str = Query("", max_length=GRAPH.max_target_chars),
               node: float = Query(CIRCUIT.node_threshold, ge=0.0, le=1.0),
               edge: float = Query(CIRCUIT.edge_threshold, ge=0.0, le=1.0),
               pinned: str = Q_PINNED, groups: str = Q_PINNED, selected: str = Q_SELECTED,
               edit: list[str] = Query([], max_length=WORKER.max_edits + 1)):
    ctx = _ctx(request, prompt, target, node, edge, pinned, groups, selected, edit)
    if prompt:
        try:
            out: GraphOut = _client(request).graph(GraphIn(text=prompt, target=target or None, node_threshold=node,
                                                           edge_threshold=edge))
        except AppError as err:
            if err.status >= 500 and err.status != 504:
                raise
            ctx["error"] = err
            return page(request, "graph.html", ctx, status=err.status)
        note = (f"cached graph (built in {out.graph_seconds:.1f} s; re-pruned and checked in {out.seconds:.1f} s)"
                if out.cached else f"{out.seconds:.1f} s")
        ctx["result"] = _view(request, out.graph, {str(k): v for k, v in out.sae_ids.items()},
                              [c.model_dump() for c in out.node_checks], [c.model_dump() for c in out.edge_checks],
                              (out.replacement_score, out.completeness_score), note)
        _intervene(request, ctx, prompt, {str(k): v for k, v in out.sae_ids.items()})
    return page(request, "graph.html", ctx)


def _file_view(request: Request, ctx: dict, graph: dict, sae_ids: dict, note: str) -> None:
    s = graph["metadata"].get("saescope") or {}
    checks = s.get("node_checks") if isinstance(s.get("node_checks"), list) else []
    edge_checks = s.get("edge_checks") if isinstance(s.get("edge_checks"), list) else []
    ok = (lambda c, keys: isinstance(c, dict) and all(isinstance(c.get(k), (int, float)) for k in keys))
    checks = [c for c in checks if ok(c, ("estimate", "true")) and isinstance(c.get("node_id"), str)]
    edge_checks = [c for c in edge_checks if ok(c, ("weight", "estimate", "true"))
                   and isinstance(c.get("source"), str) and isinstance(c.get("target"), str)]
    scores = tuple(v if isinstance(v, (int, float)) else None
                   for v in (s.get("replacement_score"), s.get("completeness_score")))
    ctx["result"] = _view(request, graph, sae_ids, checks, edge_checks, scores, note)


def _stored(request: Request, slug: str):
    row = store_of(request).graph(slug) if SLUG_RE.fullmatch(slug) else None
    if row is None:
        have = ", ".join(g.slug for g in store_of(request).graphs()[:20]) or "none"
        raise AppError(f"no stored graph {echo(slug)} in this store (stored graphs: {have}); store one with "
                       "`saescope graph STORE --prompt P` or `--import FILE.json`", 404, title="No such graph")
    return row


@router.get("/graph/{slug}.json")
def graph_json(request: Request, slug: str):
    """The stored graph's circuit-tracer JSON, exactly as stored (Neuronpedia's viewer and circuit-tracer read it)."""
    row = _stored(request, slug)
    return Response(row.graph, media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{row.slug}.json"'})


@router.get("/graph/{slug}", response_class=HTMLResponse)
def stored_graph_page(request: Request, slug: str, pinned: str = Q_PINNED, groups: str = Q_PINNED,
                      selected: str = Q_SELECTED, edit: list[str] = Query([], max_length=WORKER.max_edits + 1)):
    row = _stored(request, slug)
    ctx = _ctx(request, row.prompt, row.target, CIRCUIT.node_threshold, CIRCUIT.edge_threshold, pinned, groups,
               selected, edit)
    graph = json.loads(row.graph)
    ctx["stored"] = row
    _file_view(request, ctx, graph, row.sae_ids, f"stored {row.created} ({row.source})")
    _intervene(request, ctx, row.prompt, row.sae_ids)
    return page(request, "graph.html", ctx)


class Uploads:
    """Uploaded graph files, checked, kept in memory (least recently used dropped, GRAPH.uploads_kept)."""

    def __init__(self, keep: int = GRAPH.uploads_kept):
        self.keep, self._items, self._lock = keep, OrderedDict(), threading.Lock()

    def put(self, text: str, data: dict) -> str:
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._items.get(key)


def _uploads(request: Request) -> Uploads:
    app = request.app
    if getattr(app.state, "graph_uploads", None) is None:
        app.state.graph_uploads = Uploads()
    return app.state.graph_uploads


@router.post("/graph/upload", response_class=HTMLResponse)
async def upload_graph(request: Request, file: UploadFile = File(description="a circuit-tracer / Neuronpedia graph JSON")):
    limit = GRAPH.max_upload_mb << 20
    raw = await file.read(limit + 1)
    if len(raw) > limit:
        raise AppError(f"the file is larger than {GRAPH.max_upload_mb} MB (the upload limit)", 413)
    try:
        text = raw.decode("utf-8")
        gf = load_graph_json(text)
    except UnicodeDecodeError as err:
        raise AppError(f"{echo(file.filename or 'the file')} is not UTF-8 text; expected a graph JSON file", 422) from err
    except UserError as err:
        raise AppError(f"{echo(file.filename or 'the file')}: {err}", 422) from err
    key = _uploads(request).put(text, {"graph": gf.to_json(), "name": file.filename or "upload.json"})
    return RedirectResponse(f"/graph/upload/{key}", status_code=303)


@router.get("/graph/upload/{key}", response_class=HTMLResponse)
def uploaded_graph_page(request: Request, key: str, pinned: str = Q_PINNED, groups: str = Q_PINNED,
                        selected: str = Q_SELECTED):
    item = _uploads(request).get(key) if re.fullmatch(r"[0-9a-f]{16}", key) else None
    if item is None:
        raise AppError("no uploaded graph under this address (uploads are kept in memory, the last "
                       f"{GRAPH.uploads_kept}, until the server restarts); upload the file again on /graph", 404,
                       title="No such graph")
    graph = item["graph"]
    ctx = _ctx(request, graph["metadata"]["prompt"], "", CIRCUIT.node_threshold, CIRCUIT.edge_threshold, pinned,
               groups, selected, [])
    ctx["upload"] = item["name"]
    sae_ids = (graph["metadata"].get("saescope") or {}).get("sae_ids") or {}
    sae_ids = {str(k): v for k, v in sae_ids.items() if isinstance(v, str)} if isinstance(sae_ids, dict) else {}
    _file_view(request, ctx, graph, sae_ids, f"uploaded {item['name']} (kept in memory; store it with "
               "`saescope graph STORE --import FILE.json`)")
    return page(request, "graph.html", ctx)
