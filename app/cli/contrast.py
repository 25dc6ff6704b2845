"""`saescope contrast`: features that separate two sets of texts, and sparse probes, stored under a name."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import PRECOMPUTE as P

NAME = "contrast"
HELP = "features that separate two sets of texts (AUROC, mean difference) + sparse probes"
DESCRIPTION = ("Per text, each feature's max (or mean) activation; features ranked by AUROC of A vs B, both sides; "
               "SAEBench-style sparse probes (k = 1, 2, 5, 20 features by mean difference, logistic regression, 20% "
               "held out) next to a dense probe on the raw activations. Stored under NAME: /sae/ID/contrast/NAME.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--sae", dest="sae_id", required=True, help="SAE of the store")
    p.add_argument("--a", dest="a_path", type=Path, required=True, help="texts A: .txt (one per line) or .jsonl (text field)")
    p.add_argument("--b", dest="b_path", type=Path, required=True, help="texts B, likewise")
    p.add_argument("--name", required=True, help="name of the stored contrast (letters, digits, . _ -)")
    p.add_argument("--reduce", choices=("max", "mean"), default="max", help="per-text reduction for the ranking "
                   "(default: %(default)s)")
    p.add_argument("--top", type=int, default=50, help="features listed per side (default: %(default)s)")
    p.add_argument("--device", default=P.device, help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--dtype", default=P.dtype, help="model dtype (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar over the texts")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.contrast import run_contrast

    r = run_contrast(args.store, args.sae_id, args.a_path, args.b_path, args.name, args.reduce, args.top,
                     args.device, args.dtype, progress=args.progress)
    au = r["auroc"]
    print(f"stored contrast {args.name!r} of {args.sae_id}: /sae/{args.sae_id}/contrast/{args.name}")
    print("higher on A: " + ", ".join(f"{f} (AUROC {au[f]:.3f})" for f in r["top_a"]))
    print("higher on B: " + ", ".join(f"{f} (AUROC {au[f]:.3f})" for f in r["top_b"]))
    probe = r["run"]["probe"]
    if probe:
        print("sparse probe test accuracy: " + ", ".join(f"k={k}: {v:.3f}" for k, v in probe["sae_accuracy"].items())
              + f"; dense: {probe['dense_accuracy']:.3f}")
    return 0
