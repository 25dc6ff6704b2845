"""`saescope worker`: the model worker (holds model and SAEs, batches live requests, JSON API)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import WORKER as W
from ._common import model_args, read_secret, secret_args

NAME = "worker"
HELP = "run the model worker: holds model+SAEs, batches live requests, JSON API"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help="serve every SAE recorded in this store (model/SAE paths "
                   "from its provenance; --dtype auto runs the model in the dtype the store was built with)")
    model_args(p)
    p.add_argument("--host", default=W.host, help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=W.port, help="port to listen on")
    p.add_argument("--max-prompt-tokens", type=int, default=W.max_prompt_tokens, help="longest prompt admitted")
    p.add_argument("--max-batch", type=int, default=W.max_batch, help="largest batch of prompts per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=W.batch_wait_ms, help="how long a request waits for company")
    p.add_argument("--max-queue", type=int, default=W.max_queue, help="queued requests beyond which new ones get 503")
    p.add_argument("--timeout", type=float, default=W.request_timeout_s, help="seconds a request may wait for its answer")
    secret_args(p, "secret", "shared secret every request must carry (Authorization: Bearer SECRET); set one "
                "whenever the port is reachable from other machines")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="exit when process PID (the dashboard that started this worker) is gone")


def run(args: argparse.Namespace) -> int:
    from ..worker.main import run_worker

    args.secret = read_secret(args.secret, args.secret_file, "secret")
    return run_worker(args)
