"""blip_runtime: run exported BLIP / BLIP-2 engine bundles with numpy, pillow and tokenizers (no torch)."""
