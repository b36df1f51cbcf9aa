"""`load_model(path)`: the one public way to turn a checkpoint folder into a reference module.

The family comes from config.json's model_type: "blip" (BLIP) or "blip-2" (BLIP-2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import BlipConfig, read_config
from .errors import CheckpointError
from .weights import checkpoint_keys, empty_module, load_into

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Key prefixes that only one family's checkpoints have.
_PREFIXES = {
    "blip": ("text_decoder.", "text_encoder.", "text_model.", "vision_proj.", "text_proj.", "visual_projection."),
    "blip-2": ("qformer.", "query_tokens", "language_model.", "language_projection.", "vision_projection."),
}
_NAMES = {"blip": "BLIP (BLIP-1)", "blip-2": "BLIP-2"}


def _dtype(dtype, config) -> torch.dtype:
    """None -> fp32; "auto" -> config.json's dtype (or torch_dtype), fp32 if absent; a torch dtype
    or its name -> that dtype."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        named = config.raw.get("dtype") or config.raw.get("torch_dtype") or "float32"
        return _DTYPES.get(named, torch.float32)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, dtype)
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: expected None, 'auto', or one of {', '.join(_DTYPES)}")
    return dtype


def _family_mismatch(model: nn.Module, folder: Path, family: str) -> CheckpointError | None:
    """When config.json names one family and the weights are the other's: one error that says so,
    with the first unexpected and missing keys."""
    keys = checkpoint_keys(folder)
    other = next(f for f in _PREFIXES if f != family)
    if not any(k.startswith(_PREFIXES[other]) for k in keys) or any(k.startswith(_PREFIXES[family]) for k in keys):
        return None
    names, present = set(model.state_dict()), set(keys)
    unexpected = [k for k in keys if k not in names][:3]
    missing = [n for n in model.state_dict() if n not in present][:3]
    return CheckpointError(
        folder / "config.json",
        f"model_type {family!r} ({type(model).__name__}) but the weights are a {_NAMES[other]} checkpoint's: "
        f"unexpected keys {', '.join(unexpected)}; missing {', '.join(missing)}",
    )


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, BlipConfig]:
    """Load the reference model for the architecture named in `path/config.json`.

    Returns (model in eval mode on the CPU, its BlipConfig or Blip2Config). Parameters are fp32 by
    default; `dtype` (torch.float16 / bfloat16, or "auto" for the checkpoint's own) builds the model in
    that precision, except BLIP-2's Q-Former and query tokens, which stay fp32 as in transformers.
    Weights stream from the files (see blip_export.weights). Raises CheckpointError with a one-line
    message naming the file and key for any unusable folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a folder: expected a Hugging Face checkpoint folder with config.json")
    config = read_config(folder)
    want = _dtype(dtype, config)
    if config.family == "blip-2":
        from .families.blip2 import loading as blip2

        model = blip2.build(config, want)
        load = lambda: blip2.load_weights(model, folder)  # noqa: E731
    else:
        from .modeling.blip import MODEL_CLASSES

        model = empty_module(lambda: MODEL_CLASSES[config.architecture](config), want)
        tie = bool(config.raw.get("tie_word_embeddings", config.text.tie_word_embeddings))
        load = lambda: load_into(model, folder, tie_word_embeddings=tie)  # noqa: E731
    try:
        load()
    except CheckpointError as error:
        try:
            mismatch = _family_mismatch(model, folder, config.family)
        except CheckpointError:
            mismatch = None  # the files themselves are unreadable: the first error says so
        if mismatch is not None:
            raise mismatch from None
        raise error
    return model.eval(), config
