"""What several `saescope` subcommands share: the help formatter, the model flags, secrets and the exposure warning."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from saescope.precompute.config import EMBEDDED, PRECOMPUTE
from saescope.precompute.errors import UserError

from ..settings import WORKER

E, P, W = EMBEDDED, PRECOMPUTE, WORKER
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Help(argparse.HelpFormatter):
    """Appends each option's default once, only where it says something: not for None, not for on/off switches
    that are off, `on`/`off` for --x/--no-x pairs, and never when the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or not action.option_strings:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return text + (" (default: on)" if action.default else " (default: off)")
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def model_args(p: argparse.ArgumentParser, sae: bool = True) -> None:
    p.add_argument("--model", default=E.model, help="HF hub id or local folder of a causal LM, or 'default' "
                   "(default: 'default', the embedded SmolLM2-135M-Instruct)")
    if sae:
        p.add_argument("--sae", default=E.sae, help="SAE folder/file (SAELens, sparsify, Gemma Scope params.npz, OpenAI "
                       ".pt), a hub reference owner/repo/folder, or 'default' (default: 'default', the embedded demo SAE)")
        p.add_argument("--hook", default=None, help="override the SAE's hook, e.g. blocks.9.hook_resid_post")
    p.add_argument("--device", default=P.device, help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default=P.dtype, help="model dtype: float32, bfloat16, float16 or auto = bfloat16 on CUDA, "
                   "float32 on CPU (SAESCOPE_CPU_BF16=auto: bfloat16 on CPUs with native bf16, avx512_bf16/amx_bf16, "
                   "~1.7x faster; stored values then meet verify's bf16 bound, not fp32 equality)")


def secret_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """--FLAG SECRET and --FLAG-file PATH; the file or the environment variable is the way to prefer."""
    p.add_argument(f"--{flag}", default=None, metavar="SECRET",
                   help=f"{what}; visible to every user of this machine in `ps`, so prefer --{flag}-file or "
                   f"${W.secret_env}")
    p.add_argument(f"--{flag}-file", type=Path, default=None, metavar="PATH",
                   help=f"read the secret from this file (its first line; keep it readable by you only); preferred, "
                   f"like ${W.secret_env}")


def read_secret(value: str | None, file: Path | None, flag: str) -> str | None:
    """The secret from --FLAG, --FLAG-file or the environment (in this order; giving both flags is refused)."""
    if value and file:
        raise UserError(f"give --{flag} or --{flag}-file, not both")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"--{flag}-file {file}: cannot read it ({err.strerror or err})") from err
        lines = text.splitlines()
        secret = lines[0].strip() if lines else ""
        if not secret:
            raise UserError(f"--{flag}-file {file} is empty; write the secret on its first line")
        return secret
    return value or os.environ.get(W.secret_env) or None


def warn_if_exposed(host: str, what: str) -> bool:
    """Print a warning when `host` is not a loopback address; returns whether it did."""
    if host in LOOPBACK:
        return False
    print(f"warning: {what}", file=sys.stderr, flush=True)
    return True
