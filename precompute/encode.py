"""Token ids -> SAE feature activations: the one encode path shared by precompute and the live worker, so that
stored and live activations cannot drift apart."""

from __future__ import annotations

import numpy as np
import torch

from .data import special_mask
from .models import HookedLM
from .saes import SAE
from .saes import check_d_in as check_saes_d_in


def check_d_in(lm: HookedLM, sae: SAE, hook: str | None = None, sae_name: str | None = None,
               model_name: str | None = None) -> None:
    """That an SAE fits a loaded model: `saes.check_d_in` (the one check and its message) against the width of
    `hook` (default: the SAE's own hook) in this model. Precompute (pipeline.loading) and the worker call it."""
    hook = hook or sae.cfg.hook_name
    check_saes_d_in(sae, lm.hook_width(hook), hook, model_name or lm.name, sae_name or sae.cfg.hook_name)


def encode_activations(sae: SAE, acts: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Hook activations (B, T, d_in) -> (B, T, d_sae) feature activations with the special positions zeroed."""
    with torch.no_grad():
        z = sae.encode(acts.to(sae.W_enc.device))  # (B, T, d_sae)
    z[special.to(z.device)] = 0
    return z


def encode_batch(lm: HookedLM, sae: SAE, ids: np.ndarray, hook: str,
                 attention_mask: torch.Tensor | None = None, special: np.ndarray | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T, d_sae) feature activations, special tokens zeroed.

    `special` is the (B, T) special-token mask when the caller already has it."""
    acts = lm.activations(torch.from_numpy(ids).long(), hook, attention_mask)  # (B, T, d_in)
    if special is None:
        special = special_mask(ids, lm.tokenizer)
    return encode_activations(sae, acts, torch.from_numpy(special))
