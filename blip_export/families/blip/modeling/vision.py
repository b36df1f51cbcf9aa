"""BLIP's vision transformer (pre-LayerNorm ViT), with transformers' parameter names."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from ....modeling.common import MultiHeadAttention, PreNormViTLayer, ViTEncoder, use_ort_attention


class BlipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float [B, 3, H, W] -> float [B, N, D], N = (H/p)*(W/p) + 1."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N-1, D)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (B, N, D)
        return x + self.position_embedding[:, : x.shape[1]]


class BlipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        if use_ort_attention():
            q, k, v = self.qkv(x).split(D, dim=-1)  # one Split node (chunk exports three Slices and their shape arithmetic)
            return self.projection(MultiHeadAttention.apply(q, k, v, self.num_heads))
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, N, N)
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, N, Dh)
        return self.projection(ctx.permute(0, 2, 1, 3).reshape(B, N, D))


class BlipVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BlipVisionEmbeddings(cfg)
        self.encoder = ViTEncoder(PreNormViTLayer(BlipAttention(cfg), cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values float [B, 3, H, W] -> (image_embeds [B, N, D], pooled [B, D]).

        `pooled` applies post_layernorm a second time to the class token, as transformers does;
        BlipModel.get_image_features projects exactly that.
        """
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.post_layernorm(x)
        return x, self.post_layernorm(x[:, 0])
