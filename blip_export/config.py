"""Reading a checkpoint's `config.json`: the family from its model_type (blip_export.families), and
the field-by-field reader every family's config dataclasses use (`_subconfig`).

Field names of each family's dataclasses follow the checkpoint's `config.json` so a reader can hold
the two side by side; defaults are transformers', which is what a config.json that omits a field means.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .errors import CheckpointError


_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu")


def _subconfig(cls, data: dict, where: str):
    """Build `cls` from the keys of `data` it knows; checkpoint keys it does not know are ignored
    (dropout rates, initializer ranges, transformers bookkeeping). Wrong types are rejected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CheckpointError(where, f"expected a JSON object, got {type(data).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value = data[f.name]
        want = type(f.default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if f.name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(where, f"{f.name}={value!r}: only square sizes are supported")
            value = value[0]
        if f.name == "eos_token_id" and isinstance(value, list):
            value = value[0]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise CheckpointError(
                where, f"{f.name}={value!r}: expected {want.__name__}, got {type(value).__name__}"
            )
        kwargs[f.name] = value
    config = cls(**kwargs)
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(
            where,
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}",
        )
    if config.hidden_act not in _ACTIVATIONS:
        raise CheckpointError(where, f"hidden_act={config.hidden_act!r}: expected one of {_ACTIVATIONS}")
    return config


def read_config(folder: str | Path):
    """Read and parse `folder/config.json` with its family's reader (by model_type: a BlipConfig for
    "blip", a Blip2Config for "blip-2"; see blip_export.families)."""
    from .families import family_for_config

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(path, "missing: a Hugging Face checkpoint folder needs a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object at the top level")
    return family_for_config(data, str(path)).read_config(data, str(path))
