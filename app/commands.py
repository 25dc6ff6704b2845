"""What each `saescope` subcommand does; argument parsing lives in cli.py."""

from __future__ import annotations

import argparse
import logging

from saescope.precompute.config import DEFAULT, EMBEDDED, PRECOMPUTE
from saescope.precompute.errors import UserError

log = logging.getLogger("saescope")


def convert_default(args: argparse.Namespace) -> int:
    from saescope.precompute.embedded import convert_default_model

    print(convert_default_model(force=args.force))
    return 0


def train_sae(args: argparse.Namespace) -> int:
    from saescope.precompute.embedded import MODEL_ID, resolve_model
    from saescope.precompute.models import load_model
    from saescope.precompute.train import train_sae as run
    from saescope.precompute.train import train_transcoder

    lm = load_model(resolve_model(args.model), args.device, args.dtype)
    kw = dict(tokens=args.tokens, context_len=args.context_len, d_sae=args.d_sae, k=args.k, steps=args.steps,
              batch=args.batch, lr=args.lr, seed=args.seed, fp16=args.fp16,
              model_label=MODEL_ID if args.model == DEFAULT else args.model)
    if getattr(args, "hook_out", None):
        report = train_transcoder(lm, args.hook, args.hook_out, args.dataset, args.out, **kw)
    else:
        report = run(lm, args.hook, args.dataset, args.out, **kw)
    print(f"saved {args.out}: explained variance {report.explained_variance:.3f}, L0 {report.l0:.1f}, "
          f"dead {100 * report.dead_share:.1f}% ({report.seconds:.0f} s)")
    return 0


def precompute(args: argparse.Namespace) -> int:
    from saescope.precompute.run import PrecomputeArgs, run_precompute

    run_precompute(PrecomputeArgs.from_namespace(args))
    return 0


def verify(args: argparse.Namespace) -> int:
    from saescope.precompute.verify import verify_store

    results = verify_store(args.store, args.sae_id, args.sample, args.seed, args.tolerance,
                           getattr(args, "bound_dtype", None))
    for sae_id, r in results.items():
        status = "ok" if r["ok"] else "FAILED"
        print(f"{sae_id}: {status}: max rel. diff {r['max_rel_diff']:.2g} (max abs. diff {r['max_abs_diff']:.2g}, "
              f"{r['max_peak_diff']:.2g} of the SAE's peak {r['sae_peak']:.3g}) on {r['contexts']} contexts, "
              f"{r['positions']:,} positions of {r['features']:,} feature examples; {r['mismatches']} zero/nonzero "
              f"mismatches; checked against the {r['bound']}")
        if r["worst"] and not r["ok"]:
            w = r["worst"]
            print(f"  worst: context {w['ctx_id']} feature {w['feature']} position {w['pos']}: stored "
                  f"{w['stored']:.6g}, recomputed {w['recomputed']:.6g}")
    return 0 if all(r["ok"] for r in results.values()) else 1


def serve(args: argparse.Namespace) -> int:
    from .web.launch import serve_store

    return serve_store(args.store, host=args.host, port=args.port, worker_url=args.worker_url,
                       worker_secret=args.worker_secret,
                       start_worker=not args.no_worker, worker_port=args.worker_port, prewarm=not args.no_prewarm)


def worker(args: argparse.Namespace) -> int:
    from .worker.main import run_worker

    return run_worker(args)


def _demo_store_is_current(out, tokens: int) -> bool:
    from saescope.precompute.store import Store, StoreError

    if not out.exists():
        return False
    try:
        with Store(out) as store:
            n = tokens // PRECOMPUTE.context_len * PRECOMPUTE.context_len
            have = {s.sae_path for s in store.saes() if s.n_tokens == n}
        from saescope.precompute.embedded import resolve_sae

        return {resolve_sae(p) for p in _demo_sae_paths()} <= have
    except StoreError:
        return False


def _demo_sae_paths() -> list:
    """The demo SAE ('default'), then the demo transcoders that get dashboards (EMBEDDED.dashboard_layers)."""
    from saescope.precompute.embedded import demo_transcoder_dirs

    return [EMBEDDED.sae, *(str(p) for p in demo_transcoder_dirs(EMBEDDED.dashboard_layers))]


def demo(args: argparse.Namespace) -> int:
    from saescope.precompute.run import PrecomputeArgs, SAESpec, run_precompute
    from saescope.precompute.store import Store

    if _demo_store_is_current(args.out, args.tokens):
        print(f"using the existing demo store {args.out} (delete it to rebuild)")
    else:  # one forward pass feeds the demo SAE and the transcoders (all at or below its layer)
        specs = [SAESpec(p, None, None) for p in _demo_sae_paths()]
        run_precompute(PrecomputeArgs(out=args.out, tokens=args.tokens, saes=specs))
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

    from saescope.precompute.store.write import add_explanations

    text = args.file.read_text(encoding="utf-8")
    records = json.loads(text) if args.file.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    rows = []
    for n, r in enumerate(records, 1):
        index = r.get("index", r.get("feature"))
        desc = r.get("description", r.get("text"))
        if index is None or desc is None:
            raise UserError(f"{args.file} record {n}: needs 'index' (or 'feature') and 'description' (or 'text'); "
                             f"has {', '.join(r) or 'nothing'}")
        rows.append((int(index), str(desc)))
    added = add_explanations(args.store, args.sae_id, rows, args.source or args.file.name, args.replace)
    print(f"added {added} explanations to {args.sae_id} in {args.store}")
    return 0


def export(args: argparse.Namespace) -> int:
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


def explain(args: argparse.Namespace) -> int:
    import sys

    from saescope.precompute.explain import ExplainConfig, LocalChatBackend, OpenAIChatBackend
    from saescope.precompute.explain.run import run_explain
    from saescope.precompute.export import parse_features, pick_sae
    from saescope.precompute.store import Store

    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1; got {args.concurrency}")
    with Store(args.store) as store:
        sae = pick_sae(store, args.sae_id)
    features = None if args.all else parse_features(args.features, sae.d_sae)
    cfg = ExplainConfig(explain_max_tokens=args.max_tokens, n_test=args.n_test, n_top=args.n_top,
                        per_group_explain=args.per_group)
    if args.llm == "local":
        from saescope.precompute.embedded import convert_default_model
        from saescope.precompute.explain.run import local_llm_name, pending_features

        if args.llm_model is None:
            print("warning: explaining with the embedded SmolLM2-135M-Instruct: it works offline but is weak; expect "
                  "vague explanations and scores near chance (0.5). Give --llm URL of a bigger model for real use.",
                  file=sys.stderr)
        model_dir = args.llm_model or convert_default_model()
        if not pending_features(args.store, sae.sae_id, features, local_llm_name(model_dir)):
            print(f"{sae.sae_id}: nothing to do: every requested live feature is already explained by "
                  f"{local_llm_name(model_dir)} (0 explanations written)")
            return 0
        backend = LocalChatBackend(model_dir, batch_size=max(1, args.concurrency))
    else:
        backend = OpenAIChatBackend(args.llm, args.llm_model, args.llm_key, timeout=args.timeout,
                                    max_concurrency=args.concurrency)
        backend.check()
    r = run_explain(args.store, sae.sae_id, features, backend, cfg, score=args.score, seed=args.seed,
                    concurrency=args.concurrency, progress=not args.no_progress)
    done = r.explained + r.empty
    print(f"{r.sae_id}: {r.explained} explanations written by {r.llm} ({r.scored} scored), {r.empty} answers without "
          f"an explanation, {r.skipped_done} already explained, {r.skipped_dead} dead; {r.seconds:.1f} s"
          + (f" ({r.seconds / done:.1f} s per feature)" if done else ""))
    for i, why in r.unscored[:5]:
        print(f"  feature {i} not scored: {why}")
    if len(r.unscored) > 5:
        print(f"  ... and {len(r.unscored) - 5} more not scored")
    return 0
