"""`saescope convert-default`: the packaged SmolLM2 GGUF as a HF folder in the cache."""

from __future__ import annotations

import argparse

NAME = "convert-default"
HELP = "convert the packaged SmolLM2 GGUF into a HF folder in the cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.embedded import convert_default_model

    print(convert_default_model(force=args.force))
    return 0
