"""SAE architectures and transcoders behind a tiny registry (registry.py), and loaders for the formats people
publish them in (formats.py). Imports point one way: base <- architectures <- registry <- formats <- this package."""

from .base import SAE, SAEConfig, SAEFormatError, check_d_in
from .formats import load_sae, save_saelens
from .registry import REGISTRY, TRANSCODER_REGISTRY, sae_class
from .transcoder import Transcoder

__all__ = ["SAE", "Transcoder", "SAEConfig", "SAEFormatError", "REGISTRY", "TRANSCODER_REGISTRY", "sae_class",
           "load_sae", "save_saelens", "check_d_in"]
