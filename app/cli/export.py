"""`saescope export`: one SAE of a store as the batch files Neuronpedia imports."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.export import FORMATS, NEURONPEDIA

NAME = "export"
HELP = "write one SAE of a store as the batch files Neuronpedia imports, or as an offline HTML report"
DESCRIPTION = ("Writes OUT/batch-<n>.json in the layout SAEDashboard's NeuronpediaRunner writes (its run metadata "
               'and a list of features: logit tables, activation and logit histograms, density as frac_nonzero, the '
               'top examples and interval samples as activations), plus run_settings.json and skipped_indexes.json. '
               "Give OUT to Neuronpedia's convert-saedashboard-to-neuronpedia-export.py (--saedashboard-output-dir "
               'OUT). Fields the store does not hold (neuron alignment, correlated neurons/features, decoder weight '
               'distribution, DFA) are left empty, as when SAEDashboard disables them. The folder is written under a'
               ' temporary name and renamed into place when complete.')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("out", type=Path, help="folder for the batch files (must be new or empty unless --force)")
    p.add_argument("--sae", dest="sae_id", default=None, help="SAE in the store (default: the only one)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="output format (default: %(default)s)")
    p.add_argument("--features-per-batch", type=int, default=NEURONPEDIA.features_per_batch,
                   help="features per batch file, split like numpy.array_split (SAEDashboard's "
                   "n_features_at_a_time; default: %(default)s)")
    p.add_argument("--features", default=None, metavar="SPEC",
                   help="only these features, e.g. 0-127,300 (inclusive ranges; default: all)")
    p.add_argument("--set-name", default=None, help="Neuronpedia source-set name written as sae_set "
                   "(default: the SAE id, lowercased, other characters as dashes)")
    p.add_argument("--sae-id-suffix", default=None, help="suffix of the Neuronpedia SAE id (LAYER-SET__SUFFIX)")
    p.add_argument("--model-id", default=None, help="model id written in the files (default: the store's model id)")
    p.add_argument("--layer", type=int, default=None, help="layer number (default: N of the hook blocks.N.…)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    g = p.add_argument_group("--format html (a self-contained report folder, no server or network needed)")
    g.add_argument("--checks", type=Path, default=None, metavar="RESULTS.json",
                   help="a `saescope check` result to include (default with html: every result in STORE.checks/)")
    g.add_argument("--diff", type=Path, default=None, metavar="DIFF_DIR", help="a `saescope diff` folder to include")
    g.add_argument("--list-name", default=None, help="title of the feature list (--features) in the report")


def run(args: argparse.Namespace) -> int:
    if args.format == "html":  # the offline report (app/web/report.py)
        return export_html(args)
    from saescope.precompute.export import export_neuronpedia, parse_features, pick_sae
    from saescope.precompute.store import Store

    features = None
    if args.features:
        with Store(args.store) as store:
            features = parse_features(args.features, pick_sae(store, args.sae_id).d_sae)
    r = export_neuronpedia(args.store, args.out, args.sae_id, features_per_batch=args.features_per_batch,
                           features=features, set_name=args.set_name, sae_id_suffix=args.sae_id_suffix,
                           model_id=args.model_id, layer=args.layer, force=args.force)
    print(f"wrote {r.n_features:,} features of {r.sae_id} as {len(r.files)} Neuronpedia batch files in {r.out} "
          f"({r.seconds:.1f} s)")
    return 0


def export_html(args: argparse.Namespace) -> int:
    from saescope.precompute.export import parse_features, pick_sae
    from ..web.report import export_html as run
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
