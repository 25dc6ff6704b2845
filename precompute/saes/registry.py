"""The architectures saescope can run, by the name SAE configs give them (`architecture` in cfg.json)."""

from .base import SAE, SAEFormatError
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)}


def sae_class(architecture: str, file: str = "cfg.json") -> type[SAE]:
    if architecture not in REGISTRY:
        raise SAEFormatError(file, "architecture", repr(architecture), f"one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[architecture]
