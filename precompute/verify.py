"""`saescope verify`: recompute a random sample of stored contexts with the fp32 reference path and compare.

For each sampled context (any context the SAE's examples refer to: top, interval or quantile samples), every
feature with an example in that context has its stored activations on every position of the context (act_pos /
act_val). The context's token ids are re-encoded alone (batch 1) in float32 on the CPU through
`encode.encode_batch`, the same function precompute and the live worker use, and compared with the stored values
on every position where either side is nonzero.

Relative difference of one position: |recomputed - stored| / max(|stored|, |recomputed|, floor), with floor =
FLOOR_SHARE x the feature's largest activation in that context, so that values within float round-off of zero
do not turn noise into a large ratio. A zero/nonzero mismatch is a position where exactly one side is zero and
the relative difference exceeds the tolerance.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import shlex
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import __version__
from .config import PRECOMPUTE
from .encode import encode_batch
from .models import HookedLM, load_model
from .saes import SAE, load_sae
from .store import Store

log = logging.getLogger(__name__)
FLOOR_SHARE = 1e-3
STORE_PLACEHOLDER = "{store}"  # stored commands name the store by this; the reader puts in its own path
REFERENCE = "float32, batch 1, cpu, encode.encode_batch"

Stored = dict[int, tuple[list[int], dict[int, tuple[list[int], list[float]]]]]


class StoredSource(Protocol):
    """A published Store or an unpublished StoreBuilder: both answer these two questions."""

    def context_ids(self, sae_id: str) -> list[int]: ...

    def stored_activations(self, sae_id: str, ctx_ids: list[int]) -> Stored: ...


def sample_contexts(ctx_ids: list[int], n: int, seed: int = 0) -> list[int]:
    """n of the context ids, drawn without replacement by a seeded generator (all of them if fewer)."""
    if n < 1:
        raise ValueError(f"--sample {n}: verify needs at least one context")
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


def compare(lm: HookedLM, sae: SAE, hook: str, stored: Stored, tolerance: float) -> dict[str, Any]:
    """Re-encode each stored context alone and compare with the stored activations (see the module doc)."""
    worst: dict[str, Any] = {}
    max_rel = max_abs = 0.0
    positions = mismatches = features = 0
    for ctx_id, (tokens, feats) in sorted(stored.items()):
        if not feats:
            continue
        z = encode_batch(lm, sae, np.asarray([tokens], dtype=np.int32), hook)[0]  # (T, d_sae)
        fs = sorted(feats)
        got = z[:, fs].double().numpy()  # (T, n_features)
        want = np.zeros_like(got)
        for j, f in enumerate(fs):
            pos, val = feats[f]
            want[pos, j] = val
        features += len(fs)
        peak = np.maximum(np.abs(got).max(0), np.abs(want).max(0))  # (n_features,)
        floor = np.maximum(FLOOR_SHARE * peak, np.finfo(np.float32).tiny)
        either = (got != 0) | (want != 0)  # (T, n_features)
        diff = np.abs(got - want)
        rel = diff / np.maximum(np.maximum(np.abs(got), np.abs(want)), floor)
        rel[~either] = 0
        positions += int(either.sum())
        mismatches += int((((got == 0) != (want == 0)) & (rel > tolerance)).sum())
        max_abs = max(max_abs, float(diff.max(initial=0)))
        if rel.size and rel.max() > max_rel:
            t, j = np.unravel_index(int(rel.argmax()), rel.shape)
            max_rel = float(rel[t, j])
            worst = {"ctx_id": int(ctx_id), "feature": int(fs[j]), "pos": int(t), "stored": float(want[t, j]),
                     "recomputed": float(got[t, j])}
    return {"contexts": len(stored), "features": features, "positions": positions, "max_rel_diff": max_rel,
            "max_abs_diff": max_abs, "mismatches": mismatches, "worst": worst, "tolerance": tolerance,
            "ok": max_rel <= tolerance and mismatches == 0}


def verify_sample(source: StoredSource, lm: HookedLM, sae: SAE, sae_id: str, hook: str, n: int, seed: int = 0,
                  tolerance: float = PRECOMPUTE.verify_tolerance, store_path: Path | None = None) -> dict[str, Any]:
    """Verify n random contexts of one SAE; the result carries its provenance and the command reproducing it."""
    chosen = sample_contexts(source.context_ids(sae_id), n, seed) if source.context_ids(sae_id) else []
    result = compare(lm, sae, hook, source.stored_activations(sae_id, chosen), tolerance)
    args = ["--sae", sae_id, "--sample", str(n), "--seed", str(seed)]
    store = shlex.quote(str(store_path)) if store_path is not None else STORE_PLACEHOLDER
    result.update(sample=n, seed=seed, ctx_ids=chosen, reference=REFERENCE, saescope_version=__version__,
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  command=shlex.join(["saescope", "verify"]) + f" {store} " + shlex.join(args))
    return result


def verify_store(path: Path, sae_id: str | None = None, sample: int = PRECOMPUTE.verify_sample, seed: int = 0,
                 tolerance: float = PRECOMPUTE.verify_tolerance) -> dict[str, dict[str, Any]]:
    """Verify one SAE of a store (or every SAE): model and SAE are loaded from the store's provenance paths."""
    with Store(path) as store:
        saes = store.saes()
        if sae_id is not None:
            saes = [s for s in saes if s.sae_id == sae_id]
            if not saes:
                have = ", ".join(s.sae_id for s in store.saes()) or "none"
                raise ValueError(f"{path} has no SAE {sae_id!r}; valid: {have}")
        models: dict[str, HookedLM] = {}
        out = {}
        for s in saes:
            if s.model_path not in models:
                models[s.model_path] = load_model(s.model_path, "cpu", "float32")
            sae = load_sae(s.sae_path, s.hook).to("cpu").float()
            out[s.sae_id] = verify_sample(store, models[s.model_path], sae, s.sae_id, s.hook, sample, seed, tolerance,
                                          store_path=Path(path))
        return out
