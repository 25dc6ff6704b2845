"""Token ids -> SAE feature activations: the one encode path shared by precompute and the live worker, so that
stored and live activations cannot drift apart."""

from __future__ import annotations

import numpy as np
import torch

from .data import special_mask
from .errors import UserError
from .models import HookedLM
from .saes import SAE


def check_d_in(lm: HookedLM, sae: SAE, hook: str | None = None, sae_name: str | None = None,
               model_name: str | None = None) -> None:
    """The one check that an SAE fits a model: UserError unless its d_in equals the width of `hook` (default: the
    SAE's own hook). Precompute (pipeline.loading), the worker and the interventions call it."""
    hook = hook or sae.cfg.hook_name
    width = lm.hook_width(hook)
    if sae.cfg.d_in != width:
        raise UserError(f"SAE {sae_name or sae.cfg.hook_name!r} reads vectors of width d_in={sae.cfg.d_in}, but "
                        f"{hook} of model {model_name or lm.name!r} has width {width}; pick the SAE trained on this "
                        "model, or the model it was trained on")


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
