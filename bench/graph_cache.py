"""The worker's graph cache: wall time of POST /graph for a first request (the graph is built), a reload (same
request: served from the cache) and new pruning thresholds (re-pruned and re-checked, not rebuilt), and of
POST /graph/intervene, on a store's transcoders (default: the demo store). Prints the same-run ratios.

Usage: python bench/graph_cache.py [--store out/demo.duckdb] [--prompt "import numpy as"] [--no-verify]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from saescope.precompute.config import EMBEDDED

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=EMBEDDED.store)
    ap.add_argument("--prompt", default=EMBEDDED.graph_prompt)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine, sources_from_store, store_dtype
    from saescope.app.worker.routes import create_worker_app

    model, saes, hooks = sources_from_store(args.store)
    engine = build_engine(model, saes, hooks, "cpu", store_dtype(args.store))
    q = {"text": args.prompt, "verify": not args.no_verify}
    with TestClient(create_worker_app(engine)) as client:
        def post(path, body):
            t0 = time.perf_counter()
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text[:500]
            return time.perf_counter() - t0, r.json()

        t_first, first = post("/graph", q)
        t_reload, again = post("/graph", q)
        t_prune, _ = post("/graph", {**q, "node_threshold": 0.6, "edge_threshold": 0.9})
        feat = [n["node_id"] for n in first["graph"]["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
        edits = [{"layer": int(f.split("_")[0]), "feature": int(f.split("_")[1]), "pos": int(f.split("_")[2]),
                  "mode": "scale", "value": 0.0} for f in feat]
        t_iv, _ = post("/graph/intervene", {"text": args.prompt, "edits": edits})
    assert again["cached"] and not first["cached"]
    print(f"store {args.store}, prompt {args.prompt!r}, transcoders at layers {sorted(first['sae_ids'])}, "
          f"checks {'off' if args.no_verify else 'on'}")
    print(f"first request (graph built):      {t_first:8.2f} s")
    print(f"reload (cached):                  {t_reload:8.3f} s   ratio first/reload {t_first / t_reload:8.1f}x")
    print(f"new thresholds (re-prune, check): {t_prune:8.2f} s   ratio first/new-thresholds {t_first / t_prune:6.1f}x")
    print(f"intervention, {len(edits)} edits (3 passes):   {t_iv:8.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
