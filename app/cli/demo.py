"""`saescope demo`: the embedded default end to end (convert, precompute, serve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import EMBEDDED, PRECOMPUTE

from ..settings import SERVE, WORKER

NAME = "demo"
HELP = "embedded default end to end: convert, precompute, serve (prints the URL)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=EMBEDDED.store, help="store path")
    p.add_argument("--tokens", type=int, default=PRECOMPUTE.tokens, help="tokens to precompute over")
    p.add_argument("--port", type=int, default=SERVE.port, help="dashboard port")
    p.add_argument("--host", default=SERVE.host, help="dashboard host")
    p.add_argument("--worker-port", type=int, default=WORKER.port, help="port of the child model worker")
    p.add_argument("--no-serve", action="store_true", help="stop after precompute (print the first features)")


def _demo_store_is_current(out: Path, tokens: int) -> bool:
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


def _example_graph(out: Path) -> None:
    """Store the example graph (EMBEDDED.graph_prompt) with the store's transcoders, once: the home page links to
    /graph/EMBEDDED.graph_slug, which needs no worker. Skipped without transcoders; a failure is reported, not fatal."""
    from saescope.precompute.errors import SaescopeError
    from saescope.precompute.saes import TRANSCODER_REGISTRY
    from saescope.precompute.store import Store

    from .graph import compute_graph

    with Store(out) as store:
        if not any(s.architecture in TRANSCODER_REGISTRY for s in store.saes()):
            return
        if any(g.prompt == EMBEDDED.graph_prompt for g in store.graphs()):
            return
    print(f"computing the example attribution graph of {EMBEDDED.graph_prompt!r} (stored as /graph/{EMBEDDED.graph_slug})")
    try:
        row = compute_graph(out, EMBEDDED.graph_prompt, slug=EMBEDDED.graph_slug, replace=True)
    except SaescopeError as err:
        print(f"warning: no example graph stored ({err}); the home page links to the live graph instead")
        return
    print(f"  {row['n_nodes']} nodes, {row['n_links']} links, replacement score {row['replacement_score']:.3f}, "
          f"completeness score {row['completeness_score']:.3f}")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.store import Store

    from .serve import EXPOSED
    from ._common import warn_if_exposed

    if _demo_store_is_current(args.out, args.tokens):
        print(f"using the existing demo store {args.out} (delete it to rebuild)")
    else:
        # one forward pass feeds the demo SAE and the transcoders (all at or below its layer)
        run_precompute(PrecomputeSpec(out=args.out, tokens=args.tokens, saes=[SAESpec(p) for p in _demo_sae_paths()]))
    _example_graph(args.out)
    with Store(args.out) as store:
        sae = store.saes()[0]
        print(f"\n{sae.sae_id}: {sae.d_sae:,} features over {sae.n_tokens:,} tokens, dead {100 * sae.dead_share:.1f}%; "
              "the first live features:")
        for row in store.features(sae.sae_id, sort="index", limit=5, dead=False):
            print(f"  feature {row.index:>5}  max {row.max_act:7.2f}  density {row.density:.4f}  top tokens: "
                  + ", ".join(repr(t) for t in row.top_tokens[:6]))
    if args.no_serve:
        return 0
    from ..web.launch import serve_store

    warn_if_exposed(args.host, EXPOSED.format(host=args.host))
    return serve_store(args.out, host=args.host, port=args.port, start_worker=True, worker_port=args.worker_port)
