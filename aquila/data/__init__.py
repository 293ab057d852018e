"""Pretraining data: token files in Megatron-LM's indexed format, packing into fixed-length samples, blending."""
