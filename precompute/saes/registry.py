"""The architectures saescope can run, by the name SAE configs give them (`architecture` in cfg.json): SAEs, and
transcoders (read an MLP's input, write its output) in a registry of their own."""

from .base import SAE, SAEFormatError
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE
from .transcoder import TRANSCODERS

REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)}
TRANSCODER_REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in TRANSCODERS}


def sae_class(architecture: str, file: str = "cfg.json") -> type[SAE]:
    cls = REGISTRY.get(architecture) or TRANSCODER_REGISTRY.get(architecture)
    if cls is None:
        raise SAEFormatError(file, "architecture", repr(architecture),
                             f"one of {', '.join(sorted(REGISTRY) + sorted(TRANSCODER_REGISTRY))}")
    return cls
