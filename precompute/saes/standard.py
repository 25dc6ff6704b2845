"""Standard ReLU SAE (Bricken et al. 2023): f = ReLU((x - b_dec) W_enc + b_enc)."""

import torch

from .base import SAE


class StandardSAE(SAE):
    architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        return torch.relu(self.pre_acts(x))
