"""`saescope check`: feature checks from a TOML file against a store's SAEs; JSON + JUnit XML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "check"
HELP = ("run feature checks (a TOML file) against a store's SAEs; JSON + JUnit XML; "
        "exit 1 when one fails")
DESCRIPTION = ("Checks of four kinds (fires, ablation, steering, monitor; see precompute/checks/spec.py "
               "for the file format) are validated against the store before any model loads, then "
               "measured through the same code the dashboard and worker use. Writes OUT/<name>.json (every "
               "number and text, with provenance: model and SAE file hashes, the store's verify result, "
               "the saescope version) and OUT/<name>.junit.xml. Exit status 0 when every check passes, 1 "
               "when one fails or cannot run, 2 for a bad check file.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the check file (.toml)")
    p.add_argument("--store", type=Path, required=True, help="DuckDB store whose SAEs the checks name")
    p.add_argument("--model", default=None, help="check this model instead of the one the store was built with "
                   "(a local folder, a hub id or 'default'), e.g. the next version of a fine-tune")
    p.add_argument("--out", type=Path, default=None, help="folder for the results (default: STORE.checks/ next to "
                   "the store, where `saescope export --format html --checks` finds them)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.checks.report import summary_text, write_json, write_junit
    from saescope.precompute.checks.run import run_checks

    run = run_checks(args.file, args.store, model=args.model, device=args.device, dtype=args.dtype,
                     progress=not args.no_progress)
    out = args.out or args.store.with_name(args.store.name + ".checks")
    out.mkdir(parents=True, exist_ok=True)
    j = write_json(run, out / f"{args.file.stem}.json")
    x = write_junit(run, out / f"{args.file.stem}.junit.xml")
    print(summary_text(run))
    print(f"wrote {j} and {x}")
    return 0 if run.ok else 1
