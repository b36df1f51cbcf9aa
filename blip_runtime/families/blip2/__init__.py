"""BLIP-2 at run time (numpy, tokenizers; never torch)."""
