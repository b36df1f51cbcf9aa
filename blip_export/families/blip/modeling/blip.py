"""BLIP task models: captioning, VQA, image-text retrieval (ITM and ITC) and BlipModel's features.

Each mirrors the transformers class of the same name: same submodule names (so the checkpoint's
keys load one to one) and the same computation, without generation machinery; decoding loops live
in blip_runtime and run over the exported graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlipConfig
from .text import BlipTextLMHeadModel, BlipTextModel
from .vision import BlipVisionModel


class BlipForConditionalGeneration(nn.Module):
    """Captioning: the decoder cross-attends to all image tokens (no encoder mask)."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = BlipVisionModel(cfg.vision)
        self.text_decoder = BlipTextLMHeadModel(cfg.text)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """pixel_values [B, 3, H, W], input_ids/attention_mask int64 [B, S] -> logits [B, S, V]."""
        image_embeds, _ = self.vision_model(pixel_values)
        logits, _ = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return logits


class BlipForQuestionAnswering(nn.Module):
    """VQA: the question is encoded over the image; the answer is decoded over the question states."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = BlipVisionModel(cfg.vision)
        self.text_encoder = BlipTextModel(cfg.text, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(cfg.text)

    def encode_question(self, pixel_values, input_ids, attention_mask=None):
        """-> question states [B, S_q, D]: the encoder states the answer decoder attends to."""
        image_embeds, _ = self.vision_model(pixel_values)
        states, _, _ = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return states

    def forward(self, pixel_values, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        """-> answer logits [B, S_a, V], as transformers' forward with decoder_input_ids (the decoder's
        cross-attention is masked by the question's attention_mask)."""
        states = self.encode_question(pixel_values, input_ids, attention_mask)
        logits, _ = self.text_decoder(
            decoder_input_ids,
            decoder_attention_mask,
            encoder_hidden_states=states,
            encoder_attention_mask=attention_mask,
        )
        return logits


class BlipForImageTextRetrieval(nn.Module):
    """ITM: text encoder over the image, then a 2-way head on [CLS]. ITC: unimodal features projected
    to `image_text_hidden_size` and L2-normalized."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = BlipVisionModel(cfg.vision)
        self.text_encoder = BlipTextModel(cfg.text, add_pooling_layer=False)
        self.vision_proj = nn.Linear(cfg.vision.hidden_size, cfg.image_text_hidden_size)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.image_text_hidden_size)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)

    def itm_logits(self, pixel_values, input_ids, attention_mask=None):
        """-> [B, 2] (index 1 = match) for each image/text pair."""
        image_embeds, _ = self.vision_model(pixel_values)
        states, _, _ = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return self.itm_head(states[:, 0])

    def image_feat(self, pixel_values):
        """-> L2-normalized [B, image_text_hidden_size]."""
        image_embeds, _ = self.vision_model(pixel_values)
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, input_ids, attention_mask=None):
        """Text-only mode (no cross-attention) -> L2-normalized [B, image_text_hidden_size]."""
        states, _, _ = self.text_encoder(input_ids, attention_mask)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def forward(self, pixel_values, input_ids, attention_mask=None, use_itm_head: bool = True):
        """As transformers: ITM logits [B, 2], or the ITC similarity [B_img, B_txt]."""
        if use_itm_head:
            return self.itm_logits(pixel_values, input_ids, attention_mask)
        return self.image_feat(pixel_values) @ self.text_feat(input_ids, attention_mask).t()


class BlipModel(nn.Module):
    """The contrastive BLIP model: text model with pooler, and visual/text projections."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.config = cfg
        self.text_model = BlipTextModel(cfg.text, add_pooling_layer=True)
        self.vision_model = BlipVisionModel(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))

    def get_image_features(self, pixel_values):
        """-> [B, projection_dim], not normalized (as transformers)."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids, attention_mask=None):
        """-> [B, projection_dim], not normalized (as transformers)."""
        _, pooled, _ = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled)


MODEL_CLASSES = {
    "BlipForConditionalGeneration": BlipForConditionalGeneration,
    "BlipForQuestionAnswering": BlipForQuestionAnswering,
    "BlipForImageTextRetrieval": BlipForImageTextRetrieval,
    "BlipModel": BlipModel,
}
