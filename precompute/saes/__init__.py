"""SAE architectures behind a tiny registry (registry.py), and loaders for the formats people publish SAEs in
(formats.py). Imports point one way: base <- architectures <- registry <- formats <- this package."""

from .base import SAE, SAEConfig, SAEFormatError, check_d_in
from .formats import load_sae, save_saelens
from .registry import REGISTRY, sae_class

__all__ = ["SAE", "SAEConfig", "SAEFormatError", "REGISTRY", "sae_class", "load_sae", "save_saelens", "check_d_in"]
