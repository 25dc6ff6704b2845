"""`saescope worker`: load the engine, watch the parent (when started by `serve`), serve the JSON API."""

from __future__ import annotations

import argparse
import logging
import os

from ..settings import WORKER

log = logging.getLogger(__name__)


def run_worker(args: argparse.Namespace) -> int:
    import uvicorn

    from .engine import engine_from_args
    from .routes import create_worker_app
    from .watchdog import exit_with_parent

    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)
    secret = args.secret or os.environ.get(WORKER.secret_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not secret:
        log.warning("the worker listens on %s without a shared secret: anyone who reaches the port can generate "
                    "text with the model; set --secret or %s", args.host, WORKER.secret_env)
    engine = engine_from_args(args)
    log.info("worker ready on http://%s:%d with %s%s", args.host, args.port, ", ".join(engine.saes),
             " (shared secret required)" if secret else "")
    uvicorn.run(create_worker_app(engine, secret), host=args.host, port=args.port, log_level="warning")
    return 0
