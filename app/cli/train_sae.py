"""`saescope train-sae`: a TopK SAE trained on a model's activations, saved in SAELens format."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.precompute.config import DEFAULT, EMBEDDED, PRECOMPUTE, TRAIN

from ._common import model_args

NAME = "train-sae"
HELP = "train a TopK SAE on a model's activations and save it in SAELens format"
DESCRIPTION = ("Collects activations at --hook over --tokens tokens (special tokens excluded), trains a TopK SAE with "
               "the AuxK loss against dead latents, and saves cfg.json + sae_weights.safetensors (SAELens v6) plus "
               "training_report.json with held-out explained variance, L0 and dead share.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    T = TRAIN
    model_args(p, sae=False)
    p.add_argument("--hook", default=EMBEDDED.hook, help="hook to train on (a transcoder's input: blocks.L.hook_mlp_in)")
    p.add_argument("--hook-out", default=None, metavar="HOOK",
                   help="train a TopK transcoder from --hook to this hook (blocks.L.hook_mlp_out of the same layer): "
                        "the loss is the MLP output's reconstruction; saved as a SAELens topk_transcoder")
    p.add_argument("--dataset", default=EMBEDDED.dataset, help="'default', a .txt/.jsonl/.parquet file, or a HF dataset id")
    p.add_argument("--out", type=Path, required=True, help="output folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--tokens", type=int, default=T.tokens, help="activations to collect")
    p.add_argument("--context-len", type=int, default=PRECOMPUTE.context_len, help="tokens per context (BOS included)")
    p.add_argument("--d-sae", type=int, default=T.d_sae, help="number of features")
    p.add_argument("--k", type=int, default=T.k, help="active features per token (TopK)")
    p.add_argument("--steps", type=int, default=T.steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=T.batch, help="activations per step")
    p.add_argument("--lr", type=float, default=T.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=T.seed, help="random seed")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.embedded import MODEL_ID, resolve_model
    from saescope.precompute.models import load_model
    from saescope.precompute.train import train_sae, train_transcoder

    lm = load_model(resolve_model(args.model), args.device, args.dtype)
    kw = dict(tokens=args.tokens, context_len=args.context_len, d_sae=args.d_sae, k=args.k, steps=args.steps,
              batch=args.batch, lr=args.lr, seed=args.seed, fp16=args.fp16,
              model_label=MODEL_ID if args.model == DEFAULT else args.model)
    if args.hook_out:
        report = train_transcoder(lm, args.hook, args.hook_out, args.dataset, args.out, **kw)
    else:
        report = train_sae(lm, args.hook, args.dataset, args.out, **kw)
    print(f"saved {args.out}: explained variance {report.explained_variance:.3f}, L0 {report.l0:.1f}, "
          f"dead {100 * report.dead_share:.1f}% ({report.seconds:.0f} s)")
    return 0
