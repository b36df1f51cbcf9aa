"""T5 / Flan-T5, the encoder-decoder language model of blip2-flan-t5-*. Parameter names are
transformers' `T5ForConditionalGeneration`'s, so under BLIP-2's `language_model.` prefix they are the
checkpoint's keys.

The request runs in three parts, each a traceable method: `encode` (query embeddings + prompt ->
encoder states), `cross_kv` (every decoder layer's cross-attention K/V, once per request) and `decode`
(new decoder tokens over past self-attention K/V, all plain tensors, dynamic past length P).
Shapes: B batch, S encoder tokens, T new decoder tokens, P past decoder tokens, H heads, Dh d_kv,
D d_model, F d_ff, V vocab_size.

Traps reproduced from transformers:
- no 1/sqrt(Dh) score scaling (T5 folds it into its initialization);
- one relative position bias table, in block 0 of each stack, shared by all its layers (bidirectional
  buckets in the encoder, causal buckets in the decoder; none in cross-attention);
- RMS layer norm without mean or bias, its variance taken in fp32;
- Flan-T5's gated feed-forward act(wi_0 x) * wi_1 x, with the activation named by dense_act_fn (see
  lm_config.T5Config: "gelu" in BLIP-2's configs), and wo computed in its own weight's dtype (transformers
  keeps wo in fp32: its activations overflow fp16);
- the decoder output is scaled by d_model**-0.5 before lm_head only when config.json does not say
  tie_word_embeddings false (T5 v1.0; Flan-T5 says false).
transformers also clamps fp16 activations to the finite range after each sub-layer; in fp32 that is the
identity, so it is left out (fp16 graphs keep the feed-forward in fp32 instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ....modeling.common import activation, additive_mask, padding_mask
from ..lm_config import T5Config

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, H, T, Dh)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight, the mean in fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """int64 (key position - query position) -> bucket int64 in [0, num_buckets): exact buckets for
    small distances, log-spaced ones up to max_distance, one bucket beyond (transformers' formula).
    Unidirectional (decoder): keys after the query fall in bucket 0 (they are masked anyway)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp below at max_exact: those entries take the exact branch, and the graph then never casts the
    # log(0) = -inf of distance 0 to an integer (undefined; transformers computes it and discards it).
    # The clamp is a float Clip after the cast: TensorRT's parser takes Clip on floating types only.
    large = max_exact + (
        torch.log(distance.float().clamp(min=max_exact) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H*Dh) -> (B, H, T, Dh)."""
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def position_bias(self, num_queries: int, num_keys: int, past: int | torch.Tensor = 0) -> torch.Tensor:
        """Bias of queries at positions past..past+num_queries-1 against keys 0..num_keys-1
        -> float (1, H, num_queries, num_keys). Sizes may be traced shape values."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(num_queries, dtype=torch.long, device=device)[:, None] + past  # (Tq, 1)
        k_pos = torch.arange(num_keys, dtype=torch.long, device=device)[None, :]  # (1, Tk)
        bucket = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)

    def key_value(self, states: torch.Tensor) -> KV:
        """states (B, T, D) -> (k, v), each (B, H, T, Dh)."""
        return self.heads(self.k(states)), self.heads(self.v(states))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, D), k/v (B, H, Tk, Dh), bias additive (B or 1, H or 1, Tq or 1, Tk): position bias plus
        mask -> output (B, Tq, D). Scores are not scaled (T5)."""
        q = self.heads(self.q(x))  # (B, H, Tq, Dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # (B, H, Tq, Tk)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        ctx = torch.matmul(probs, v)  # (B, H, Tq, Dh)
        return self.o(ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))  # (B, Tq, D)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, bidirectional)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """x (B, T, D), past (k, v) (B, H, P, Dh) or None -> (B, T, D), present (k, v) (B, H, P+T, Dh)."""
        attn = self.SelfAttention
        h = self.layer_norm(x)
        k, v = attn.key_value(h)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, Dh)
            v = torch.cat([past[1], v], dim=2)
        return x + attn.attend(h, k, v, bias), (k, v)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, has_relative_attention_bias=False, bidirectional=True)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, cross: KV, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), cross (k, v) (B, H, S, Dh), mask additive (B, 1, 1, S) -> (B, T, D)."""
        return x + self.EncDecAttention.attend(self.layer_norm(x), cross[0], cross[1], mask)


class T5DenseActDense(nn.Module):
    """T5 v1.0: wo(act(wi x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = activation(cfg.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi(x))  # (B, T, F)
        return self.wo(h.to(self.wo.weight.dtype))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1 / Flan-T5: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = activation(cfg.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)  # (B, T, F)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.is_gated_act else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """layer[0] self-attention, layer[1] cross-attention (decoder only), layer[-1] feed-forward."""

    def __init__(self, cfg: T5Config, first: bool, decoder: bool):
        super().__init__()
        layers = [T5LayerSelfAttention(cfg, has_relative_attention_bias=first, bidirectional=not decoder)]
        if decoder:
            layers.append(T5LayerCrossAttention(cfg))
        layers.append(T5LayerFF(cfg))
        self.layer = nn.ModuleList(layers)


class T5Stack(nn.Module):
    """Encoder or decoder blocks and the final norm. The token embedding is the model's `shared`:
    transformers' encoder.embed_tokens / decoder.embed_tokens are the same tensor under other names."""

    def __init__(self, cfg: T5Config, num_layers: int, decoder: bool):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, first=i == 0, decoder=decoder) for i in range(num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, num_queries: int, num_keys: int, past: int | torch.Tensor = 0) -> torch.Tensor:
        """(1, H, num_queries, num_keys), from the table in block 0 (see T5Attention.position_bias)."""
        return self.block[0].layer[0].SelfAttention.position_bias(num_queries, num_keys, past)


class T5ForConditionalGeneration(nn.Module):
    # Checkpoint keys that are copies of another key, not parameters of their own: files written by
    # transformers (BLIP-2's included) may hold them; a loader checks or skips them, never loads them.
    DUPLICATE_KEYS = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    # Checkpoint keys transformers ignores on load: old files carry an unused cross-attention bias table.
    IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = T5Stack(cfg, cfg.num_decoder_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def tied_sources(self) -> dict[str, str]:
        """{parameter: key it is a copy of}: what a loader fills a parameter from when the checkpoint
        lacks it. transformers ties T5's lm_head to `shared` unless the file holds a different
        lm_head.weight (Flan-T5 does): so lm_head.weight comes from the file when there, else from shared."""
        return {"lm_head.weight": "shared.weight"}

    @property
    def num_layers(self) -> int:
        """Decoder layers: the length of the past / present / cross K/V lists."""
        return self.config.num_decoder_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 (B, S) -> float (B, S, D)."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """inputs_embeds float (B, S, D), attention_mask int64 (B, S) (1 = real token)
        -> encoder states float (B, S, D)."""
        x = inputs_embeds
        s = x.shape[1]
        bias = self.encoder.position_bias(s, s) + padding_mask(attention_mask, s, x.dtype)  # (B, H, S, S)
        for block in self.encoder.block:
            x, _ = block.layer[0](x, bias, None)
            x = block.layer[1](x)
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, encoder_states: torch.Tensor) -> list[KV]:
        """encoder states (B, S, D) -> per decoder layer (k, v), each (B, H, S, Dh)."""
        return [block.layer[1].EncDecAttention.key_value(encoder_states) for block in self.decoder.block]

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        cross: list[KV],
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits of T new decoder tokens after P cached ones.

        decoder_input_ids int64 (B, T) (the first step starts from decoder_start_token_id);
        encoder_attention_mask int64 (B, S); cross: per layer (k, v) (B, H, S, Dh) from `cross_kv`;
        past: per layer (k, v) (B, H, P, Dh) or None for P=0
        -> (logits float32 (B, T, V), present: per layer (k, v) (B, H, P+T, Dh)).
        """
        x = self.shared(decoder_input_ids)  # (B, T, D)
        t = x.shape[1]
        p = 0 if past is None else past[0][0].shape[2]
        q_pos = torch.arange(t, device=x.device)[:, None] + p  # (T, 1)
        k_pos = torch.arange(t + p, device=x.device)[None, :]  # (1, P+T)
        causal = additive_mask((k_pos <= q_pos)[None, None], x.dtype)  # (1, 1, T, P+T)
        self_bias = self.decoder.position_bias(t, t + p, p) + causal  # (1, H, T, P+T)
        cross_mask = padding_mask(encoder_attention_mask, t, x.dtype)  # (B, 1, 1, S)
        present = []
        for i, block in enumerate(self.decoder.block):
            x, kv = block.layer[0](x, self_bias, None if past is None else past[i])
            present.append(kv)
            x = block.layer[1](x, cross[i], cross_mask)
            x = block.layer[2](x)
        x = self.decoder.final_layer_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model**-0.5)
        return self.lm_head(x).float(), present
