"""Aquila: fused kernels, model, trainer and benchmarks for Aquila-family language models."""

__version__ = "0.1.0"

# A target the loss skips (prompt tokens, padding): PyTorch's and Hugging Face's convention.
IGNORE_INDEX = -100
