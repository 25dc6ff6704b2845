"""Search a prompt across every SAE (Neuronpedia's "search via inference"): for chosen token positions, the top
features of all SAEs together, ranked by their activation there; one forward pass serves every SAE.

A feature's score is its largest activation over the chosen positions (one position: its activation there).
Features whose largest activation over the whole prompt sits on the BOS position are left out (they mostly
track the attention sink), as Neuronpedia does. Special-token positions are never chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import special_mask
from .errors import UserError
from .models import HookedLM
from .saes import SAE


@dataclass(frozen=True)
class Hit:
    sae_id: str
    feature: int
    score: float  # max activation over the chosen positions
    position: int  # where that max is


@torch.no_grad()
def search_all(lm: HookedLM, saes: Sequence[tuple[str, SAE, str]], ids: Sequence[int],
               positions: Sequence[int] | None = None, top: int = 20) -> list[Hit]:
    """saes: (sae_id, SAE, hook) triples; ids: one prompt (BOS included if wanted); positions: None = every
    non-special position. Returns the `top` hits over all SAEs, highest score first (ties: SAE order, feature)."""
    t = torch.as_tensor(list(ids), dtype=torch.long)[None]
    if t.numel() == 0:
        raise UserError("the prompt is empty; give at least 1 token")
    T = t.shape[1]
    special = special_mask(t.numpy(), lm.tokenizer)[0] if lm.tokenizer is not None else np.zeros(T, bool)
    if positions is None:
        positions = [p for p in range(T) if not special[p]]
    bad = [p for p in positions if not 0 <= p < T]
    if bad:
        raise UserError(f"position {bad[0]} is outside the prompt's 0..{T - 1}")
    positions = [p for p in dict.fromkeys(positions) if not special[p]]
    if not positions:
        raise UserError("choose at least one position that is not a special token")
    bos = lm.tokenizer.bos_token_id if lm.tokenizer is not None else None
    acts = lm.activations_multi(t, list(dict.fromkeys(h for _, _, h in saes)))  # one forward pass
    hits: list[tuple[float, int, int, int]] = []  # (-score, sae order, feature, position)
    for n, (sae_id, sae, hook) in enumerate(saes):
        z = sae.encode(acts[hook][0].to(sae.W_enc.device)).float().cpu()  # (T, d_sae)
        sub = z[positions]  # (P, d_sae)
        score, at = sub.max(dim=0)
        keep = score > 0
        if bos is not None and int(t[0, 0]) == bos:
            keep &= z.argmax(dim=0) != 0  # the prompt-wide maximum is not on BOS
        for f in torch.nonzero(keep)[:, 0].tolist():
            hits.append((-float(score[f]), n, f, positions[int(at[f])]))
    hits.sort()
    return [Hit(saes[n][0], f, -s, p) for s, n, f, p in hits[:top]]
