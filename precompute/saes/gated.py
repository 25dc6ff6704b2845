"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which features fire, a magnitude path how much.

    gate = 1[(x - b_dec) W_enc + b_gate > 0]
    mag  = ReLU((x - b_dec) (W_enc * exp(r_mag)) + b_mag)
    f    = gate * mag
"""

import torch

from .base import SAE


class GatedSAE(SAE):
    architecture = "gated"
    uses_b_enc = False
    extra_params = {"b_gate": "d_sae", "b_mag": "d_sae", "r_mag": "d_sae"}

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        s = self.sae_in(x)
        gate = (s @ self.W_enc + self.b_gate) > 0
        mag = torch.relu(s @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
        return gate * mag
