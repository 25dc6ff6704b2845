"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, then ReLU."""

import torch

from .base import SAE


class TopKSAE(SAE):
    architecture = "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        assert self.cfg.k is not None and self.cfg.k > 0, "topk SAE needs k > 0"
        pre = self.pre_acts(x)
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
