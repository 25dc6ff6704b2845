"""SAE architectures behind a tiny registry, and loaders for the formats people publish SAEs in."""

from .base import SAE, SAEConfig, SAEFormatError
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE
from .transcoder import TRANSCODERS, Transcoder

REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)}
TRANSCODER_REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in TRANSCODERS}  # read an MLP's input, write its output


def sae_class(architecture: str, file: str = "cfg.json") -> type[SAE]:
    cls = REGISTRY.get(architecture) or TRANSCODER_REGISTRY.get(architecture)
    if cls is None:
        raise SAEFormatError(file, "architecture", repr(architecture),
                             f"one of {', '.join(sorted(REGISTRY) + sorted(TRANSCODER_REGISTRY))}")
    return cls


from .formats import load_sae, save_saelens  # noqa: E402  (formats needs the registry above)

__all__ = ["SAE", "Transcoder", "SAEConfig", "SAEFormatError", "REGISTRY", "TRANSCODER_REGISTRY", "sae_class", "load_sae", "save_saelens"]
