"""`saescope graph STORE`: compute an attribution graph with the store's transcoders and store it, or import a
circuit-tracer / Neuronpedia graph JSON file into the store. Stored graphs are pages (/graph/SLUG) that need no
model worker, and files (/graph/SLUG.json) in circuit-tracer's format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import NotFound, UserError

NAME = "graph"
HELP = "store an attribution graph in a store: computed with its transcoders (--prompt) or imported (--import)"
DESCRIPTION = ("--prompt computes the graph through the library (the store's transcoders, one per layer, and on the "
               "embedded default the committed demo transcoders of every other layer, as the worker's graphs do; the "
               "model the store was built with), prunes it, checks its top nodes and edges against real ablations and stores it "
               "as circuit-tracer's JSON (the checks under metadata.saescope). --import reads a circuit-tracer / "
               "Neuronpedia graph JSON file, checks it and stores it unchanged. The store is rewritten atomically; "
               "the page is /graph/SLUG (restart `saescope serve` to see a new one).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt whose next token the graph explains (BOS is added)")
    src.add_argument("--import", dest="import_file", type=Path, metavar="FILE.json",
                     help="a circuit-tracer / Neuronpedia graph JSON file to store")
    p.add_argument("--target", default="", help="one-token logit target (default: the top tokens until cumulative "
                   f"probability {CIRCUIT.logit_prob}, at most {CIRCUIT.max_logits})")
    p.add_argument("--slug", default=None, help="the graph's name in the store and URL (default: from the prompt or "
                   "the file's metadata.slug / name)")
    p.add_argument("--replace", action="store_true", help="replace a stored graph of the same slug")
    p.add_argument("--transcoders", nargs="+", default=None, metavar="SAE_ID",
                   help="the store's transcoders to use, only these (default: all, one per layer, plus on the "
                   "embedded default the demo transcoders of the other layers)")
    p.add_argument("--node-threshold", type=float, default=CIRCUIT.node_threshold, help="cumulative influence kept (nodes)")
    p.add_argument("--edge-threshold", type=float, default=CIRCUIT.edge_threshold, help="cumulative edge score kept")
    p.add_argument("--max-feature-nodes", type=int, default=CIRCUIT.max_feature_nodes,
                   help="feature nodes whose incoming edges are computed")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: the one the store was built with)")


def run(args: argparse.Namespace) -> int:
    if args.import_file is not None:
        row = import_graph(args.store, args.import_file, args.slug, args.replace)
    else:
        row = compute_graph(args.store, args.prompt, args.target, args.slug, args.replace, args.transcoders,
                            args.node_threshold, args.edge_threshold, args.max_feature_nodes, args.device, args.dtype)
    scores = ""
    if row["replacement_score"] is not None:
        scores = (f", replacement score {row['replacement_score']:.3f}, completeness score "
                  f"{row['completeness_score']:.3f}")
    print(f"stored graph {row['slug']!r} in {args.store}: {row['n_nodes']} nodes, {row['n_links']} links{scores}; "
          f"its page: /graph/{row['slug']}")
    return 0


def import_graph(store: Path, file: Path, slug: str | None = None, replace: bool = False) -> dict:
    """Check a graph JSON file and store it unchanged; the row stored."""
    from saescope.precompute.circuits.export import SLUG_RE, load_graph_json, slug_for, stored_row
    from saescope.precompute.store import Store
    from saescope.precompute.store.write import write_graph

    if not file.is_file():
        raise NotFound(f"{file}: no such file (a circuit-tracer / Neuronpedia graph JSON)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); expected a graph JSON file") from err
    try:
        gf = load_graph_json(text)
    except UserError as err:
        raise UserError(f"{file}: {err}") from err
    if slug is None:
        meta_slug = gf.metadata.get("slug")
        slug = meta_slug if isinstance(meta_slug, str) and SLUG_RE.fullmatch(meta_slug) else slug_for(file.stem)
    with Store(store) as s:  # feature cards: the file's transcoders, when they are this store's SAEs
        have = {x.sae_id for x in s.saes()}
    sae_ids = {k: v for k, v in ((gf.metadata.get("saescope") or {}).get("sae_ids") or {}).items() if v in have}
    row = stored_row(gf, slug, f"imported from {file.name}", sae_ids=sae_ids)
    write_graph(store, row, replace=replace)
    return row


def select_transcoders(store: Path, names: list[str] | None) -> tuple[str, dict[int, tuple[str, str, str]]]:
    """(model path, {layer: (sae_id, sae path, hook)}) of the store's transcoders, one per layer."""
    from saescope.precompute.models import parse_hook
    from saescope.precompute.saes import TRANSCODER_REGISTRY
    from saescope.precompute.store import Store

    from ..worker.engine import sources_from_store

    model, paths, hooks = sources_from_store(store)
    with Store(store) as s:
        infos = {x.sae_id: x for x in s.saes()}
    tcs = {k: x for k, x in infos.items() if x.architecture in TRANSCODER_REGISTRY}
    if not tcs:
        kinds = ", ".join(f"{k} ({x.architecture} at {x.hook})" for k, x in infos.items())
        raise UserError(f"the store {store.name} has no transcoders, so it cannot build attribution graphs (its SAEs: "
                        f"{kinds}); precompute transcoders (SAELens transcoder folders) into it first")
    if names:
        unknown = [n for n in names if n not in tcs]
        if unknown:
            raise UserError(f"unknown transcoder {unknown[0][:80]!r}; the store's transcoders: {', '.join(sorted(tcs))}")
        tcs = {n: tcs[n] for n in names}
    n_layers = 10**6  # parse_hook only needs an upper bound here; the model's own count is checked on load
    by_layer: dict[int, tuple[str, str, str]] = {}
    for k, x in tcs.items():
        layer = parse_hook(x.hook, n_layers).layer
        if layer in by_layer:
            raise UserError(f"transcoders {by_layer[layer][0]} and {k} both read layer {layer}; name one per layer "
                            "with --transcoders")
        by_layer[layer] = (k, paths[k], hooks[k])
    return model, by_layer


def compute_graph(store: Path, prompt: str, target: str = "", slug: str | None = None, replace: bool = False,
                  names: list[str] | None = None, node_threshold: float = CIRCUIT.node_threshold,
                  edge_threshold: float = CIRCUIT.edge_threshold, max_feature_nodes: int = CIRCUIT.max_feature_nodes,
                  device: str = "cpu", dtype: str = "auto") -> dict:
    """Build, prune, score and check the graph of `prompt` with the store's transcoders; store it; the row stored."""
    from dataclasses import replace as dc_replace

    from saescope.precompute.circuits.export import check_slug, load_graph_json, slug_for, stored_row
    from saescope.precompute.circuits.run import circuit
    from saescope.precompute.circuits.transcoders import TranscoderSet
    from saescope.precompute.encode import check_d_in
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae
    from saescope.precompute.store import Store
    from saescope.precompute.store.write import write_graph

    from saescope.precompute.models import parse_hook

    from ..worker.engine import demo_graph_transcoders, store_dtype

    if not prompt or not prompt.strip():
        raise UserError("--prompt is empty; give the text whose next token the graph explains")
    for name, v in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} {v}; valid: 0 to 1 (the share of cumulative influence kept)")
    if not 1 <= max_feature_nodes <= CIRCUIT.max_feature_nodes:
        raise UserError(f"--max-feature-nodes {max_feature_nodes}; valid: 1 to {CIRCUIT.max_feature_nodes}")
    slug = check_slug(slug if slug is not None else slug_for(prompt))
    with Store(store) as s:  # refuse a taken slug before minutes of compute
        if s.graph(slug) is not None and not replace:
            raise UserError(f"the store {store.name} already has a graph {slug!r}; choose another --slug or pass --replace")
    model, by_layer = select_transcoders(store, names)
    lm = load_model(model, device, store_dtype(store) if dtype == "auto" else dtype)
    saes = {}
    for layer, (k, path, hook) in sorted(by_layer.items()):
        sae = load_sae(path, hook)
        check_d_in(lm, sae, sae_name=k, model_name=model)
        saes[k] = sae.to(lm.device)
    # on the embedded default (and without --transcoders): the committed demo transcoders of every other layer too,
    # as the worker's graphs use them (a layer without a transcoder is all error node)
    extra = demo_graph_transcoders(model, lm, saes) if not names else {}
    layer_of = {k: parse_hook(x.cfg.hook_name, lm.n_layers).layer for k, x in {**saes, **extra}.items()}
    order = sorted(layer_of, key=layer_of.get)
    ts = TranscoderSet.from_saes([{**saes, **extra}[k] for k in order], lm.n_layers)
    cfg = dc_replace(CIRCUIT, max_feature_nodes=max_feature_nodes)
    r = circuit(lm, ts, prompt, target or None, cfg, node_threshold, edge_threshold, check=True)
    ids: dict[int, str] = {}
    sae_ids = {str(layer_of[k]): k for k in order}
    labels = _explanations(store, by_layer, r)
    data = r.to_json(slug=slug, scan=lm.name, node_threshold=node_threshold, ids_out=ids,
                     clerp=lambda layer, feature: labels.get((layer, feature), ""))
    data["metadata"]["saescope"].update(
        sae_ids=sae_ids, target=target or "", edge_threshold=edge_threshold, max_feature_nodes=max_feature_nodes,
        seconds=r.graph.meta.get("seconds"),
        node_checks=[{"node_id": ids[c.node], "estimate": c.estimate, "true": c.true, "agree": c.agree}
                     for c in r.node_checks if c.node in ids],
        edge_checks=[{"source": ids[c.source], "target": ids[c.target], "weight": c.weight, "estimate": c.estimate,
                      "true": c.true, "agree": c.agree} for c in r.edge_checks if c.source in ids and c.target in ids])
    gf = load_graph_json(json.dumps(data))  # the importer's checks on what is stored
    row = stored_row(gf, slug, f"computed with {lm.name} and transcoders {', '.join(sae_ids.values())}",
                     target=target, sae_ids={l: k for l, k in sae_ids.items() if k in saes})  # the store's (cards, links)
    write_graph(store, row, replace=replace)
    return row


def _explanations(store: Path, by_layer: dict[int, tuple[str, str, str]], r) -> dict[tuple[int, int], str]:
    """(layer, feature) -> the first stored explanation of each feature node kept by pruning (the nodes' clerp)."""
    from saescope.precompute.store import Store

    kept = r.pruned.node_mask[: r.graph.n_features].nonzero()[:, 0].tolist()
    out = {}
    with Store(store) as s:
        for i in kept:
            layer, _, feature = (int(v) for v in r.graph.features[i])
            sid = by_layer.get(layer, ("",))[0]
            f = s.feature(sid, feature) if sid else None
            if f is not None and f.explanations:
                out[(layer, feature)] = f.explanations[0]
    return out
