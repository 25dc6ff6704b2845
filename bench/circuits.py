"""Attribution graphs on the embedded default (SmolLM2-135M, CPU): time and peak memory for 16- and 32-token
prompts, graph sizes before and after pruning, replacement/completeness scores, and how far the graph's
estimates are from real ablations (median and worst |estimate - true| over the checked nodes).

Transcoders: --transcoders PATH (a circuit-tracer folder or SAELens transcoder folders, comma-separated). Without
one, random TopK transcoders (width --width, k --k) at every layer stand in: the costs are those of a real set of
that shape; the scores and the estimate-vs-true gaps of random features say nothing about trained ones.

Each prompt length runs in a fresh child process (its own peak RSS, from getrusage). On a shared machine the wall
time says little; graph_cpu_seconds (the process's CPU time, all threads) is what the graph cost.
Usage: python bench/circuits.py [--tokens 16 32] [--transcoders PATH] [--width 2048] [--k 32]
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


def random_transcoders(n_layers: int, d: int, width: int, k: int, seed: int = 0):
    import torch

    from saescope.precompute.circuits.transcoders import LayerEncoder, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    encs, b = {}, {}
    for l in range(n_layers):
        encs[l] = LayerEncoder(l, torch.randn(d, width, generator=g) / d ** 0.5, torch.zeros(width),
                               torch.randn(width, 1, d, generator=g) * 0.02, "topk", None, k, f"random-topk-{l}")
        b[l] = torch.zeros(d)
    return TranscoderSet(n_layers, encs, b, {}, "hook_mlp_in", "transcoder_set", ["random TopK stand-ins"])


def _cpu() -> float:
    """CPU seconds of this process (all threads): what the work cost, whatever else shares the machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def one(n_tokens: int, args) -> dict:
    import torch

    from saescope.precompute.circuits.run import circuit
    from saescope.precompute.circuits.transcoders import load_transcoders
    from saescope.precompute.config import CIRCUIT
    from saescope.precompute.data import demo_corpus
    from saescope.precompute.embedded import resolve_model
    from saescope.precompute.models import load_model

    lm = load_model(resolve_model("default"), "auto", "float32")
    if args.transcoders:
        ts = load_transcoders(args.transcoders.split(","), lm.n_layers)
    else:
        ts = random_transcoders(lm.n_layers, lm.d_model, args.width, args.k)
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
    c0, t0 = _cpu(), time.perf_counter()
    r = circuit(lm, ts, ids, cfg=cfg, check=False)
    graph_s, graph_cpu = time.perf_counter() - t0, _cpu() - c0
    c1, t1 = _cpu(), time.perf_counter()
    from saescope.precompute.circuits.verify import verify

    nodes, edges = verify(lm, ts, r.graph, r.pruned, cfg)
    verify_s, verify_cpu = time.perf_counter() - t1, _cpu() - c1
    g, p = r.graph, r.pruned
    gaps = [abs(n.estimate - n.true) for n in nodes]
    egaps = [abs(e.estimate - e.true) for e in edges]
    return {
        "tokens": len(ids), "plain_forward_seconds": round(forward_s, 3), "graph_seconds": round(graph_s, 2),
        "graph_cpu_seconds": round(graph_cpu, 2), "graph_in_forwards": round(graph_s / forward_s, 1),
        "load_average": os.getloadavg()[0], "verify_seconds": round(verify_s, 2), "verify_cpu_seconds": round(verify_cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "active_features": g.n_active, "feature_nodes": g.n_features, "nodes_before": g.n_nodes,
        "edges_before": int((g.adjacency != 0).sum()), "nodes_after": int(p.node_mask.sum()),
        "edges_after": int(p.edge_mask.sum()), "replacement_score": round(r.scores[0], 4),
        "completeness_score": round(r.scores[1], 4), "rows": g.meta.get("rows"),
        "backward_passes": g.meta["backward_passes"],
        "node_gap_median": statistics.median(gaps) if gaps else None, "node_gap_worst": max(gaps) if gaps else None,
        "edge_gap_median": statistics.median(egaps) if egaps else None, "edge_gap_worst": max(egaps) if egaps else None,
        "nodes_flagged": sum(not n.agree for n in nodes), "nodes_checked": len(nodes),
        "threads": torch.get_num_threads(),
        "transcoders": args.transcoders or f"random TopK width {args.width} k {args.k} at every layer",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--transcoders", default=None)
    ap.add_argument("--width", type=int, default=2048)
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
               "--max-feature-nodes", str(args.max_feature_nodes), "--max-seconds", str(args.max_seconds)]
        if args.transcoders:
            cmd += ["--transcoders", args.transcoders]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
