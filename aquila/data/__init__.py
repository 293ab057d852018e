"""Pretraining data: token files in Megatron-LM's indexed format, packing into fixed-length samples, blending."""

import os


def demo_file(name: str) -> str:
    """A file of the bundled demo data (corpus splits, conversations, tokenizer)."""
    return os.path.join(os.path.dirname(__file__), "demo", name)
