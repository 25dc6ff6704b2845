"""What each `saescope` subcommand does; argument parsing lives in cli.py."""

from __future__ import annotations

import argparse
import logging

from precompute.config import DEFAULT, EMBEDDED, PRECOMPUTE

log = logging.getLogger("saescope")


def convert_default(args: argparse.Namespace) -> int:
    from precompute.embedded import convert_default_model

    print(convert_default_model(force=args.force))
    return 0


def train_sae(args: argparse.Namespace) -> int:
    from precompute.embedded import MODEL_ID, resolve_model
    from precompute.models import load_model
    from precompute.train import train_sae as run

    lm = load_model(resolve_model(args.model), args.device, args.dtype)
    report = run(lm, args.hook, args.dataset, args.out, tokens=args.tokens, context_len=args.context_len,
                 d_sae=args.d_sae, k=args.k, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                 fp16=args.fp16, model_label=MODEL_ID if args.model == DEFAULT else args.model)
    print(f"saved {args.out}: explained variance {report.explained_variance:.3f}, L0 {report.l0:.1f}, "
          f"dead {100 * report.dead_share:.1f}% ({report.seconds:.0f} s)")
    return 0


def precompute(args: argparse.Namespace) -> int:
    from precompute.run import PrecomputeArgs, run_precompute

    run_precompute(PrecomputeArgs.from_namespace(args))
    return 0


def serve(args: argparse.Namespace) -> int:
    from .web.launch import serve_store

    return serve_store(args.store, host=args.host, port=args.port, worker_url=args.worker_url,
                       start_worker=not args.no_worker, worker_port=args.worker_port, prewarm=not args.no_prewarm)


def worker(args: argparse.Namespace) -> int:
    from .worker.main import run_worker

    return run_worker(args)


def _demo_store_is_current(out, tokens: int) -> bool:
    from precompute.store import Store, StoreError

    if not out.exists():
        return False
    try:
        with Store(out) as store:
            return any(s.n_tokens == tokens // PRECOMPUTE.context_len * PRECOMPUTE.context_len
                       and s.sae_path == str(EMBEDDED.sae_dir) for s in store.saes())
    except StoreError:
        return False


def demo(args: argparse.Namespace) -> int:
    from precompute.run import PrecomputeArgs, run_precompute
    from precompute.store import Store

    if _demo_store_is_current(args.out, args.tokens):
        print(f"using the existing demo store {args.out} (delete it to rebuild)")
    else:
        run_precompute(PrecomputeArgs(out=args.out, tokens=args.tokens))
    with Store(args.out) as store:
        sae = store.saes()[0]
        print(f"\n{sae.sae_id}: {sae.d_sae:,} features over {sae.n_tokens:,} tokens, dead {100 * sae.dead_share:.1f}%; "
              "the first live features:")
        for row in store.features(sae.sae_id, sort="index", limit=5, dead=False):
            print(f"  feature {row.index:>5}  max {row.max_act:7.2f}  density {row.density:.4f}  top tokens: "
                  + ", ".join(repr(t) for t in row.top_tokens[:6]))
    if args.no_serve:
        return 0
    from .web.launch import serve_store

    return serve_store(args.out, host=args.host, port=args.port, start_worker=True, worker_port=args.worker_port)


def import_explanations(args: argparse.Namespace) -> int:
    import json

    from precompute.store.write import add_explanations

    text = args.file.read_text(encoding="utf-8")
    records = json.loads(text) if args.file.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    rows = []
    for n, r in enumerate(records, 1):
        index = r.get("index", r.get("feature"))
        desc = r.get("description", r.get("text"))
        if index is None or desc is None:
            raise ValueError(f"{args.file} record {n}: needs 'index' (or 'feature') and 'description' (or 'text'); "
                             f"has {', '.join(r) or 'nothing'}")
        rows.append((int(index), str(desc)))
    added = add_explanations(args.store, args.sae_id, rows, args.source or args.file.name, args.replace)
    print(f"added {added} explanations to {args.sae_id} in {args.store}")
    return 0
