"""Transcoders (Dunefsky et al. 2024; skip transcoders, Paulo et al. 2025): read an MLP's input, write its output.

    f(x) = act(x W_enc + b_enc) W_dec + b_dec (+ x W_skip^T)

`cfg.hook_name` is the input hook (blocks.L.hook_mlp_in, or blocks.L.hook_resid_mid for transcoders that read
the residual stream before the MLP's norm), `cfg.hook_name_out` the output hook (blocks.L.hook_mlp_out). The
encode path is an SAE's (precompute reads `hook_name`, so dashboards work unchanged); `decode` writes into the
output space. The input is never shifted by b_dec (b_dec lives in the output space).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEFormatError


class Transcoder(SAE):
    architecture = "transcoder"
    is_transcoder: ClassVar[bool] = True
    has_skip: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        if cfg.apply_b_dec_to_input:
            cfg.apply_b_dec_to_input = False  # b_dec is an output-space bias
        if cfg.normalize_activations != "none":
            raise SAEFormatError("cfg.json", "normalize_activations", repr(cfg.normalize_activations),
                                 "'none' for a transcoder")
        super().__init__(cfg)
        if self.has_skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in))

    @classmethod
    def param_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        shapes = super().param_shapes(d_in, d_sae)
        if cls.has_skip:
            shapes["W_skip"] = (d_in, d_in)  # (d_out, d_in), applied as x @ W_skip.T (SAELens, circuit-tracer)
        return shapes

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        return self.act(self.pre_acts(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out); zero without a skip
        if not self.has_skip:
            return torch.zeros_like(x)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the MLP's replacement: (..., d_in) -> (..., d_out)
        return self.decode(self.encode(x)) + self.skip(x)


class SkipTranscoder(Transcoder):
    architecture = "skip_transcoder"
    has_skip = True


class JumpReLUTranscoder(Transcoder):
    architecture = "jumprelu_transcoder"
    extra_params = {"threshold": "d_sae"}

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    architecture = "jumprelu_skip_transcoder"
    has_skip = True


class TopKTranscoder(Transcoder):
    architecture = "topk_transcoder"

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        top = pre.topk(int(self.cfg.k or 0), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


class TopKSkipTranscoder(TopKTranscoder):
    architecture = "topk_skip_transcoder"
    has_skip = True


TRANSCODERS: tuple[type[Transcoder], ...] = (Transcoder, SkipTranscoder, JumpReLUTranscoder, JumpReLUSkipTranscoder,
                                             TopKTranscoder, TopKSkipTranscoder)


def transcoder_architecture(activation: str, skip: bool) -> str:
    """'relu' | 'jump_relu'/'jumprelu' | 'topk' (+ skip) -> the registry name."""
    base = {"relu": "", "jump_relu": "jumprelu_", "jumprelu": "jumprelu_", "topk": "topk_"}.get(activation)
    if base is None:
        raise SAEFormatError("config", "activation", repr(activation), "relu, jump_relu or topk")
    return f"{base}{'skip_' if skip else ''}transcoder"
