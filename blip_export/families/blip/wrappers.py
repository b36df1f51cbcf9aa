"""One thin nn.Module per exported graph. Inputs and outputs are positional in the order of the
graph's GraphSpec (blip_runtime.graphs); the exporter names them from that table."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .modeling.blip import BlipForImageTextRetrieval, BlipModel


class VisionGraph(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,N,Dv] (+ image_feat [B,E] normalized, for ITC)."""

    def __init__(self, model: nn.Module, with_feat: bool):
        super().__init__()
        self.model, self.with_feat = model, with_feat

    def forward(self, pixel_values):
        embeds, pooled = self.model.vision_model(pixel_values)
        if not self.with_feat:
            return embeds
        if isinstance(self.model, BlipModel):
            feat = self.model.visual_projection(pooled)
        else:
            feat = self.model.vision_proj(embeds[:, 0])
        return embeds, F.normalize(feat, dim=-1)


class TextEncoderGraph(nn.Module):
    """Multimodal text encoder of the VQA model: (input_ids, attention_mask, image_embeds) ->
    question_states [B,S,D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, image_embeds):
        states, _, _ = self.model.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return states


class ItmGraph(nn.Module):
    """Multimodal text encoder and ITM head of the retrieval model: (input_ids, attention_mask,
    image_embeds) -> itm_logits [B,2]."""

    def __init__(self, model: BlipForImageTextRetrieval):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, image_embeds):
        states, _, _ = self.model.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return self.model.itm_head(states[:, 0])


class TextFeaturesGraph(nn.Module):
    """Text-only encoder: (input_ids, attention_mask) -> text_feat [B,E], L2-normalized."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        if isinstance(self.model, BlipModel):
            return F.normalize(self.model.get_text_features(input_ids, attention_mask), dim=-1)
        return self.model.text_feat(input_ids, attention_mask)


class CrossKVGraph(nn.Module):
    """encoder_states [B,N,De] -> cross_key.i [B,H,Dh,N] (transposed: each decoding step then runs a
    plain matmul against it; [B,H,N,Dh] with keys_transposed=False, the layout of ONNX Runtime's
    MultiHeadAttention) and cross_value.i [B,H,N,Dh], for every decoder layer."""

    def __init__(self, model: nn.Module, keys_transposed: bool = True):
        super().__init__()
        self.decoder = model.text_decoder
        self.keys_transposed = keys_transposed

    def forward(self, encoder_states):
        kv = self.decoder.bert.cross_key_values(encoder_states)
        return tuple(t for k, v in kv for t in (k.transpose(-1, -2) if self.keys_transposed else k, v))


class DecoderStepGraph(nn.Module):
    """(input_ids [R,S], attention_mask [R,P+S], position_ids [R,S], encoder_attention_mask [R,N],
    beam_idx [R], past K/V [R,H,P,Dh] x 2L, cross keys [R,H,Dh,N] and values [R,H,N,Dh] x L)
    -> (logits of the last position [R,V], present K/V [R,H,P+S,Dh] x 2L)."""

    def __init__(self, model: nn.Module, keys_transposed: bool = True):
        super().__init__()
        self.decoder = model.text_decoder
        self.num_layers = model.config.text.num_hidden_layers
        self.keys_transposed = keys_transposed

    def forward(self, input_ids, attention_mask, position_ids, encoder_attention_mask, beam_idx, *kv):
        L = self.num_layers
        past = [(kv[2 * i].index_select(0, beam_idx), kv[2 * i + 1].index_select(0, beam_idx)) for i in range(L)]
        # Keys arrive transposed (unless keys_transposed=False); attention transposes them back, and
        # ONNX Runtime / TensorRT cancel the transpose pair, leaving q @ key_t.
        key = (lambda t: t.transpose(-1, -2)) if self.keys_transposed else (lambda t: t)  # noqa: E731
        cross = [(key(kv[2 * L + 2 * i]), kv[2 * L + 2 * i + 1]) for i in range(L)]
        logits, present = self.decoder(
            input_ids,
            attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past,
            cross_key_values=cross,
            position_ids=position_ids,
        )
        return (logits[:, -1], *[t for kv_pair in present for t in kv_pair])


WRAPPERS = {
    "vision": VisionGraph,
    "text_encoder": TextEncoderGraph,
    "itm": ItmGraph,
    "text_features": TextFeaturesGraph,
    "cross_kv": CrossKVGraph,
    "decoder_step": DecoderStepGraph,
}


def make_wrapper(model: nn.Module, spec, with_feat: bool = False) -> nn.Module:
    """The module whose inputs and outputs are `spec`'s (WRAPPERS); with_feat: the vision graph
    also returns the ITC feature."""
    from blip_runtime.families.blip.graphs import cross_keys_transposed

    if spec.name == "vision":
        return WRAPPERS[spec.name](model, with_feat)
    if spec.name in ("cross_kv", "decoder_step"):
        return WRAPPERS[spec.name](model, keys_transposed=cross_keys_transposed(spec))
    return WRAPPERS[spec.name](model)
