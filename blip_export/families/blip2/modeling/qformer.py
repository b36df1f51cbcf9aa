"""BLIP-2's Q-Former: a BERT-style encoder over [learned queries; optional text] in which the query
positions alone cross-attend to the image (every `cross_attention_frequency`-th layer) and go through
a feed-forward of their own (`intermediate_query` / `output_query`). Parameter names are transformers'.

The Q-Former computes in fp32 whatever the checkpoint's dtype (transformers' `_keep_in_fp32_modules`):
its inputs are cast up on the way in; callers cast its output back.
Shapes: B batch, Q queries, S text tokens, T = Q + S, N image tokens, D hidden size (768).
"""

from __future__ import annotations

import torch
from torch import nn

from ....modeling.common import activation, padding_mask
from ..config import Blip2QFormerConfig


class Blip2QFormerMultiHeadAttention(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, cross: bool):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        kv_width = cfg.encoder_hidden_size if cross else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) attends over states (B, T_kv, D_kv) with additive mask (B, 1, 1, T_kv) or None
        -> context (B, T, D)."""
        q, k, v = self.heads(self.query(x)), self.heads(self.key(states)), self.heads(self.value(states))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, T, T_kv)
        if mask is not None:
            scores = scores + mask
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, T, Dh)
        return ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class Blip2QFormerSelfOutput(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, cross: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(cfg, cross)
        self.output = Blip2QFormerSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.attention(x, states, mask), x)


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Blip2QFormerLayer(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, index: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(cfg)
        self.crossattention = Blip2QFormerAttention(cfg, cross=True) if cfg.has_cross_attention(index) else None
        if cfg.use_qformer_text_input:  # the text feed-forward: only models that take text have it
            self.intermediate = Blip2QFormerIntermediate(cfg)
            self.output = Blip2QFormerSelfOutput(cfg, cfg.intermediate_size)
        else:
            self.intermediate = self.output = None
        self.intermediate_query = Blip2QFormerIntermediate(cfg)
        self.output_query = Blip2QFormerSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor | None,
                query_length: int) -> torch.Tensor:
        """x (B, T, D), the first `query_length` positions queries, the rest text; mask additive
        (B, 1, 1, T) or None; image (B, N, D_enc) or None -> (B, T, D)."""
        x = self.attention(x, x, mask)
        if query_length == 0:  # text only
            return self._text_feed_forward(x)
        queries = x[:, :query_length]  # (B, Q, D)
        if self.crossattention is not None:
            if image is None:
                raise ValueError("the Q-Former's queries need image embeddings for its cross-attention layers")
            # The image is never padded: transformers passes an all-ones mask, so no mask at all.
            queries = self.crossattention(queries, image, None)
        out = self.output_query(self.intermediate_query(queries), queries)
        if x.shape[1] > query_length:
            out = torch.cat([out, self._text_feed_forward(x[:, query_length:])], dim=1)
        return out

    def _text_feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intermediate is None:
            raise ValueError("this Q-Former has no text feed-forward (qformer_config.use_qformer_text_input is false)")
        return self.output(self.intermediate(x), x)


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Blip2QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class Blip2QFormerModel(nn.Module):
    """The Q-Former proper. The learned query tokens live on the task model (`query_tokens`), the
    text embeddings too (`embeddings`): this module takes their concatenation."""

    def __init__(self, cfg: Blip2QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(cfg)

    def forward(self, query_embeds: torch.Tensor, query_length: int, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """query_embeds float [B, T, D] (queries then text embeddings, any dtype); query_length Q
        (0: text only); attention_mask int64 [B, T] (1 = real token) or None; encoder_hidden_states
        float [B, N, D_enc] (the image embeddings) or None -> last hidden state float32 [B, T, D]."""
        dtype = self.layernorm.weight.dtype
        x = self.layernorm(query_embeds.to(dtype))
        mask = None if attention_mask is None else padding_mask(attention_mask, x.shape[1], dtype)  # (B, 1, 1, T)
        image = None if encoder_hidden_states is None else encoder_hidden_states.to(dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image, query_length)
        return x


class Blip2TextEmbeddings(nn.Module):
    """Word + position embeddings of the Q-Former's text input (no LayerNorm here: the Q-Former's
    `layernorm` normalizes queries and text together)."""

    def __init__(self, cfg: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, query_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids int64 [B, S]; query_embeds [B, Q, D] or None; position_ids int64 [B or 1, S] or
        None (0..S-1: text positions count from 0 after the queries) -> [B, Q+S, D]."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, S, D)
        if query_embeds is not None:
            x = torch.cat([query_embeds.to(x.dtype), x], dim=1)  # (B, Q+S, D)
        return x
