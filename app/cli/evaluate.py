"""`saescope eval`: recompute the SAE quality metrics of a store (SAELens's and SAEBench core's definitions)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import PRECOMPUTE as P

NAME = "eval"
HELP = "recompute the SAE quality metrics (CE loss score, explained variance, L0, ...) of a store"
DESCRIPTION = ("SAELens's and SAEBench core's definitions (precompute/quality.py) on the held-out tokens that follow "
               "the store's streamed contexts; model and SAEs from the store's provenance. The numbers are written "
               "into the store (its quality table) and shown on the SAE cards and the home page's table.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--sae", dest="sae_id", action="append", default=None,
                   help="SAE to evaluate (repeat; default: every SAE of the store)")
    p.add_argument("--eval-tokens", type=int, default=P.eval_tokens, help="eval tokens (default: %(default)s)")
    p.add_argument("--model", default=None, help="load the model from here instead of the store's model_path")
    p.add_argument("--device", default=P.device, help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--dtype", default=P.dtype, help="model dtype (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.quality import evaluate_store

    for r in evaluate_store(args.store, args.model, args.sae_id, args.eval_tokens, args.device, args.dtype):
        print(f"{r['sae_id']}: explained_variance {r['explained_variance']:.4f}  ce_loss_score {r['ce_loss_score']:.4f}  "
              f"l0 {r['l0']:.1f}  on {r['n_tokens']} tokens")
    return 0
