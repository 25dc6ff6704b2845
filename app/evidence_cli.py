"""`saescope check`, `saescope diff` and `saescope export --format html` (issue 22): their arguments and what they do.

cli.py calls add_evidence_parsers(sub, export_parser) once; commands.py re-exports check and diff, and its export
hands --format html to export_html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saescope.precompute.config import DIFF, PRECOMPUTE


def add_evidence_parsers(sub, export_parser: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", help="run feature checks (a TOML file) against a store's SAEs; JSON + JUnit XML; "
                       "exit 1 when one fails", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "Checks of four kinds (fires, ablation, steering, monitor; see precompute/checks/spec.py "
                           "for the file format) are validated against the store before any model loads, then "
                           "measured through the same code the dashboard and worker use. Writes OUT/<name>.json (every "
                           "number and text, with provenance: model and SAE file hashes, the store's verify result, "
                           "the saescope version) and OUT/<name>.junit.xml. Exit status 0 when every check passes, 1 "
                           "when one fails or cannot run, 2 for a bad check file."))
    p.add_argument("file", type=Path, help="the check file (.toml)")
    p.add_argument("--store", type=Path, required=True, help="DuckDB store whose SAEs the checks name")
    p.add_argument("--model", default=None, help="check this model instead of the one the store was built with "
                   "(a local folder, a hub id or 'default'), e.g. the next version of a fine-tune")
    p.add_argument("--out", type=Path, default=None, help="folder for the results (default: STORE.checks/ next to "
                   "the store, where `saescope export --format html --checks` finds them)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("diff", help="what changed between two versions of a model, seen through one SAE",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "One pass over the same token contexts with each model (same architecture, e.g. base and "
                           "fine-tuned) through the same SAE: per feature the change in density, mean and max "
                           "activation and the contexts where the two differ most, plus the SAE's reconstruction "
                           "quality (explained variance, MSE) on each model's activations. Writes OUT/ (diff.json, "
                           "features.parquet, features.csv, examples.json); `saescope export --format html --diff OUT` "
                           "makes its report."))
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

    g = export_parser.add_argument_group("--format html (a self-contained report folder, no server or network needed)")
    g.add_argument("--checks", type=Path, default=None, metavar="RESULTS.json",
                   help="a `saescope check` result to include (default with html: every result in STORE.checks/)")
    g.add_argument("--diff", type=Path, default=None, metavar="DIFF_DIR", help="a `saescope diff` folder to include")
    g.add_argument("--list-name", default=None, help="title of the feature list (--features) in the report")


def check(args: argparse.Namespace) -> int:
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


def diff(args: argparse.Namespace) -> int:
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


def export_html(args: argparse.Namespace) -> int:
    from saescope.precompute.export import parse_features, pick_sae
    from .web.report import export_html as run
    from saescope.precompute.store import Store

    features = None
    with Store(args.store) as store:
        sae = pick_sae(store, args.sae_id)
        if args.features:
            features = parse_features(args.features, sae.d_sae)
    checks = [args.checks] if args.checks else None
    r = run(args.store, args.out, sae.sae_id, features=features, checks=checks, diff=args.diff,
            list_name=args.list_name, force=args.force)
    print(f"wrote a {r['bytes'] / 1e6:.2f} MB report ({r['pages']} pages, {r['features']} features) in {args.out}; "
          f"open {args.out / 'index.html'}")
    return 0
