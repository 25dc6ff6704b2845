"""`saescope verify`: a random sample of stored examples recomputed in fp32, against the store's dtype bound."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import PRECOMPUTE as P

NAME = "verify"
HELP = "recompute a random sample of stored examples in fp32 and report the largest difference"
DESCRIPTION = ("Loads the model and SAE from the store's provenance paths, re-encodes a random sample of the stored "
               "contexts alone (batch 1, float32, CPU) and compares with every example row's stored activations on "
               "every position where either is nonzero and with its value (the number pages show), against the bound of the dtype the store was built with: float32, the "
               "relative difference at every position; bfloat16/float16, |stored - fp32| as a share of the SAE's "
               "largest activation on those contexts. Exit status 1 when the difference exceeds the bound or a stored "
               "zero/nonzero disagrees beyond it. Every table is also read back whole (DuckDB checks each block's "
               "checksum); damaged tables are listed and fail the check.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--sae", dest="sae_id", default=None, help="SAE to verify (default: every SAE in the store)")
    p.add_argument("--sample", type=int, default=P.verify_sample, help="contexts to recompute per SAE")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"the bound's number (default: {P.verify_tolerance:g} relative for float32 stores, "
                   f"{P.verify_bound_bf16:g} x the SAE's peak for bfloat16, {P.verify_bound_fp16:g} for float16)")
    p.add_argument("--bound", dest="bound_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="hold the store to this dtype's bound (default: the dtype it was built with)")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.verify import describe, verify_store

    results = verify_store(args.store, args.sae_id, args.sample, args.seed, args.tolerance,
                           getattr(args, "bound_dtype", None))
    for sae_id, r in results.items():
        print("\n".join(describe(sae_id, r)))
    return 0 if all(r["ok"] for r in results.values()) else 1
