"""One thin nn.Module per BLIP-2 graph. Inputs and outputs are positional in the order of the graph's
GraphSpec (blip_runtime.families.blip2.graphs); the exporter names them from that table.

Shapes as there: B requests, R decoder rows, N image tokens, Q queries, S prompt tokens, T new tokens,
P past tokens, H heads, Dh head size, D the LM width, V its vocabulary, E the ITC width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def running_count(x: torch.Tensor) -> torch.Tensor:
    """x int64 or bool [R, S] of 0/1 -> float32 [R, S], the sum of x[:, :j+1] at j (exact: whole numbers
    below 2^11 even in fp16). A MatMul against the upper triangle, not CumSum nor an integer Clip:
    TensorRT's CumSum and Clip take floating types only."""
    pos = torch.arange(x.shape[1], device=x.device)
    upto = (pos[:, None] <= pos[None, :]).float()  # (S, S): row i counts at every j >= i
    return x.float() @ upto


def place_prefix(embed, input_ids: torch.Tensor, prefix: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The LM's input embeddings: input_ids int64 [R, S], prefix [R, Q, D] -> [R, S, D], the i-th image
    token of a row taking the row's i-th query for i < Q (what transformers' masked_scatter does), every
    other id embedded as text (an image token past the queries too: Q is 0 in OPT's later steps, whose
    generated ids transformers embeds as text); a gather, so that it traces."""
    is_image = input_ids == image_token_id  # (R, S)
    count = running_count(is_image)  # (R, S): the image tokens up to and including each position
    placed = is_image & (count <= prefix.shape[1])
    # the legacy marker id is V, past the table: look placed positions up at row 0, they are replaced
    embeds = embed(torch.where(placed, torch.zeros_like(input_ids), input_ids))  # (R, S, D)
    # a zero row behind the queries, so that the gather has a row to read with no queries (Q = 0)
    rows = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], 1, prefix.shape[2])], dim=1)  # (R, Q + 1, D)
    index = torch.where(placed, count - 1, torch.zeros_like(count)).long()  # (R, S): the query each takes
    gathered = rows.gather(1, index[..., None].expand(-1, -1, rows.shape[2]))  # (R, S, D)
    return torch.where(placed[..., None], gathered.to(embeds.dtype), embeds)


def _flat(kv_pairs) -> tuple[torch.Tensor, ...]:
    return tuple(t for pair in kv_pairs for t in pair)


def _pairs(flat, beam_idx: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """past_key.0, past_value.0, ... -> [(k, v)] per layer, rows gathered by beam_idx when given."""
    pick = (lambda t: t) if beam_idx is None else (lambda t: t.index_select(0, beam_idx))  # noqa: E731
    return [(pick(flat[i]), pick(flat[i + 1])) for i in range(0, len(flat), 2)]


class VisionGraph(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, N, D_v] (+ pooled_output [B, D_v])."""

    def __init__(self, model: nn.Module, pooled: bool):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, pixel_values):
        embeds, pooled = self.model.vision_model(pixel_values)
        return (embeds, pooled) if self.pooled else embeds


class TextStatesGraph(nn.Module):
    """(input_ids, attention_mask int64 [B, S]) -> the LM's text states [B, S, D] (Blip2Model.get_text_features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        lm = self.model.language_model
        if self.model.config.is_encoder_decoder:
            return lm.encode(lm.embed(input_ids), attention_mask)
        # opt_position_ids' positions (cumsum(mask) * mask - 1), counted as TensorRT can
        positions = running_count(attention_mask).long() * attention_mask - 1  # (B, S)
        hidden, _ = lm.hidden(lm.embed(input_ids), attention_mask, positions)
        return hidden


class QFormerGraph(nn.Module):
    """image_embeds [B, N, D_v] -> query_output float32 [B, Q, D_q], then (as the table asks)
    image_prefix [B, Q, D] (language_projection) and image_feat [B, Q, E] (ITC, normalized)."""

    def __init__(self, model: nn.Module, prefix: bool, feat: bool):
        super().__init__()
        self.model, self.prefix, self.feat = model, prefix, feat

    def forward(self, image_embeds):
        query = self.model.query_output(image_embeds)  # (B, Q, D_q) fp32
        out = [query]
        if self.prefix:
            out.append(self.model.language_projection(query.to(self.model.language_projection.weight.dtype)))
        if self.feat:
            feat = self.model.vision_projection(query.to(self.model.vision_projection.weight.dtype))
            out.append(F.normalize(feat, dim=-1))
        return tuple(out) if len(out) > 1 else query


class ItmGraph(nn.Module):
    """(image_embeds [B, N, D_v], input_ids, attention_mask int64 [B, S]) -> itm_logits [B, 2]:
    Blip2ForImageTextRetrieval's ITM from the image embeddings instead of the pixels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_embeds, input_ids, attention_mask):
        m = self.model
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D_q)
        Q = queries.shape[1]
        ones = torch.ones(input_ids.shape[0], Q, dtype=attention_mask.dtype, device=input_ids.device)
        mask = torch.cat([ones, attention_mask], dim=1)  # (B, Q+S): queries are always real
        states = m.qformer(m.embeddings(input_ids, queries), Q, mask, image_embeds)  # (B, Q+S, D_q)
        return m.itm_head(states[:, :Q].to(m.itm_head.weight.dtype)).mean(dim=1)


class TextFeaturesGraph(nn.Module):
    """(input_ids, attention_mask int64 [B, S]) -> text_feat [B, E], L2-normalized."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.text_feat(input_ids, attention_mask)


class OptStepGraph(nn.Module):
    """(input_ids [R, T], image_prefix [R, Q or 0, D], attention_mask [R, P+T], position_ids [R, T],
    beam_idx [R], past K/V [R, H, P, Dh] x 2L) -> (logits of the last position [R, V], present K/V
    [R, H, P+T, Dh] x 2L): the prompt's call (P = 0, the queries placed) and every later step."""

    def __init__(self, model: nn.Module, image_token_id: int):
        super().__init__()
        self.lm, self.image_token_id = model.language_model, image_token_id

    def forward(self, input_ids, image_prefix, attention_mask, position_ids, beam_idx, *past):
        embeds = place_prefix(self.lm.embed, input_ids, image_prefix, self.image_token_id)
        # the head over the last position only: the prompt's call skips (S - 1) x D x V multiply-adds
        hidden, present = self.lm.hidden(embeds, attention_mask, position_ids, _pairs(past, beam_idx), last_only=True)
        return (self.lm.lm_head(hidden).float()[:, -1], *_flat(present))


class T5EncoderGraph(nn.Module):
    """(input_ids [B, S], image_prefix [B, Q, D], attention_mask [B, S]) -> encoder_states [B, S, D]."""

    def __init__(self, model: nn.Module, image_token_id: int):
        super().__init__()
        self.lm, self.image_token_id = model.language_model, image_token_id

    def forward(self, input_ids, image_prefix, attention_mask):
        embeds = place_prefix(self.lm.embed, input_ids, image_prefix, self.image_token_id)
        return self.lm.encode(embeds, attention_mask)


class T5CrossKVGraph(nn.Module):
    """encoder_states [B, S, D] -> cross_key.i [B, H, Dh, S] (transposed) and cross_value.i
    [B, H, S, Dh], for every decoder layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.language_model

    def forward(self, encoder_states):
        return tuple(t for k, v in self.lm.cross_kv(encoder_states) for t in (k.transpose(-1, -2), v))


class T5StepGraph(nn.Module):
    """(decoder_input_ids [R, T], encoder_attention_mask [R, S], beam_idx [R], past K/V [R, H, P, Dh]
    x 2L, cross keys [R, H, Dh, S] and values [R, H, S, Dh] x L)
    -> (logits of the last position [R, V], present K/V [R, H, P+T, Dh] x 2L)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.language_model
        self.num_layers = self.lm.num_layers

    def forward(self, decoder_input_ids, encoder_attention_mask, beam_idx, *kv):
        L = self.num_layers
        past = _pairs(kv[: 2 * L], beam_idx)
        # keys arrive transposed; attention transposes them back and ORT / TensorRT cancel the pair
        cross = [(k.transpose(-1, -2), v) for k, v in _pairs(kv[2 * L:])]
        logits, present = self.lm.decode(decoder_input_ids, encoder_attention_mask, cross, past)
        return (logits[:, -1], *_flat(present))


def make_wrapper(model: nn.Module, spec, dims) -> nn.Module:
    """The module whose inputs and outputs are `spec`'s (a GraphSpec of graphs.graphs(dims, ...))."""
    outputs = {t.name for t in spec.outputs}
    build = {
        "vision": lambda: VisionGraph(model, "pooled_output" in outputs),
        "text_states": lambda: TextStatesGraph(model),
        "qformer": lambda: QFormerGraph(model, "image_prefix" in outputs, "image_feat" in outputs),
        "itm": lambda: ItmGraph(model),
        "text_features": lambda: TextFeaturesGraph(model),
        "opt_step": lambda: OptStepGraph(model, dims.image_token_id),
        "t5_encoder": lambda: T5EncoderGraph(model, dims.image_token_id),
        "t5_cross_kv": lambda: T5CrossKVGraph(model),
        "t5_step": lambda: T5StepGraph(model),
    }
    if spec.name not in build:
        raise ValueError(f"graph {spec.name!r}: no BLIP-2 wrapper, expected one of {sorted(build)}")
    return build[spec.name]().eval()
