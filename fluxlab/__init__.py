"""fluxlab: train and sample FLUX.1-style rectified-flow diffusion transformers."""

__version__ = "0.1.0"
