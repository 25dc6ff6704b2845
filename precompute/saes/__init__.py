"""SAE architectures behind a tiny registry, and loaders for the formats people publish SAEs in."""

from .base import SAE, SAEConfig, SAEFormatError, check_d_in
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {c.architecture: c for c in (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)}


def sae_class(architecture: str, file: str = "cfg.json") -> type[SAE]:
    if architecture not in REGISTRY:
        raise SAEFormatError(file, "architecture", repr(architecture), f"one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[architecture]


from .formats import load_sae, save_saelens  # noqa: E402  (formats needs the registry above)

__all__ = ["SAE", "SAEConfig", "SAEFormatError", "REGISTRY", "sae_class", "load_sae", "save_saelens", "check_d_in"]
