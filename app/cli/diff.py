"""`saescope diff`: what changed between two versions of a model, seen through one SAE."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saescope.precompute.config import DIFF, PRECOMPUTE

NAME = "diff"
HELP = "what changed between two versions of a model, seen through one SAE"
DESCRIPTION = ("One pass over the same token contexts with each model (same architecture, e.g. base and "
               "fine-tuned) through the same SAE: per feature the change in density, mean and max "
               "activation and the contexts where the two differ most, plus the SAE's reconstruction "
               "quality (explained variance, MSE) on each model's activations. Writes OUT/ (diff.json, "
               "features.parquet, features.csv, examples.json); `saescope export --format html --diff OUT` "
               "makes its report.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True, help="the reference model (folder, hub id or 'default')")
    p.add_argument("--model-b", required=True, help="the changed model")
    p.add_argument("--sae", required=True, help="SAE folder/file or 'default' (read at its hook in both models)")
    p.add_argument("--hook", default=None, help="override the SAE's hook")
    p.add_argument("--dataset", default="default", help="'default', a .txt/.jsonl/.parquet file, or a HF dataset id")
    p.add_argument("--text-field", default=PRECOMPUTE.text_field, help="text column")
    p.add_argument("--tokens", type=int, default=DIFF.tokens, help="tokens (whole contexts) to compare on")
    p.add_argument("--context-len", type=int, default=DIFF.context_len, help="tokens per context, BOS included")
    p.add_argument("--batch-size", type=int, default=DIFF.batch_size, help="contexts per forward pass")
    p.add_argument("--out", type=Path, required=True, help="folder for the diff (created; replaced with --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="model dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.diff import DiffArgs, run_diff

    r = run_diff(DiffArgs(model_a=args.model_a, model_b=args.model_b, sae=args.sae, hook=args.hook,
                          dataset=args.dataset, text_field=args.text_field, tokens=args.tokens,
                          context_len=args.context_len, batch_size=args.batch_size, out=args.out, force=args.force,
                          device=args.device, dtype=args.dtype, progress=not args.no_progress))
    q = r["quality"]
    print(f"{r['n_tokens']:,} tokens; explained variance A {q['a']['explained_variance']:.4f}, B "
          f"{q['b']['explained_variance']:.4f}; MSE A {q['a']['mse']:.4g}, B {q['b']['mse']:.4g}")
    for w in r["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0
