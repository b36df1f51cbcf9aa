"""Real BLIP-2 widths with few layers: ViT-g (1408 wide, 16 heads, mlp 6144, patch 14) at 224 and 364 px
(257 and 677 tokens) and the 768-wide Q-Former cross-attending to 1408, against transformers."""

from __future__ import annotations

import pytest
import torch

from blip2_oracle import make_checkpoint, pixels
from blip_export import load_model
from oracle import assert_close


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("image_size, tokens", [(224, 257), (364, 677)])
def test_vit_g_and_qformer_at_real_width(tmp_path, image_size, tokens):
    import transformers

    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=1, num_attention_heads=16,
                           image_size=image_size, patch_size=14),
        qformer_config=dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                            cross_attention_frequency=2),
        num_query_tokens=32,
    )
    theirs = make_checkpoint("Blip2VisionModelWithProjection", tmp_path, config, seed=21, std=0.02, with_processor=False)
    ours, cfg = load_model(tmp_path)
    assert cfg.num_image_tokens == tokens and cfg.qformer_config.encoder_hidden_size == 1408
    x = pixels(1, image_size)
    hidden, _ = ours.vision_model(x)
    ref = theirs.vision_model(pixel_values=x).last_hidden_state
    assert hidden.shape == (1, tokens, 1408)
    assert_close(hidden, ref, 1e-5, f"ViT-g last_hidden_state at {image_size} px")
    q = theirs.query_tokens
    ref_q = theirs.qformer(query_embeds=q, encoder_hidden_states=ref,
                           encoder_attention_mask=torch.ones(1, tokens, dtype=torch.long)).last_hidden_state
    assert_close(ours.query_output(ref), ref_q, 1e-5, "Q-Former 768 over 1408-wide image tokens")
    embeds, _ = ours(x)
    assert_close(embeds, theirs(pixel_values=x).image_embeds, 1e-5, "projected image embeds")
