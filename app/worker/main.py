"""`saescope worker`: load the engine, watch the parent (when started by `serve`), serve the JSON API."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def run_worker(args: argparse.Namespace) -> int:
    import uvicorn

    from .engine import engine_from_args
    from .routes import create_worker_app
    from .watchdog import exit_with_parent

    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)
    engine = engine_from_args(args)
    log.info("worker ready on http://%s:%d with %s", args.host, args.port, ", ".join(engine.saes))
    uvicorn.run(create_worker_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0
