"""Pretraining data: token files in Megatron-LM's indexed format, packing into fixed-length samples, blending."""

import os

# A target the loss skips (prompt tokens, padding): PyTorch's and Hugging Face's convention. Defined here, beside
# nothing heavier than os, so that every package can import it.
IGNORE_INDEX = -100


def demo_file(name: str) -> str:
    """A file of the bundled demo data (corpus splits, conversations, tokenizer)."""
    return os.path.join(os.path.dirname(__file__), "demo", name)
