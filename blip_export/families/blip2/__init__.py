"""BLIP-2: ViT-g vision, the Q-Former, and an OPT or Flan-T5 language model behind a projection."""
