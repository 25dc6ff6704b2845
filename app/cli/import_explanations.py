"""`saescope import-explanations`: explanations from a JSON/JSONL file (saescope's or a Neuronpedia export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.errors import UserError

NAME = "import-explanations"
HELP = "add feature explanations (searchable, shown on feature pages) to a store"
DESCRIPTION = ("Reads JSON or JSONL records with a feature index ('index' or 'feature') and a text ('description' or"
               " 'text'): saescope's own format or a Neuronpedia explanation export. The store is rewritten "
               'atomically; restart `saescope serve` to see them.')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store")
    p.add_argument("file", type=Path, help=".json (a list) or .jsonl of explanation records")
    p.add_argument("--sae-id", required=True, help="SAE in the store the explanations belong to")
    p.add_argument("--source", default=None, help="label for where they came from (default: the file name)")
    p.add_argument("--replace", action="store_true", help="drop this SAE's existing explanations first")


def run(args: argparse.Namespace) -> int:
    import json

    from saescope.precompute.store.write import add_explanations

    from saescope.precompute.errors import NotFound

    if not args.file.is_file():
        raise NotFound(f"{args.file}: no such file (a .json list or .jsonl of explanation records)")
    text = args.file.read_text(encoding="utf-8")
    try:
        records = (json.loads(text) if args.file.suffix == ".json"
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as err:
        raise UserError(f"{args.file} is not valid JSON{'' if args.file.suffix == '.json' else ' lines'}: {err}") from err
    rows = []
    for n, r in enumerate(records if isinstance(records, list) else [records], 1):
        if not isinstance(r, dict):
            raise UserError(f"{args.file} record {n}: expected an object with 'index' and 'description'")
        index = r.get("index", r.get("feature"))
        desc = r.get("description", r.get("text"))
        if index is None or desc is None:
            raise UserError(f"{args.file} record {n}: needs 'index' (or 'feature') and 'description' (or 'text'); "
                            f"has {', '.join(r) or 'nothing'}")
        try:
            rows.append((int(index), str(desc)))
        except ValueError as err:
            raise UserError(f"{args.file} record {n}: index {index!r} is not a whole number") from err
    added = add_explanations(args.store, args.sae_id, rows, args.source or args.file.name, args.replace)
    print(f"added {added} explanations to {args.sae_id} in {args.store}")
    return 0
