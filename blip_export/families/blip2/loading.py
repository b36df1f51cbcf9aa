"""Loading a BLIP-2 checkpoint folder into its reference module: the key map beyond one key per
parameter (the language model's tied and duplicate keys, the two forms of the vision qkv bias) and
the dtype rule (the Q-Former and the query tokens stay fp32)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...weights import Source, empty_module, load_into, tie_sources
from .config import Blip2Config
from .modeling.models import KEEP_FP32, MODEL_CLASSES
from .modeling.vision import qkv_bias_sources

def key_map(model: nn.Module) -> tuple[dict[str, list[Source]], tuple[str, ...]]:
    """(sources: parameter -> other checkpoint keys it may come from, ignored checkpoint keys)."""
    sources: dict[str, list[Source]] = {}
    ignored: list[str] = []
    for name, sub in model.named_children():
        for target, alts in tie_sources({f"{name}.{t}": f"{name}.{k}" for t, k in getattr(sub, "tied_sources", dict)().items()}).items():
            sources.setdefault(target, []).extend(alts)
        for dup, canonical in getattr(sub, "DUPLICATE_KEYS", {}).items():
            # a file may keep only the duplicate's name for the shared tensor
            sources.setdefault(f"{name}.{canonical}", []).append(Source(f"{name}.{dup}"))
        ignored += [f"{name}.{k}" for k in getattr(sub, "IGNORED_KEYS", ())]
    for target, alts in qkv_bias_sources(model).items():
        D = alts[0][1].stop - alts[0][1].start
        sources.setdefault(target, []).extend(Source(key, rows, (3 * D,)) for key, rows in alts)
    return sources, tuple(ignored)


def build(config: Blip2Config, dtype: torch.dtype) -> nn.Module:
    """The reference model of `config.architecture`, parameters uninitialized: in `dtype` except the
    Q-Former and query_tokens (fp32)."""
    cls = MODEL_CLASSES[config.architecture]
    return empty_module(lambda: cls(config), dtype, keep_fp32=KEEP_FP32)


def load_weights(model: nn.Module, folder: Path) -> None:
    sources, ignored = key_map(model)
    load_into(model, folder, sources=sources, ignored=ignored, share_ties=True)
