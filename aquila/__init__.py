"""Aquila: fused kernels, model, trainer and benchmarks for Aquila-family language models."""

__version__ = "0.1.0"
