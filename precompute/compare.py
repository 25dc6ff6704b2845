"""Comparing SAEs: for each feature of SAE A, the nearest features of SAE B by decoder cosine.

Both decoders must write into the same space (same d_in, e.g. layers of one model); widths may differ.
Rows are normalised once, then A is processed in chunks of rows so that only a (chunk, d_sae_B) block of
cosines exists at a time. A decoder row of norm zero has cosine 0 with everything.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch
from .errors import UserError

log = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 2**20  # one (chunk, d_sae_B) float32 block of cosines


class Matches(NamedTuple):
    ids: torch.Tensor  # (d_sae_A, n) int32, features of B, most similar first (ties: lower index)
    cos: torch.Tensor  # (d_sae_A, n) float32


def _unit(w: Any, name: str) -> torch.Tensor:
    w = torch.as_tensor(w).detach().to("cpu", torch.float32)
    if w.ndim != 2:
        raise UserError(f"{name} must be a 2-D decoder (d_sae, d_in); got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise UserError(f"{name} contains NaN or inf")
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (d_sae, d_in)


def nearest_across(w_dec_a: Any, w_dec_b: Any, n: int = 10, chunk_bytes: int = CHUNK_BYTES) -> Matches:
    """Top-n features of SAE B for every feature of SAE A by decoder cosine (rows of W_dec: (d_sae, d_in))."""
    a, b = _unit(w_dec_a, "W_dec of SAE A"), _unit(w_dec_b, "W_dec of SAE B")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"the SAEs write into different spaces: d_in {a.shape[1]} vs {b.shape[1]}; "
                         "compare SAEs of the same model width (e.g. layers of one model)")
    if not 1 <= n <= b.shape[0]:
        raise UserError(f"n must be between 1 and d_sae of SAE B = {b.shape[0]}; got {n}")
    t0 = time.perf_counter()
    rows = max(1, chunk_bytes // (4 * b.shape[0]))
    ids = torch.empty((a.shape[0], n), dtype=torch.int32)
    cos = torch.empty((a.shape[0], n), dtype=torch.float32)
    for s in range(0, a.shape[0], rows):
        sims = a[s:s + rows] @ b.T  # (c, d_sae_B)
        # take a few more than n, then order them by cosine with ties to the lower feature id
        # (exact unless more than 16 features tie at the n-th place)
        k = min(b.shape[0], n + 16)
        top, idx = sims.topk(k, dim=1)  # (c, k)
        order = torch.argsort(idx, dim=1)  # put candidates in index order ...
        top, idx = top.gather(1, order), idx.gather(1, order)
        order = torch.argsort(-top, dim=1, stable=True)  # ... then stably by cosine
        cos[s:s + rows] = top.gather(1, order)[:, :n]
        ids[s:s + rows] = idx.gather(1, order)[:, :n].to(torch.int32)
    log.info("compare: %d x %d features, top-%d by decoder cosine in %.1f s", a.shape[0], b.shape[0], n,
             time.perf_counter() - t0)
    return Matches(ids, cos)


def best_match(w_dec_a: Any, w_dec_b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The single most similar feature of B for each feature of A: ids (d_sae_A,) int32, cosine (d_sae_A,)."""
    m = nearest_across(w_dec_a, w_dec_b, n=1)
    return m.ids[:, 0], m.cos[:, 0]


def mutual_best(ids_ab: torch.Tensor, ids_ba: torch.Tensor) -> torch.Tensor:
    """(d_sae_A,) bool: feature i of A and its best match j in B choose each other (best_match both ways)."""
    ids_ab, ids_ba = ids_ab.long(), ids_ba.long()
    return ids_ba[ids_ab] == torch.arange(len(ids_ab))
