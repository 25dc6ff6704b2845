"""Cost of the quality metrics as a share of a default demo precompute (goal: <= 10%).

Runs `run_precompute` with every default (the embedded SmolLM2 + demo SAE, 262,144 tokens, --eval-tokens default)
and reads the quality row's wall seconds (the eval passes) against the whole run's wall time.

Usage: python bench/quality_cost.py [--out /tmp/quality_cost.duckdb] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from saescope.precompute.config import PRECOMPUTE
    from saescope.precompute.pipeline import PrecomputeSpec as PrecomputeArgs, run_precompute
    from saescope.precompute.store import Store

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/quality_cost.duckdb"))
    ap.add_argument("--tokens", type=int, default=PRECOMPUTE.tokens)
    a = ap.parse_args()
    args = PrecomputeArgs(out=a.out, tokens=a.tokens, restart=True, progress=False)
    t0 = time.time()
    run_precompute(args)
    wall = time.time() - t0
    with Store(a.out) as st:
        q = next(iter(st.quality().values()))
    print(json.dumps({"tokens": a.tokens, "eval_tokens": PRECOMPUTE.eval_tokens, "eval_counted": q.n_tokens,
                      "precompute_wall_s": round(wall, 1), "quality_s": round(q.seconds, 1),
                      "share": round(q.seconds / wall, 4), "timings": {k: round(v, 1) for k, v in args.timings.items()},
                      "explained_variance": q.explained_variance, "ce_loss_score": q.ce_loss_score, "l0": q.l0}))


if __name__ == "__main__":
    main()
