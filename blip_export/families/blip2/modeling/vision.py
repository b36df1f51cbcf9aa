"""BLIP-2's vision transformer (EVA ViT-g/14: pre-LayerNorm, fused qkv with q and v biases only),
with transformers' parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ....modeling.common import PreNormViTLayer, ViTEncoder
from ..config import Blip2VisionConfig


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, N, D], N = (H/p)*(W/p) + 1, in the module's dtype."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N-1, D)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (B, N, D)
        return x + self.position_embedding[:, : x.shape[1]]


class Blip2Attention(nn.Module):
    """Self-attention over the image tokens. The checkpoint holds `q_bias` and `v_bias` beside an
    unbiased `qkv`; the key gets no bias (a key bias would add the same q.b to every score of a
    query, which softmax cancels)."""

    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        else:
            self.q_bias = self.v_bias = None
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # (3D,)
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, N, N)
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, N, Dh)
        return self.projection(ctx.transpose(1, 2).reshape(B, N, D))


class Blip2VisionModel(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Blip2VisionEmbeddings(cfg)
        self.encoder = ViTEncoder(PreNormViTLayer(Blip2Attention(cfg), cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values float [B, 3, H, W] -> (image_embeds [B, N, D], pooled [B, D]).

        `pooled` applies post_layernorm a second time to the class token, as transformers does.
        """
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.post_layernorm(x)
        return x, self.post_layernorm(x[:, 0])


def qkv_bias_sources(model: nn.Module) -> dict[str, list[tuple[str, slice]]]:
    """Where q_bias / v_bias come from in a checkpoint that stores the fused `qkv.bias` [3D] instead
    (what transformers 5 saves): target -> [(checkpoint key, slice of it)]. Its middle (key) third
    is dropped: see Blip2Attention."""
    sources = {}
    for name, module in model.named_modules():
        if isinstance(module, Blip2Attention) and module.q_bias is not None:
            D = module.q_bias.shape[0]
            sources[f"{name}.q_bias"] = [(f"{name}.qkv.bias", slice(0, D))]
            sources[f"{name}.v_bias"] = [(f"{name}.qkv.bias", slice(2 * D, 3 * D))]
    return sources
