"""The SAE base class: weights named as in the papers and SAELens, one `encode` per architecture."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


class SAEFormatError(UserError):
    """A bad SAE file: names the file, the field, what was found and what was expected."""

    def __init__(self, file: str, field: str, found: object, expected: str):
        self.file, self.field = file, field
        super().__init__(f"{file}: field {field!r}: found {found}; expected {expected}")


@dataclass
class SAEConfig:
    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None = None  # where the SAE reads (a transcoder: the MLP's input)
    hook_name_out: str | None = None  # transcoders only: where the decoder writes (the MLP's output)
    model_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int | None = None  # topk only
    prepend_bos: bool = True
    context_size: int | None = None
    dataset_path: str | None = None
    source_format: str = "saelens"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_d_in(sae: "SAE", width: int, hook: str, model: str, name: str | None = None) -> None:
    """The one check that an SAE fits a model's activation at `hook` (precompute, the worker, the interventions)."""
    if sae.cfg.d_in != width:
        label = name if name is not None else (sae.cfg.source or sae.cfg.architecture)
        raise UserError(f"SAE {label!r} reads vectors of width d_in={sae.cfg.d_in}, but {hook} of model {model!r} "
                        f"has width {width}; pick the SAE trained on this model, or the model it was trained on")


class SAE(nn.Module):
    """Shapes: W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,)."""

    architecture: ClassVar[str] = ""
    is_transcoder: ClassVar[bool] = False
    extra_params: ClassVar[dict[str, str]] = {}  # name -> shape spec ("d_sae" | "d_in")
    uses_b_enc: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.uses_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        for name, dim in self.extra_params.items():
            setattr(self, name, nn.Parameter(torch.zeros(d_sae if dim == "d_sae" else d_in)))
        if cfg.normalize_activations not in NORMALIZATIONS:
            raise UserError(f"normalize_activations {cfg.normalize_activations!r}; valid: {', '.join(NORMALIZATIONS)}")

    @classmethod
    def param_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if cls.uses_b_enc:
            shapes["b_enc"] = (d_sae,)
        for name, dim in cls.extra_params.items():
            shapes[name] = (d_sae,) if dim == "d_sae" else (d_in,)
        return shapes

    # ---- input processing (shared by every architecture) ----
    def normalize(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_in)
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + 1e-5)
        return x

    def norm_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (..., 1), such that normalize(x) == (x - shift) / scale (to rounding):

            none                   scale = 1,                 shift = 0
            constant_norm_rescale  scale = |x| / sqrt(d_in),  shift = 0
            layer_norm             scale = std(x) + 1e-5,     shift = mean(x)"""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / math.sqrt(self.cfg.d_in), torch.zeros_like(x[..., :1])
        if mode == "layer_norm":
            return x.std(dim=-1, keepdim=True) + 1e-5, x.mean(dim=-1, keepdim=True)
        return torch.ones_like(x[..., :1]), torch.zeros_like(x[..., :1])

    def denormalize(self, y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The inverse of normalize with the statistics of the original input (stats = norm_stats(x)): maps a
        vector of the SAE's normalized space (e.g. decode(z)) back to the model's activation space."""
        scale, shift = stats
        return y * scale + shift

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x.to(self.W_enc.dtype))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in normalized input space (what the SAE was trained to reproduce)."""
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def fold_scaling_factor(self, s: float) -> None:
        """Fold an input scaling x' = s*x into the weights; feature activations are unchanged."""
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
