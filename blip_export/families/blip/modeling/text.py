"""BLIP's BERT-style text model: encoder (bidirectional) or decoder (causal), with optional
cross-attention to image or question states, and the LM head. Parameter names are transformers'.

K/V are plain tensors: self-attention takes the past (k, v) of each layer and returns the present
ones; cross-attention takes (k, v) computed once from the encoder states by `cross_key_values`.
Shapes: B batch, S new tokens, P past tokens, N encoder tokens, H heads, Dh head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ....modeling.common import CachedSelfAttention, CrossAttention, activation, causal_padding_mask, exporting, padding_mask, use_ort_attention

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, H, T, Dh)


def fused_linear(x: torch.Tensor, *linears: nn.Linear, first_scale: float = 1.0) -> torch.Tensor:
    """x @ [W1; W2; ...]^T + [b1; b2; ...]: several Linears of the same input, outputs concatenated on
    the last axis, the first Linear's weight and bias multiplied by `first_scale`. For exported
    graphs only (callers check exporting()): the exporter folds the concatenation into one
    initializer, so this is one MatMul (a wider matrix streams faster than several narrow ones, and
    is one node to quantize)."""
    weight = torch.cat([linears[0].weight * first_scale, *[lin.weight for lin in linears[1:]]], dim=0)
    bias = torch.cat([linears[0].bias * first_scale, *[lin.bias for lin in linears[1:]]], dim=0)
    return F.linear(x, weight, bias)


class BlipTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids int64 [B or 1, S] -> float [B, S, D]."""
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))


class BlipTextSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.scale = 1.0 / math.sqrt(self.head_dim)  # folded into the query weights of exported graphs

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        # reshape(B, -1, H, Dh), not unflatten(-1, ...): the exported shape computation is half the
        # nodes, which matters in a decoder step where each small op costs about as much as its work.
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, states: torch.Tensor) -> KV:
        """states (B, T, D_kv) -> (k, v), each (B, H, T, Dh): the two projections, as transformers
        computes them (exported graphs use query_key_value for self-attention and one matmul per
        projection for cross-attention, BlipTextModel.cross_key_values)."""
        return self.heads(self.key(states)), self.heads(self.value(states))

    def query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """Self-attention: x (B, S, D) -> (q, (k, v)), each (B, H, S, Dh), from one fused matmul."""
        q, k, v = fused_linear(x, self.query, self.key, self.value, first_scale=self.scale).chunk(3, dim=-1)
        return self.heads(q), (self.heads(k), self.heads(v))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               q: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D), k/v (B, H, T, Dh), mask additive (B, 1, S or 1, T) -> context (B, S, D).
        q (B, H, S, Dh): the queries when already computed (fused with k/v), else from x.

        Exported graphs fold the 1/sqrt(Dh) score scale into the query weights: the scores are then a
        plain MatMul, which ONNX Runtime runs at twice the speed of the scaled FusedMatMul it makes of
        MatMul + Div (measured on a decoder step's cross-attention). For Dh a power of 4 (64 in BLIP)
        the scale is a power of two and the folded graph computes exactly the same numbers."""
        if q is None:
            q = self.heads(fused_linear(x, self.query, first_scale=self.scale) if exporting() else self.query(x))
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, S, T)
        if not exporting():
            scores = scores / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, S, Dh)
        return ctx.transpose(1, 2).reshape(x.shape[0], -1, self.num_heads * self.head_dim)


class BlipTextSelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BlipTextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, cross: bool):
        super().__init__()
        self.self = BlipTextSelfAttention(cfg, cfg.encoder_hidden_size if cross else cfg.hidden_size)
        self.output = BlipTextSelfOutput(cfg, cfg.hidden_size)


class BlipTextIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BlipTextLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = BlipTextAttention(cfg, cross=False)
        if cfg.is_decoder:  # transformers builds cross-attention only then
            self.crossattention = BlipTextAttention(cfg, cross=True)
        self.intermediate = BlipTextIntermediate(cfg)
        self.output = BlipTextSelfOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        past: KV | None,
        cross: KV | None,
        cross_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        """x (B, S, D); past k/v (B, H, P, Dh) or None; cross k/v (B, H, N, Dh) or None.
        Returns (x (B, S, D), present (k, v) each (B, H, P+S, Dh))."""
        att = self.attention.self
        if past is not None and use_ort_attention():  # ONNX Runtime form of a decoder step (common.ort_attention)
            q, k, v = fused_linear(x, att.query, att.key, att.value, first_scale=att.scale).split(att.num_heads * att.head_dim, dim=-1)
            ctx, k, v = CachedSelfAttention.apply(q, k, v, self_mask, past[0], past[1], att.num_heads)
            return self._after_self_attention(self.attention.output(ctx, x), cross, cross_mask, ort_step=True), (k, v)
        # Exported: one fused Q/K/V matmul. Eager: the separate projections in transformers' order, so
        # training (train.py) stays bitwise what it was (autograd sums gradients in graph order).
        q, (k, v) = att.query_key_value(x) if exporting() else (None, att.key_value(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        x = self.attention.output(att.attend(x, k, v, self_mask, q), x)
        return self._after_self_attention(x, cross, cross_mask), (k, v)

    def _after_self_attention(self, x: torch.Tensor, cross: KV | None, cross_mask: torch.Tensor | None,
                              ort_step: bool = False) -> torch.Tensor:
        """Cross-attention (when given) and the feed-forward block. ort_step: the ONNX Runtime form of a
        decoder step, whose cross-attention is one MultiHeadAttention node (common.CrossAttention)."""
        if cross is not None:
            att = self.crossattention.self
            if ort_step and cross_mask is not None:
                q = fused_linear(x, att.query, first_scale=att.scale)
                ctx = CrossAttention.apply(q, cross[0], cross[1], cross_mask, att.num_heads)
            else:
                ctx = att.attend(x, cross[0], cross[1], cross_mask)
            x = self.crossattention.output(ctx, x)
        return self.output(self.intermediate(x), x)


class BlipTextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BlipTextLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BlipTextPooler(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BlipTextModel(nn.Module):
    """The text transformer. Encoder mode (is_decoder=False): bidirectional, as for ITM/ITC/VQA
    questions. Decoder mode: causal, with a KV cache, as for captions and answers."""

    def __init__(self, cfg: TextConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = BlipTextEmbeddings(cfg)
        self.encoder = BlipTextEncoder(cfg)
        self.pooler = BlipTextPooler(cfg) if add_pooling_layer else None

    def cross_key_values(self, encoder_hidden_states: torch.Tensor) -> list[KV]:
        """encoder states (B, N, D_enc) -> per layer (k, v), each (B, H, N, Dh). Computed once per request."""
        if not self.config.is_decoder:
            raise ValueError("this text model has no cross-attention layers (text_config.is_decoder is false)")
        attns = [layer.crossattention.self for layer in self.encoder.layer]
        # One matmul per projection, each writing its own output: no fused [B, N, 2*L*D] product to
        # slice apart (every graph with cross-attention: cross_kv, and the text encoders' attention
        # over the image). Measured on cross_kv's shapes alone (BLIP-base, N = 577, 24 projections of
        # 768, 2 threads, ONNX Runtime without an arena, no heap trim): int8 14.7 ms against 41.0 ms
        # for one fused matmul + 24 Slices, fp32 44.5 against 65.1 ms; the fused product alone was
        # 42 MB per row.
        return [(att.heads(att.key(encoder_hidden_states)), att.heads(att.value(encoder_hidden_states)))
                for att in attns]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        is_decoder: bool = False,
        past_key_values: list[KV] | None = None,
        cross_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[KV]]:
        """input_ids int64 [B, S]; attention_mask int64 [B, P+S] (past and new tokens; None = all ones);
        encoder_hidden_states float [B, N, D_enc] or precomputed cross_key_values; encoder_attention_mask
        int64 [B, N] or None; past_key_values per layer (k, v) [B, H, P, Dh] (decoder mode).

        Returns (hidden [B, S, D], pooled [B, D] or None, present per layer (k, v) [B, H, P+S, Dh]).
        """
        B, S = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + S, device=input_ids.device)[None]  # (1, S)
        x = self.embeddings(input_ids, position_ids)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + S, dtype=torch.long, device=input_ids.device)
        make_mask = causal_padding_mask if is_decoder else padding_mask
        self_mask = make_mask(attention_mask, S, x.dtype)
        if cross_key_values is None and encoder_hidden_states is not None:
            cross_key_values = self.cross_key_values(encoder_hidden_states)
        cross_mask = None
        if cross_key_values is not None and encoder_attention_mask is not None:
            cross_mask = padding_mask(encoder_attention_mask, S, x.dtype)
            if past_key_values is not None and use_ort_attention():
                # MultiHeadAttention takes the mask per query ([B, 1, S, N]); it does not broadcast
                # [B, 1, 1, N]. Expanded once here for every layer.
                cross_mask = cross_mask.expand(-1, -1, S, -1)
        present = []
        for i, layer in enumerate(self.encoder.layer):
            x, kv = layer(
                x,
                self_mask,
                past_key_values[i] if past_key_values else None,
                cross_key_values[i] if cross_key_values is not None else None,
                cross_mask,
            )
            present.append(kv)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled, present


class BlipTextPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BlipTextLMPredictionHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(cfg)
        # transformers keeps a separate `bias` parameter tied to decoder.bias; the loader fills
        # decoder.bias from either key, so only the Linear exists here.
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BlipTextOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = BlipTextLMPredictionHead(cfg)


class BlipTextLMHeadModel(nn.Module):
    """Decoder with LM head: logits over the vocabulary, KV cache in and out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.bert = BlipTextModel(cfg, add_pooling_layer=False)
        self.cls = BlipTextOnlyMLMHead(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        cross_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Same inputs as BlipTextModel in decoder mode. Returns (logits float [B, S, V], present K/V)."""
        x, _, present = self.bert(
            input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            is_decoder=True,
            past_key_values=past_key_values,
            cross_key_values=cross_key_values,
            position_ids=position_ids,
        )
        return self.cls.predictions(x), present
