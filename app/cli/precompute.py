"""`saescope precompute`: its flags are generated from the fields of the run spec (pipeline.spec.PrecomputeSpec):
a field is a flag (--field-name, or the field's `flag`), with the field's type, default, choices and help. The
SAEs of a run come from the SAESpec fields (--sae, --hook, --sae-id, repeated) or --run FILE."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path

from saescope.precompute.pipeline.spec import RUN_FLAG_HELP, PrecomputeSpec, SAESpec, specs_from_cli

NAME = "precompute"
HELP = "stream text through model+SAE and store every feature's dashboard data in DuckDB"
DESCRIPTION = (
    "One pass over the tokens stores, for every feature: the top-activating examples (one per context), equal-width "
    "interval and equal-count quantile samples, density, max, mean, an activation histogram, logit effects through "
    "the unembedding (final-norm gain folded in) and the nearest features by decoder cosine. Progress is "
    "checkpointed after every batch in OUT.work/ (and every finished feature range of the table builder): if the "
    "run is killed, the same command resumes where it stopped. The store is written to OUT.tmp and renamed over OUT "
    "only when complete; an existing OUT keeps its other SAEs. Several SAEs (repeat --sae, or --run FILE) share one "
    "forward pass that stops after the deepest hook; each gets its own tables. At the end a few stored contexts are "
    "re-encoded in fp32 and the largest relative difference is stored (see `saescope verify`).")

# argparse dest -> the spec field it fills ("saes.path": that field of every SAESpec); filled by add_arguments
FIELD_OF: dict[str, str] = {}
SAE_DESTS = {"path": "sae", "hook": "hook", "sae_id": "sae_id"}


def _base(tp):
    """int | None -> int; list[X] stays."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _add(p: argparse.ArgumentParser, f: Field, tp, dest: str, repeat: bool = False) -> None:
    md = f.metadata
    flag = md.get("flag") or "--" + f.name.replace("_", "-")
    text = md.get("help", "")
    if md.get("default_text"):
        text += f" (default: {md['default_text']})"
    kw: dict = {"dest": dest, "help": text}
    base = _base(tp)
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        kw["default"] = bool(f.default)
    else:
        kw["type"] = base
        if repeat:
            kw.update(action="append", default=None)
        elif f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        for k in ("choices", "metavar"):
            if md.get(k):
                kw[k] = md[k]
    p.add_argument(flag, **kw)
    FIELD_OF[dest] = f.name


def add_arguments(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(PrecomputeSpec)
    sae_hints = typing.get_type_hints(SAESpec)
    for f in fields(PrecomputeSpec):
        if not f.metadata.get("cli", True):
            continue
        if f.name == "saes":
            for g in fields(SAESpec):
                _add(p, g, sae_hints[g.name], SAE_DESTS[g.name], repeat=True)
                FIELD_OF[SAE_DESTS[g.name]] = f"saes.{g.name}"
            p.add_argument("--run", type=Path, default=None, metavar="FILE", help=RUN_FLAG_HELP)
            FIELD_OF["run"] = "saes"
            continue
        _add(p, f, hints[f.name], f.name)


def spec_from_args(args: argparse.Namespace) -> PrecomputeSpec:
    """The spec the parsed flags describe; every CLI field is read (a field without a flag fails here, loudly)."""
    kw = {}
    for f in fields(PrecomputeSpec):
        if not f.metadata.get("cli", True):
            continue
        if f.name == "saes":
            kw["saes"] = specs_from_cli(args.sae, args.hook, args.sae_id, args.run)
        else:
            kw[f.name] = getattr(args, f.name)
    return PrecomputeSpec(**kw)


def run(args: argparse.Namespace) -> int:
    from saescope.precompute.pipeline import run_precompute

    run_precompute(spec_from_args(args))
    return 0
