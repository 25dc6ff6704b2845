"""Attribution graphs on residual-stream SAEs (precompute/circuits/residual.py) on the embedded default
(SmolLM2-135M, CPU): time and peak memory for 16- and 32-token prompts, graph sizes before and after pruning,
replacement/completeness scores, and the real-ablation gaps (median and worst |estimate - true| over checked nodes).

SAEs: --saes PATH[,PATH...] (SAELens folders at blocks.L.hook_resid_pre/post); default: the demo SAE (TopK, 4096
features, blocks.9.hook_resid_post). --random-layers 3,15,21 adds random TopK stand-ins (width --width, k --k) at
blocks.L.hook_resid_post: their costs are those of real SAEs of that shape, their scores and gaps say nothing.

Each prompt length runs in a fresh child process (its own peak RSS, from getrusage).
Usage: python bench/circuits_residual.py [--tokens 16 32] [--saes PATHS] [--random-layers 3,15,21]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def saes(lm, args):
    import torch

    from saescope.precompute.embedded import resolve_sae
    from saescope.precompute.saes import SAEConfig, load_sae
    from saescope.precompute.saes.topk import TopKSAE

    out = [load_sae(p) for p in (args.saes.split(",") if args.saes else [resolve_sae("default")])]
    g = torch.Generator().manual_seed(0)
    d = lm.d_model
    for layer in [int(x) for x in args.random_layers.split(",") if x]:
        s = TopKSAE(SAEConfig(architecture="topk", d_in=d, d_sae=args.width, k=args.k,
                              hook_name=f"blocks.{layer}.hook_resid_post", source=f"random-topk-{layer}"))
        with torch.no_grad():
            s.W_enc.copy_(torch.randn(d, args.width, generator=g) / d ** 0.5)
            s.W_dec.copy_(torch.randn(args.width, d, generator=g) / d ** 0.5)
        out.append(s.eval())
    return [s.to(lm.dtype) for s in out]


def one(n_tokens: int, args) -> dict:
    import torch

    from saescope.precompute.circuits.residual import ResidualSAESet, verify_residual
    from saescope.precompute.circuits.run import circuit
    from saescope.precompute.config import CIRCUIT
    from saescope.precompute.data import demo_corpus
    from saescope.precompute.embedded import resolve_model
    from saescope.precompute.models import load_model

    lm = load_model(resolve_model("default"), "auto", "float32")
    rs = ResidualSAESet.from_saes(saes(lm, args), lm.n_layers)
    with demo_corpus().open() as f:
        text = json.loads(next(f))["text"]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    ids = [lm.tokenizer.bos_token_id or 0] + ids
    cfg = replace(CIRCUIT, max_feature_nodes=args.max_feature_nodes, max_seconds=args.max_seconds)
    with torch.no_grad():  # calibration: one plain forward pass of the same prompt (a shared machine varies)
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
        tf = time.perf_counter()
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
        forward_s = time.perf_counter() - tf
    t0 = time.perf_counter()
    r = circuit(lm, rs, ids, cfg=cfg, check=False)
    graph_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    nodes, edges = verify_residual(lm, rs, r.graph, r.pruned, cfg)
    verify_s = time.perf_counter() - t1
    g, p = r.graph, r.pruned
    gaps = [abs(n.estimate - n.true) for n in nodes]
    egaps = [abs(e.estimate - e.true) for e in edges]
    return {
        "tokens": len(ids), "sae_layers": g.meta["layer_labels"], "plain_forward_seconds": round(forward_s, 3),
        "graph_seconds": round(graph_s, 2), "graph_in_forwards": round(graph_s / forward_s, 1),
        "load_average": os.getloadavg()[0], "verify_seconds": round(verify_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "active_features": g.n_active, "feature_nodes": g.n_features, "nodes_before": g.n_nodes,
        "edges_before": int((g.adjacency != 0).sum()), "nodes_after": int(p.node_mask.sum()),
        "edges_after": int(p.edge_mask.sum()), "replacement_score": round(r.scores[0], 4),
        "completeness_score": round(r.scores[1], 4), "backward_passes": g.meta["backward_passes"],
        "node_gap_median": statistics.median(gaps) if gaps else None, "node_gap_worst": max(gaps) if gaps else None,
        "edge_gap_median": statistics.median(egaps) if egaps else None, "edge_gap_worst": max(egaps) if egaps else None,
        "nodes_flagged": sum(not n.agree for n in nodes), "nodes_checked": len(nodes),
        "edges_flagged": sum(not e.agree for e in edges), "edges_checked": len(edges),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--saes", default=None)
    ap.add_argument("--random-layers", default="")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-feature-nodes", type=int, default=2048)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return
    for n in args.tokens:
        cmd = [sys.executable, __file__, "--one", str(n), "--width", str(args.width), "--k", str(args.k),
               "--max-feature-nodes", str(args.max_feature_nodes), "--max-seconds", str(args.max_seconds),
               "--random-layers", args.random_layers]
        if args.saes:
            cmd += ["--saes", args.saes]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
