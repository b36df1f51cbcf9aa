"""`load_model(path)`: the one public way to turn a checkpoint folder into a reference module.

The family comes from config.json's model_type (blip_export.families: "blip", "blip-2", ...); the
family builds the module and streams its weights in."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import read_config
from .errors import CheckpointError
from .families import FAMILIES, family
from .weights import checkpoint_keys

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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


def _family_mismatch(model: nn.Module, folder: Path, name: str) -> CheckpointError | None:
    """When config.json names one family and the weights are another's (by the weight names only
    that family has, ExportFamily.key_prefixes): one error that says so, with the first unexpected
    and missing keys."""
    keys = checkpoint_keys(folder)
    own = family(name).key_prefixes
    if any(k.startswith(own) for k in keys):
        return None
    others = [family(f) for f in FAMILIES if f != name]
    other = next((f for f in others if f.key_prefixes and any(k.startswith(f.key_prefixes) for k in keys)), None)
    if other is None:
        return None
    names, present = set(model.state_dict()), set(keys)
    unexpected = [k for k in keys if k not in names][:3]
    missing = [n for n in model.state_dict() if n not in present][:3]
    return CheckpointError(
        folder / "config.json",
        f"model_type {name!r} ({type(model).__name__}) but the weights are a {other.display_name} checkpoint's: "
        f"unexpected keys {', '.join(unexpected)}; missing {', '.join(missing)}",
    )


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, object]:
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
    fam = family(config.family)
    model = fam.build(config, want)
    try:
        fam.load_weights(model, folder, config)
    except CheckpointError as error:
        try:
            mismatch = _family_mismatch(model, folder, config.family)
        except CheckpointError:
            mismatch = None  # the files themselves are unreadable: the first error says so
        if mismatch is not None:
            raise mismatch from None
        raise error
    return model.eval(), config
