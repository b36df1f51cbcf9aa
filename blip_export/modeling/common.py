"""Pieces shared by the reference modules: activations and additive attention masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation(name: str):
    """The activation named in config.json, as transformers' ACT2FN defines it."""
    if name == "gelu":
        return F.gelu  # exact erf form
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    raise ValueError(f"hidden_act={name!r} is not supported")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, 1, Sq, Sk] (True = may attend) -> float [B, 1, Sq, Sk] of 0 / dtype-min.

    The most negative finite value (not -inf) is what transformers adds, so a fully masked row
    softmaxes to uniform instead of NaN, exactly as in the original.
    """
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def padding_mask(attention_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask int [B, Sk] (1 = real token) -> additive float [B, 1, 1, Sk] (broadcast over queries)."""
    allowed = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, Sk)
    return additive_mask(allowed, dtype)


def causal_padding_mask(attention_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask int [B, P+S] over past and new tokens -> additive float [B, 1, S, P+S].

    Query i (absolute position P+i) sees keys j <= P+i that are not padding.
    """
    total = attention_mask.shape[1]
    past = total - num_queries
    q_pos = torch.arange(num_queries, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    allowed = (k_pos <= q_pos)[None, None] & (attention_mask != 0)[:, None, None, :]  # (B, 1, S, P+S)
    return additive_mask(allowed, dtype)
