"""`saescope verify`: recompute a random sample of stored contexts with the fp32 reference path and compare.

For each sampled context (any context the SAE's examples refer to: top, interval or quantile samples), every
feature with an example in that context has its stored activations on every position of the context (act_pos /
act_val). The context's token ids are re-encoded alone (batch 1) in float32 on the CPU through
`encode.encode_batch`, the same function precompute and the live worker use, and compared with the stored values
on every position where either side is nonzero.

The bound depends on the dtype the store was built with (the saes row's params["dtype"]; `Bound`):

float32 stores: the relative difference of one position, |recomputed - stored| / max(|stored|, |recomputed|,
floor), with floor = FLOOR_SHARE x the feature's largest activation in that context (so that values within float
round-off of zero do not turn noise into a large ratio), must stay <= PRECOMPUTE.verify_tolerance (1e-4) everywhere;
a zero/nonzero mismatch is a position where exactly one side is zero beyond that tolerance, and none is allowed.

bfloat16 / float16 stores: a per-position relative bound cannot hold. bf16 keeps 8 significant bits (relative step
2^-8, unit round-off 2^-9); the residual stream collects that error over every layer below the hook and a feature
reads it through W_enc, so the error of one activation scales with the pre-activation scale of its token, not with
the value itself. Hence, with S = the SAE's largest fp32 activation on the verified contexts (every feature, every
position):
  1. where both sides are active, |recomputed - stored| <= tolerance x S (`max_peak_diff` = max |diff| / S there);
  2. where one side is zero, either |diff| <= tolerance x S (a value crossing zero), or the position is a
     selection change: a TopK (JumpReLU) SAE turns a small pre-activation error into a whole activation where a
     feature sits at the boundary (in the top k in fp32, just out of it in bf16, or the reverse), and the value
     there is the token's k-th largest pre-activation, whatever the precision. Only their share is bounded:
     mismatches / positions <= max_changes.
Measured with the model in bf16 and the SAE in fp32 (`python bench/bf16.py --tokens 32768`: the embedded default,
SmolLM2-135M to blocks.9.hook_resid_post, TopK k=32 of 4096 features): the hook activations' relative error
|dx| / |x| is 0.9% at the median, 2.0% at the 99th percentile, 16.5% at worst (unit round-off 2^-9 = 0.2%: ten
layers of it); where both are active max |diff| / S = 0.056; 2.4% of the active positions are zero on one side
only, by up to 0.080 S (none beyond 0.125 S there). On the tiny test model (3-layer Llama, TopK k=6 of 96,
tests/test_bf16.py): 0.005 S where both are active; 0.7% one-sided, up to 0.42 S (with k=6 of 96 the boundary
values are large), 0.4% beyond 0.125 S. Bounds: bfloat16 0.125 S (2.2x the default's worst) and 5% (2x its
one-sided share even if all of them exceeded the bound); float16 (11 significant bits) measured 0.0068 S and 0.37%
one-sided on 8,192 tokens: 0.02 S and 1%. The SAE stays in float32 on the bf16 activations: an SAE in bf16 gave
the same differences (0.056 S, 2.5% one-sided) for a 4% faster forward+encode (the model dominates).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import __version__
from .config import PRECOMPUTE
from .encode import encode_batch
from .models import DTYPES, HookedLM, dtype_name, load_model
from .saes import SAE, load_sae
from .store import Store, StoreError
from .errors import UserError

log = logging.getLogger(__name__)
FLOOR_SHARE = 1e-3
STORE_PLACEHOLDER = "{store}"  # stored commands name the store by this; the reader puts in its own path
REFERENCE = "float32, batch 1, cpu, encode.encode_batch"

Stored = dict[int, tuple[list[int], dict[int, tuple[list[int], list[float]]]]]
# ctx_id -> (token ids, one (feature, value, pos, act_pos, act_val) per example row in that context)
StoredExamples = dict[int, tuple[list[int], list[tuple[int, float, int, list[int], list[float]]]]]


BOUNDS = {"float32": (PRECOMPUTE.verify_tolerance, 0.0),  # dtype -> (tolerance, share of selection changes)
          "bfloat16": (PRECOMPUTE.verify_bound_bf16, PRECOMPUTE.verify_changes_bf16),
          "float16": (PRECOMPUTE.verify_bound_fp16, PRECOMPUTE.verify_changes_fp16)}


class StoredSource(Protocol):
    """A published Store or an unpublished StoreBuilder: both answer these questions (see stored_dtype)."""

    def context_ids(self, sae_id: str) -> list[int]: ...

    def stored_activations(self, sae_id: str, ctx_ids: list[int]) -> Stored: ...

    def stored_examples(self, sae_id: str, ctx_ids: list[int]) -> StoredExamples: ...


@dataclass(frozen=True)
class Bound:
    """What a store built in `dtype` must meet against the fp32 reference (see the module doc)."""

    dtype: str  # float32, bfloat16 or float16: the dtype the store was built with
    tolerance: float
    max_changes: float = 0.0  # share of the compared positions that may change selection (0 for float32)

    @property
    def metric(self) -> str:
        """The result field compared with the tolerance."""
        return "max_rel_diff" if self.dtype == "float32" else "max_peak_diff"

    def describe(self) -> str:
        if self.dtype == "float32":
            return (f"float32 bound: relative difference <= {self.tolerance:g} at every position, no zero/nonzero "
                    "mismatch")
        return (f"{self.dtype} bound: |stored - fp32| <= {self.tolerance:g} x the SAE's largest fp32 activation on "
                f"the verified contexts where both are active; zero/nonzero mismatches beyond that (TopK/JumpReLU "
                f"selection changes) <= {self.max_changes:.0%} of the positions")


def bound_for(dtype: str, tolerance: float | None = None) -> Bound:
    """The bound of a store built in `dtype` (a name or str(torch dtype)); `tolerance` overrides its number."""
    name = dtype_name(dtype)
    tol, changes = BOUNDS[name]
    return Bound(name, tol if tolerance is None else float(tolerance), changes)


def stored_dtype(source: StoredSource, sae_id: str) -> str:
    """The dtype an SAE's activations were computed in (its saes row's params; float32 for stores that predate it).

    A Store answers from its saes rows; an unpublished StoreBuilder from the saes row it has written (before
    precompute verifies)."""
    if hasattr(source, "sae_params"):
        params = source.sae_params(sae_id)
    elif hasattr(source, "sae"):
        info = source.sae(sae_id)
        params = info.params if info is not None else {}
    else:
        raise TypeError(f"{type(source).__name__} cannot tell the dtype {sae_id!r} was built in; pass dtype=")
    return dtype_name(params.get("dtype") or "float32")


def sample_contexts(ctx_ids: list[int], n: int, seed: int = 0) -> list[int]:
    """n of the context ids, drawn without replacement by a seeded generator (all of them if fewer)."""
    if n < 1:
        raise UserError(f"--sample {n}: verify needs at least one context")
    ids = sorted(ctx_ids)
    if len(ids) <= n:
        return ids
    pick = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in pick)


def reference_copy(sae: SAE) -> SAE:
    """The SAE in float32 on the CPU (itself when it already is)."""
    p = sae.W_enc
    if p.device.type == "cpu" and p.dtype == torch.float32:
        return sae
    return copy.deepcopy(sae).to("cpu").float()


def compare(lm: HookedLM, sae: SAE, hook: str, stored: StoredExamples, bound: Bound | float) -> dict[str, Any]:
    """Re-encode each stored context alone and compare with what the store holds (see the module doc): every
    example row's activation list (act_pos / act_val, each copy on its own: rows of one feature and context share
    a list, and a damaged copy must not hide behind a sound one) and its `value`, the number the pages show.

    `bound` may be a bare number: the float32 bound with that tolerance."""
    if not isinstance(bound, Bound):
        bound = Bound("float32", float(bound))
    max_rel = 0.0
    positions = features = values = copies = 0
    peak = 0.0  # the SAE's largest fp32 activation on these contexts (every feature)
    per_ctx = []
    for ctx_id, (tokens, rows) in sorted(stored.items()):
        if not rows:
            continue
        z = encode_batch(lm, sae, np.asarray([tokens], dtype=np.int32), hook)[0]  # (T, d_sae)
        peak = max(peak, float(z.max()))
        lists = sorted({(f, tuple(p), tuple(v)) for f, _, _, p, v in rows})  # each distinct copy of a list
        fs = [f for f, _, _ in lists]
        got = z[:, fs].double().numpy()  # (T, n_lists)
        want = np.zeros_like(got)
        for j, (_, pos, val) in enumerate(lists):
            want[list(pos), j] = val
        features += len(set(fs))
        copies += len(lists)
        fpeak = np.maximum(np.abs(got).max(0), np.abs(want).max(0))  # (n_lists,)
        floor = np.maximum(FLOOR_SHARE * fpeak, np.finfo(np.float32).tiny)
        either = (got != 0) | (want != 0)  # (T, n_lists)
        diff = np.abs(got - want)
        rel = diff / np.maximum(np.maximum(np.abs(got), np.abs(want)), floor)
        rel[~either] = 0
        positions += int(either.sum())
        # each example's own value, at its own position: one more (T=1) column per row
        col = {f: j for j, f in enumerate(fs)}
        vgot = np.asarray([[float(z[p, f]) for f, _, p, _, _ in rows]])
        vwant = np.asarray([[float(v) for _, v, _, _, _ in rows]])
        vfloor = np.asarray([floor[col[f]] for f, *_ in rows])
        vdiff = np.abs(vgot - vwant)
        vrel = vdiff / np.maximum(np.maximum(np.abs(vgot), np.abs(vwant)), vfloor)
        values += len(rows)
        max_rel = max(max_rel, float(rel.max(initial=0)), float(vrel.max(initial=0)))
        per_ctx.append((int(ctx_id), fs, got, want, diff, rel, None))
        per_ctx.append((int(ctx_id), [f for f, *_ in rows], vgot, vwant, vdiff, vrel, [p for _, _, p, _, _ in rows]))
    scale = max(peak, np.finfo(np.float32).tiny)
    tol = bound.tolerance
    worst: dict[str, Any] = {}
    max_abs = max_peak = worst_score = 0.0
    mismatches = value_mismatches = 0
    for ctx_id, fs, got, want, diff, rel, at in per_ctx:
        peak_diff = diff / scale
        one_side = (got == 0) != (want == 0)
        both = np.where(one_side, 0.0, peak_diff)  # share of the SAE's peak where both sides are active
        max_peak = max(max_peak, float(both.max(initial=0)))
        # float32: the relative difference everywhere; other dtypes: the tolerance applies where both are active,
        # and one-sided positions beyond it are selection changes
        score = rel if bound.metric == "max_rel_diff" else both
        beyond = int((one_side & ((rel if bound.metric == "max_rel_diff" else peak_diff) > tol)).sum())
        if at is None:
            mismatches += beyond
        else:  # an example's value: counted on its own (the same position is counted in its list already)
            value_mismatches += beyond
        max_abs = max(max_abs, float(diff.max(initial=0)))
        if score.size and score.max() > worst_score:
            t, j = np.unravel_index(int(score.argmax()), score.shape)
            worst_score = float(score[t, j])
            worst = {"ctx_id": ctx_id, "feature": int(fs[j]), "pos": int(t if at is None else at[j]),
                     "stored": float(want[t, j]), "recomputed": float(got[t, j]),
                     "what": "act_val" if at is None else "value"}
    result = {"contexts": len(stored), "features": features, "positions": positions, "values": values,
              "lists": copies, "max_rel_diff": max_rel,
              "max_abs_diff": max_abs, "max_peak_diff": max_peak, "sae_peak": peak, "mismatches": mismatches,
              "mismatch_share": mismatches / positions if positions else 0.0, "value_mismatches": value_mismatches, "worst": worst, "dtype": bound.dtype,
              "metric": bound.metric, "tolerance": tol, "max_changes": bound.max_changes, "bound": bound.describe()}
    result["ok"] = (result[bound.metric] <= tol and result["mismatch_share"] <= bound.max_changes
                    and value_mismatches <= bound.max_changes * values)
    return result


def verify_sample(source: StoredSource, lm: HookedLM, sae: SAE, sae_id: str, hook: str, n: int, seed: int = 0,
                  tolerance: float | None = None, store_path: Path | None = None,
                  dtype: str | None = None) -> dict[str, Any]:
    """Verify n random contexts of one SAE; the result carries its provenance and the command reproducing it.

    The bound is the one of the dtype the store was built with (`dtype` overrides it, `tolerance` its number)."""
    bound = bound_for(dtype or stored_dtype(source, sae_id), tolerance)
    chosen = sample_contexts(source.context_ids(sae_id), n, seed) if source.context_ids(sae_id) else []
    result = compare(lm, sae, hook, source.stored_examples(sae_id, chosen), bound)
    args = ["--sae", sae_id, "--sample", str(n), "--seed", str(seed)]
    if dtype is not None:
        args += ["--bound", bound.dtype]
    if tolerance is not None:
        args += ["--tolerance", f"{tolerance:g}"]
    store = shlex.quote(str(store_path)) if store_path is not None else STORE_PLACEHOLDER
    result.update(sample=n, seed=seed, ctx_ids=chosen, reference=REFERENCE, saescope_version=__version__,
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  command=shlex.join(["saescope", "verify"]) + f" {store} " + shlex.join(args))
    return result


def verify_store(path: Path, sae_id: str | None = None, sample: int = PRECOMPUTE.verify_sample, seed: int = 0,
                 tolerance: float | None = None, dtype: str | None = None) -> dict[str, dict[str, Any]]:
    """Verify one SAE of a store (or every SAE): model and SAE are loaded from the store's provenance paths.

    Each SAE is held to the bound of the dtype it was built with, unless `dtype` names another (float32,
    bfloat16, float16); `tolerance` replaces the bound's number."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--bound {dtype!r}: unknown dtype; valid: {', '.join(DTYPES)}")
    with Store(path) as store:
        saes = store.saes()
        if sae_id is not None:
            saes = [store.require_sae(sae_id)]
        tables = store.check_tables()  # every block of every table read back (checksums)
        damaged_tables = {t: why for t, why in tables.items() if why}
        models: dict[str, HookedLM] = {}
        out = {}
        for s in saes:
            if s.model_path not in models:
                models[s.model_path] = load_model(s.model_path, "cpu", "float32")
            sae = load_sae(s.sae_path, s.hook).to("cpu").float()
            try:
                r = verify_sample(store, models[s.model_path], sae, s.sae_id, s.hook, sample, seed, tolerance,
                                  store_path=Path(path), dtype=dtype)
            except StoreError as err:  # the examples or contexts cannot be read: say which, do not crash
                r = {"ok": False, "error": str(err), "contexts": 0, "positions": 0, "features": 0, "values": 0,
                     "mismatches": 0, "worst": {}, "bound": bound_for(dtype or "float32", tolerance).describe()}
            r["damaged_tables"] = damaged_tables
            if damaged_tables:
                r["ok"] = False
            out[s.sae_id] = r
        return out


def describe(sae_id: str, r: dict[str, Any]) -> list[str]:
    """The lines `saescope verify` prints for one SAE's result."""
    status = "ok" if r["ok"] else "FAILED"
    lines = []
    if "error" in r:
        lines.append(f"{sae_id}: FAILED: {r['error']}")
    else:
        lines.append(
            f"{sae_id}: {status}: max rel. diff {r['max_rel_diff']:.2g} (max abs. diff {r['max_abs_diff']:.2g}, "
            f"{r['max_peak_diff']:.2g} of the SAE's peak {r['sae_peak']:.3g} where both sides are active) on "
            f"{r['contexts']} contexts, {r['positions']:,} positions of {r['lists']:,} activation lists of "
            f"{r['features']:,} features and {r['values']:,} example values; {r['mismatches']} zero/nonzero "
            f"mismatches; checked against the {r['bound']}")
        if r["worst"] and not r["ok"]:
            w = r["worst"]
            lines.append(f"  worst: context {w['ctx_id']} feature {w['feature']} position {w['pos']} ({w['what']}): "
                         f"stored {w['stored']:.6g}, recomputed {w['recomputed']:.6g}")
    for t, why in sorted(r.get("damaged_tables", {}).items()):
        lines.append(f"  damaged table {t}: {why}")
    return lines
