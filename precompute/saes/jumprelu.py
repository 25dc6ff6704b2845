"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): f = pre * 1[pre > threshold], pre >= 0."""

import torch

from .base import SAE


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    extra_params = {"threshold": "d_sae"}

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)
