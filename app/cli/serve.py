"""`saescope serve`: the dashboard for a store (and, unless told otherwise, a child model worker)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import SERVE, WORKER
from ._common import read_secret, secret_args, warn_if_exposed

NAME = "serve"
HELP = "serve the dashboard for a store (starts a model worker unless told otherwise)"
EXPOSED = ("the dashboard listens on {host}, beyond this machine, without authentication: anyone who reaches the "
           "port can browse the store and run live inspection, steering and explanations on the model worker "
           "(the model generates text for them). Listen on 127.0.0.1 behind a reverse proxy that authenticates "
           "(README, \"Serving to other machines\"), or keep the port firewalled")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="DuckDB store written by precompute")
    p.add_argument("--host", default=SERVE.host, help="address to listen on (anything but loopback warns: live "
                   "steering and explanations are then open to whoever reaches the port)")
    p.add_argument("--port", type=int, default=SERVE.port, help="port to listen on")
    p.add_argument("--worker-url", default=None, help="use a model worker already running there (e.g. on a GPU box)")
    p.add_argument("--no-worker", action="store_true", help="serve precomputed pages only; live inspection is off")
    p.add_argument("--worker-port", type=int, default=WORKER.port, help="port for the child worker")
    secret_args(p, "worker-secret", "shared secret for the worker (sent with every request, and required by the "
                "child worker)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not pre-render every feature page in the background after startup (stores of more "
                   f"than {SERVE.prewarm_max_features:,} features are never pre-rendered)")


def run(args: argparse.Namespace) -> int:
    from ..web.launch import serve_store

    secret = read_secret(args.worker_secret, args.worker_secret_file, "worker-secret")
    warn_if_exposed(args.host, EXPOSED.format(host=args.host))
    return serve_store(args.store, host=args.host, port=args.port, worker_url=args.worker_url, worker_secret=secret,
                       start_worker=not args.no_worker, worker_port=args.worker_port, prewarm=not args.no_prewarm)
