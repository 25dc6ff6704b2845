"""The streaming pass: contexts -> one forward pass to the deepest hook -> every SAE's nonzero activations ->
the shard's append-only files (workdir.ShardWriter), one committed batch at a time.

Per batch: forward to the hook (stopping early), encode, zero the special-token positions, and append the
nonzero activations (sparse). Nothing per feature happens in Python and no dense (tokens x features) matrix
outlives its batch. The one-process run streams its one shard here; a Ray task runs the same function on a node.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import PRECOMPUTE
from ..data import iter_dataset_contexts, special_mask
from ..encode import encode_activations
from ..models import HookedLM
from ..saes import SAE
from ..store.write import SparseActs
from .loading import LoadedSAE
from .spec import PrecomputeSpec
from .workdir import Plan, ShardWriter, WorkDir


def _batches(it, n_ctx: int, skip: int, batch_size: int):
    ctxs = itertools.islice(it, skip, n_ctx)
    while True:
        chunk = list(itertools.islice(ctxs, batch_size))
        if not chunk:
            return
        yield np.stack(chunk)


def sparse_features(sae: SAE, acts: torch.Tensor, special: torch.Tensor, first_ctx: int,
                    chunk_bytes: int = PRECOMPUTE.encode_bytes) -> SparseActs:
    """Hook activations (B, T, d_in) -> the SAE's nonzero features as parallel arrays, special tokens zeroed.

    The same arithmetic as encode.encode_batch (both call encode_activations), a slice of tokens at a time so
    that the dense (tokens, d_sae) block stays within chunk_bytes however wide the SAE."""
    B, T, d_in = acts.shape
    x, sp = acts.reshape(B * T, d_in), special.reshape(B * T)
    rows = max(1, chunk_bytes // (4 * sae.cfg.d_sae))
    parts = []
    for r0 in range(0, B * T, rows):
        z = encode_activations(sae, x[r0:r0 + rows], sp[r0:r0 + rows])  # (rows, d_sae)
        r, f = torch.nonzero(z, as_tuple=True)
        parts.append((r + r0, f, z[r, f].float()))
    r = torch.cat([p[0] for p in parts]).cpu().numpy()
    return SparseActs((r // T + first_ctx).astype(np.int32), (r % T).astype(np.int16),
                      torch.cat([p[1] for p in parts]).cpu().numpy().astype(np.int32),
                      torch.cat([p[2] for p in parts]).cpu().numpy())


def stream_shard(spec: PrecomputeSpec, lm: HookedLM, loaded: list[LoadedSAE], plan: Plan, work: WorkDir, s: int,
                 prepend: bool, folder: Path | None = None, progress: bool | None = None) -> float:
    """Stream shard s (contexts plan.shards[s]) into its folder and seal it; returns seconds spent in forward.

    Resumes after the shard's last recorded batch. The precompute process runs this for its one shard; a Ray
    task runs it on a cluster node (folder: a node-local folder; the sealed Parquet goes to work.sealed).
    After every committed batch: spec.event("batch", shard=s, batches=n, contexts=done)."""
    if work.is_sealed(s):
        return 0.0
    c0, c1 = plan.shards[s]
    hooks = list(dict.fromkeys(x.hook for x in loaded))
    writer = ShardWriter(folder or work.shard_dir(s), c0, spec.context_len, len(loaded))
    done = c0 + writer.contexts
    contexts = iter_dataset_contexts(spec.dataset, spec.text_field, lm.tokenizer, spec.context_len, prepend)
    show = spec.progress if progress is None else progress
    bar = tqdm(total=plan.n_ctx * spec.context_len, initial=work.contexts_done(plan) * spec.context_len, unit="tok",
               unit_scale=True, desc="precompute" if len(plan.shards) == 1 else f"shard {s}", disable=not show,
               smoothing=0.1)
    n_batches = 0
    t_forward = 0.0
    try:
        for ids_np in _batches(contexts, c1, done, spec.batch_size):
            special = special_mask(ids_np, lm.tokenizer)  # (B, T), computed once per batch
            t0 = time.perf_counter()
            acts = lm.activations_multi(torch.from_numpy(ids_np).long(), hooks)  # hook -> (B, T, d_in), one pass
            t_forward += time.perf_counter() - t0
            special_t = torch.from_numpy(special)
            sparse = [sparse_features(x.sae, acts[x.hook], special_t, done) for x in loaded]
            del acts
            writer.append(ids_np, (~special).sum(1).astype(np.int32), sparse)
            done += ids_np.shape[0]
            bar.update(ids_np.size)
            n_batches += 1
            spec.event("batch", shard=s, batches=n_batches, contexts=done)  # committed: a stop here loses nothing
        writer.seal(work, s, plan.d_sae)
    finally:
        bar.close()
        writer.close()
    return t_forward
