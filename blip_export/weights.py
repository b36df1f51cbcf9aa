"""Reading checkpoint tensors and copying them into a reference module through an explicit key map.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), and
`pytorch_model.bin` (also sharded) through `torch.load(weights_only=True)` only, so a checkpoint
can never run code. Every failure is a CheckpointError naming the file and the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

# Checkpoint keys that exist in some public files but hold nothing the model computes with.
IGNORED_KEYS = (
    re.compile(r"(^|\.)embeddings\.position_ids$"),  # buffers saved by older transformers
)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"cannot read safetensors file ({str(e).splitlines()[0]})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split(". ")[0]
        raise CheckpointError(
            path, f"cannot read PyTorch file with weights_only=True ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "expected a flat dict of tensor names to tensors")
    return state


def _read_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(index, f"not a valid shard index with a 'weight_map' ({e})") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(index, f"shard files listed but missing: {', '.join(missing)}")
    return [index.parent / f for f in files]


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred."""
    candidates = (
        ("model.safetensors.index.json", True),
        ("model.safetensors", False),
        ("pytorch_model.bin.index.json", True),
        ("pytorch_model.bin", False),
    )
    for name, is_index in candidates:
        path = folder / name
        if path.is_file():
            return _read_index(path) if is_index else [path]
    raise CheckpointError(
        folder, "no weights found: expected model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin"
    )


def read_state_dict(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of the checkpoint: key -> (tensor, file it came from)."""
    state: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in checkpoint_files(folder):
        tensors = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
        for key, tensor in tensors.items():
            if key in state:
                raise CheckpointError(path, f"key {key!r} also appears in {state[key][1].name}")
            state[key] = (tensor, path)
    return state


def tied_keys(model: nn.Module, tie_word_embeddings: bool) -> dict[str, str]:
    """Target parameter -> checkpoint key it is tied to (as transformers ties them on load).

    The LM head's decoder.bias is the separate `cls.predictions.bias` parameter in transformers;
    its decoder.weight is the word embedding matrix when word embeddings are tied.
    """
    ties = {}
    for name in model.state_dict():
        if name.endswith("cls.predictions.decoder.bias"):
            ties[name] = name[: -len("decoder.bias")] + "bias"
        elif name.endswith("cls.predictions.decoder.weight") and tie_word_embeddings:
            ties[name] = name[: -len("cls.predictions.decoder.weight")] + "bert.embeddings.word_embeddings.weight"
    return ties


def load_into(model: nn.Module, folder: Path, tie_word_embeddings: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint in `folder`, or raise CheckpointError.

    Every checkpoint key must be used, tied, or match IGNORED_KEYS; every parameter must be filled
    with a tensor of its exact shape.
    """
    folder = Path(folder)
    state = read_state_dict(folder)
    targets = model.state_dict()
    ties = tied_keys(model, tie_word_embeddings)
    plan: dict[str, str] = {}  # target parameter -> checkpoint key
    for name in targets:
        if name in ties and ties[name] in state:
            plan[name] = ties[name]
        elif name in state:
            plan[name] = name
    missing = [n for n in targets if n not in plan]
    if missing:
        shown = ", ".join(f"{n} {tuple(targets[n].shape)}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(folder, f"{len(missing)} weight(s) missing from the checkpoint: {shown}{more}")
    used = set(plan.values()) | {k for k in ties.keys() if k in state}  # tied copies are superseded
    unused = [k for k in state if k not in used and not any(p.search(k) for p in IGNORED_KEYS)]
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise CheckpointError(
            state[unused[0]][1],
            f"{len(unused)} key(s) the {type(model).__name__} architecture does not have: {shown}",
        )
    with torch.no_grad():
        for name, key in plan.items():
            tensor, path = state[key]
            target = targets[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    path, f"key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)} from config.json"
                )
            if not tensor.is_floating_point():
                raise CheckpointError(path, f"key {key!r} has dtype {tensor.dtype}, expected a floating-point tensor")
            target.copy_(tensor.to(target.dtype))
