"""saescope: precompute and explore sparse-autoencoder features."""
__version__ = "0.1.0"
