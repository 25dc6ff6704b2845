"""`saescope explain`: LLM explanations of features (and their detection/fuzzing scores), stored with provenance."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import EXPLAIN as X
from saescope.precompute.errors import UserError

NAME = "explain"
HELP = "explain features with an LLM (and score the explanations); stored with provenance"
DESCRIPTION = ("Builds a prompt from each feature's stored top and quantile examples (active tokens marked << >> "
               "with 0-10 strengths, as delphi's default explainer), asks the LLM for a short explanation and stores"
               " it with its provenance (LLM, prompt version, date). With --score, delphi's detection and fuzzing "
               'scorers judge held-out stored examples against stored contexts where the feature is provably 0, and '
               'the balanced accuracy per method is stored (0.5 = chance). Resumable: features already explained by '
               'the same LLM and prompt version are skipped. --llm local is the embedded SmolLM2-135M-Instruct '
               '(offline, weak); any OpenAI-compatible server (vLLM, llama.cpp, Ollama, a hosted API, or `saescope '
               "worker`'s own /v1) is used by giving its base URL.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--sae", dest="sae_id", default=None, help="SAE in the store (default: the only one)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--features", default=None, metavar="SPEC", help="features to explain, e.g. 0-99,300")
    which.add_argument("--all", action="store_true", help="every live feature")
    p.add_argument("--llm", default=X.llm, help="'local' or the base URL of an OpenAI-compatible API, e.g. "
                   "http://127.0.0.1:8080/v1 (also read from $SAESCOPE_LLM_URL when not given)")
    p.add_argument("--llm-model", default=None, help="model name the server serves ($SAESCOPE_LLM_MODEL); with "
                   "--llm local, a transformers instruct model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--llm-key", default=None, help="API key ($SAESCOPE_LLM_KEY or $OPENAI_API_KEY when not given)")
    p.add_argument("--concurrency", type=int, default=X.concurrency, help="features (and HTTP requests) at once")
    p.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                   help="score each explanation by detection and fuzzing")
    p.add_argument("--max-tokens", type=int, default=X.explain_max_tokens, help="answer budget of the explainer")
    p.add_argument("--n-top", type=int, default=X.n_top, help="top examples shown to the explainer")
    p.add_argument("--per-group", type=int, default=X.per_group_explain,
                   help="examples of each quantile group shown to the explainer (the rest are held out for scoring)")
    p.add_argument("--n-test", type=int, default=X.n_test, help="held-out activating examples scored per explanation")
    p.add_argument("--timeout", type=float, default=X.timeout_s, help="seconds per HTTP request")
    p.add_argument("--seed", type=int, default=X.seed, help="seed of the example split and snippet order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
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
