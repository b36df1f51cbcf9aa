"""Reference PyTorch modules of BLIP-2 that load Hugging Face checkpoints key for key."""
