"""OPT, the decoder-only language model of blip2-opt-*: a causal decoder with learned positions.
Parameter names are transformers' `OPTForCausalLM`'s, so under BLIP-2's `language_model.` prefix they
are the checkpoint's keys.

K/V are plain tensors: each layer takes its past (k, v) and returns the present ones, so a prefill
(BLIP-2's query embeddings + prompt) and the decoding steps are the same traceable forward with a
dynamic past length P (0 for the prefill).
Shapes: B batch, S new tokens, P past tokens, H heads, Dh head size, D hidden_size,
E word_embed_proj_dim, V vocab_size.

Traps reproduced from transformers:
- positions index a table of max_position_embeddings + 2 rows at position_id + 2 (fairseq's offset);
- opt-350m is post-norm (do_layer_norm_before False: layer norms after each residual and no final one)
  and embeds at E=512 < D=1024, with project_in before the decoder and project_out before the head;
- queries are scaled by Dh**-0.5 before the scores (not the scores after), as transformers does;
- lm_head shares its weight with embed_tokens when tie_word_embeddings: see `tied_sources`.
"""

from __future__ import annotations

import torch
from torch import nn

from ....modeling.common import activation, causal_padding_mask
from ..lm_config import OptConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, H, T, Dh)

POSITION_OFFSET = 2  # OPT's position table starts 2 rows in (fairseq reserved rows for padding_idx 1)


class OptAttention(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scaling = self.head_dim**-0.5
        d = cfg.hidden_size
        self.k_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.q_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.enable_bias)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """x (B, S, D), mask additive (B, 1, S, P+S), past (k, v) (B, H, P, Dh) or None
        -> (output (B, S, D), present (k, v) (B, H, P+S, Dh))."""
        q = self.heads(self.q_proj(x) * self.scaling)  # (B, H, S, Dh)
        k = self.heads(self.k_proj(x))
        v = self.heads(self.v_proj(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+S, Dh)
            v = torch.cat([past[1], v], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) + mask  # (B, H, S, P+S)
        # softmax in fp32 as transformers does: fp16 graphs keep it accurate for free
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        ctx = torch.matmul(probs, v)  # (B, H, S, Dh)
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, S, D)
        return self.out_proj(ctx), (k, v)


class OptDecoderLayer(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OptAttention(cfg)
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """x (B, S, D) -> (B, S, D), present (k, v) (B, H, P+S, Dh)."""
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, present = self.self_attn(h, mask, past)
        x = x + h
        if not self.pre_norm:  # opt-350m: post-norm
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, present


class OptDecoder(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        if cfg.has_projections:
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
        else:
            self.project_out = self.project_in = None
        if cfg.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OptDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class _OptModel(nn.Module):
    """transformers' OPTModel: only a level in the key names (model.decoder.*)."""

    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.decoder = OptDecoder(cfg)


class OptForCausalLM(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.config = cfg
        self.model = _OptModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)

    def tied_sources(self) -> dict[str, str]:
        """{parameter: key it is a copy of}: what a loader fills a parameter from when the checkpoint
        lacks it. lm_head.weight IS embed_tokens.weight when tie_word_embeddings (files written by
        transformers may hold either key, or both); a file with both keys keeps both, as transformers does
        when they differ."""
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    @property
    def num_layers(self) -> int:
        """Decoder layers: the length of the past / present K/V lists."""
        return self.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 (B, S) -> token embeddings float (B, S, E), before project_in: the width at
        which BLIP-2 concatenates its projected query outputs with the prompt."""
        return self.model.decoder.embed_tokens(input_ids)

    def hidden(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """The decoder's last hidden state (B, S, E) before lm_head (transformers' OPTModel output, what
        BLIP-2's text features are), and the present K/V. Arguments as `forward`; last_only: the last
        position's state only (B, 1, E), taken before the final LayerNorm so that the norm still feeds
        lm_head directly (SmoothQuant folds into such pairs)."""
        dec = self.model.decoder
        x = dec.project_in(inputs_embeds) if dec.project_in is not None else inputs_embeds  # (B, S, D)
        x = x + dec.embed_positions(position_ids + POSITION_OFFSET)
        # query i (position P+i) sees real keys 0..P+i: additive (B, 1, S, P+S)
        mask = causal_padding_mask(attention_mask, inputs_embeds.shape[1], x.dtype)
        present = []
        for i, layer in enumerate(dec.layers):
            x, kv = layer(x, mask, None if past is None else past[i])
            present.append(kv)
        if last_only:
            x = x[:, -1:]
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)  # (B, S, E)
        return x, present

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits of S new tokens after P cached ones.

        inputs_embeds float (B, S, E); attention_mask int64 (B, P+S), 1 = real token, 0 = padding (left
        padding for batches of unequal prompts); position_ids int64 (B, S): each new token's position among
        its row's real tokens, as transformers derives it (cumsum(attention_mask) - 1 at the new tokens;
        padding gets any value, it is masked); past: per layer (k, v) float (B, H, P, Dh), or None for P=0.
        -> (logits float32 (B, S, V), present: per layer (k, v) (B, H, P+S, Dh)).
        """
        x, present = self.hidden(inputs_embeds, attention_mask, position_ids, past)
        return self.lm_head(x).float(), present
