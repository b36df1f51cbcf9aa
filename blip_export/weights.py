"""Reading checkpoint tensors and copying them into a reference module through an explicit key map.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
`pytorch_model.bin` (also sharded) through `torch.load(weights_only=True)` only, so a checkpoint
can never run code, and as a last resort `tf_model.h5` (folders saved by TensorFlow). Every failure
is a CheckpointError naming the file and the key.

Weights stream: the key map is planned and checked from the files' headers alone (names, shapes,
dtypes), then one shard at a time, one tensor at a time is read straight into the module's
parameter. Safetensors data is read with plain file reads rather than through a memory map, because
mapped pages count in the process's resident memory for as long as the file is open: a 7.7 GB
fp16 checkpoint then peaks near the size of its parameters, not twice that.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

# Checkpoint keys that exist in some public files but hold nothing the model computes with.
IGNORED_KEYS = (
    re.compile(r"(^|\.)embeddings\.position_ids$"),  # buffers saved by older transformers
)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Source:
    """Where a parameter can come from besides its own key: another checkpoint key (a tied copy)
    or `rows` of one (a fused tensor, which then has `shape`)."""

    key: str
    rows: slice | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch cannot hold (reported if the key is used)
    dtype_name: str


class _SafetensorsFile:
    """The header of a safetensors file; tensors are read from it on demand with file reads."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt"):  # validates the header against the file
                pass
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (SafetensorError, OSError, ValueError, RuntimeError, struct.error) as e:
            raise CheckpointError(path, f"cannot read safetensors file ({str(e).splitlines()[0]})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.offsets = {k: v["data_offsets"] for k, v in header.items()}
        self.entries = {k: _Entry(tuple(v["shape"]), _SAFETENSORS_DTYPES.get(v["dtype"]), v["dtype"])
                        for k, v in header.items()}

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, the entry's dtype and shape) with the tensor's bytes."""
        begin, end = self.offsets[key]
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(buffer) if buffer is not None else 0
        if got != end - begin:
            raise CheckpointError(self.path, f"key {key!r}: file ends before the tensor's data")

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(key, out)
        return out

    def close(self) -> None:
        pass


class _DictFile:
    """A file read whole into a dict of tensors (pytorch_model.bin memory-mapped where torch can,
    tf_model.h5 through blip_export.tf_weights)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors
        self.entries = {k: _Entry(tuple(t.shape), t.dtype, str(t.dtype)) for k, t in tensors.items()}

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self.tensors[key])

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors = {}


def _read_bin(path: Path) -> _DictFile:
    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)  # zip-format files (torch >= 1.6) map without a copy
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            state = load(mmap=False)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split(". ")[0]
        raise CheckpointError(
            path, f"cannot read PyTorch file with weights_only=True ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "expected a flat dict of tensor names to tensors")
    return _DictFile(path, state)


def _read_h5(path: Path) -> _DictFile:
    try:
        from .tf_weights import read_tf_h5
    except ImportError as e:
        raise CheckpointError(path, f"TensorFlow weights cannot be read here ({e})") from None
    try:
        tensors = read_tf_h5(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(path, f"cannot read TensorFlow weights ({type(e).__name__}: {e})") from None
    return _DictFile(path, tensors)


def _open(path: Path):
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix == ".h5":
        return _read_h5(path)
    return _read_bin(path)


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
    """The weight files of a checkpoint folder, safetensors preferred, TensorFlow's last."""
    candidates = (
        ("model.safetensors.index.json", True),
        ("model.safetensors", False),
        ("pytorch_model.bin.index.json", True),
        ("pytorch_model.bin", False),
        ("tf_model.h5", False),
    )
    for name, is_index in candidates:
        path = folder / name
        if path.is_file():
            return _read_index(path) if is_index else [path]
    raise CheckpointError(
        folder, "no weights found: expected model.safetensors, a sharded model.safetensors.index.json, "
                "pytorch_model.bin or tf_model.h5"
    )


def _open_all(folder: Path) -> tuple[list, dict[str, object]]:
    """(open files, key -> the file that holds it), from the headers only."""
    files, where = [], {}
    for path in checkpoint_files(folder):
        f = _open(path)
        files.append(f)
        for key in f.entries:
            if key in where:
                raise CheckpointError(path, f"key {key!r} also appears in {where[key].path.name}")
            where[key] = f
    return files, where


def read_state_dict(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of the checkpoint: key -> (tensor, file it came from). Reads everything into
    memory: for inspection of small checkpoints; load_into streams instead."""
    files, where = _open_all(Path(folder))
    return {key: (f.read(key), f.path) for key, f in where.items()}


def tied_keys(model: nn.Module, tie_word_embeddings: bool) -> dict[str, str]:
    """BLIP's ties: target parameter -> checkpoint key it is tied to (as transformers ties them on load).

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


def tie_sources(ties: dict[str, str]) -> dict[str, list[Source]]:
    """Ties {parameter: key it is a copy of} as sources, both ways: as transformers ties on load, a
    file may hold either key of a tied pair (and keeps both when they differ)."""
    sources: dict[str, list[Source]] = {}
    for target, key in ties.items():
        sources.setdefault(target, []).append(Source(key))
        sources.setdefault(key, []).append(Source(target))
    return sources


def _candidates(name: str, sources: dict[str, list[Source]]) -> list[Source]:
    """The parameter's own key, then its sources, then theirs (a copy of a copy is a copy), in order."""
    out, seen, i = [Source(name)], {name}, 0
    while i < len(out):
        if out[i].rows is None:  # a slice of a fused tensor has no copies of its own here
            for src in sources.get(out[i].key, []):
                if src.key not in seen:
                    seen.add(src.key)
                    out.append(src)
        i += 1
    return out


def _shown(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def load_into(model: nn.Module, folder: Path, tie_word_embeddings: bool = True,
              sources: dict[str, list[Source]] | None = None, ignored: tuple = (),
              share_ties: bool = False) -> None:
    """Fill every parameter of `model` from the checkpoint in `folder`, or raise CheckpointError.

    Each parameter comes from its own key when the file has it, else from the first of its
    `sources` (default: BLIP's ties, by `tie_word_embeddings`) that the file has. Every checkpoint
    key must be used (a source of a filled parameter counts: it is a copy), or match IGNORED_KEYS or
    `ignored` (exact keys or compiled patterns); every parameter must be filled with a tensor of its
    exact shape, converted to the parameter's dtype. share_ties: a parameter filled from another
    parameter's own key becomes that parameter (one tensor, as transformers ties them), instead of a
    copy: for OPT-2.7b's lm_head, 0.26 GB in fp16.
    """
    folder = Path(folder)
    if sources is None:
        sources = tie_sources(tied_keys(model, tie_word_embeddings))
    files, where = _open_all(folder)
    targets = model.state_dict()
    plan: dict[str, Source] = {}  # target parameter -> where it comes from
    used: set[str] = set()
    for name in targets:
        candidates = _candidates(name, sources)
        present = [s for s in candidates if s.key in where]
        if present:
            plan[name] = present[0]
            used.update(s.key for s in present)  # the others are copies of the one loaded
    missing = [n for n in targets if n not in plan]
    if missing:
        shown = _shown([f"{n} {tuple(targets[n].shape)}" for n in missing])
        raise CheckpointError(folder, f"{len(missing)} weight(s) missing from the checkpoint: {shown}")
    patterns = IGNORED_KEYS + tuple(p for p in ignored if not isinstance(p, str))
    exact = {p for p in ignored if isinstance(p, str)}
    unused = [k for k in where if k not in used and k not in exact and not any(p.search(k) for p in patterns)]
    if unused:
        raise CheckpointError(
            where[unused[0]].path,
            f"{len(unused)} key(s) the {type(model).__name__} architecture does not have: {_shown(unused)}",
        )
    for name, src in plan.items():
        f = where[src.key]
        entry = f.entries[src.key]
        want = tuple(targets[name].shape) if src.rows is None else src.shape
        if entry.shape != want:
            raise CheckpointError(
                f.path, f"key {src.key!r} has shape {entry.shape}, expected {want} from config.json"
            )
        if entry.dtype is None or not entry.dtype.is_floating_point:
            raise CheckpointError(f.path, f"key {src.key!r} has dtype {entry.dtype_name}, expected a floating-point tensor")
    if share_ties:
        _share(model, plan, targets)
    _copy(files, where, plan, targets)


def _share(model: nn.Module, plan: dict[str, Source], targets: dict[str, torch.Tensor]) -> None:
    """Re-point each parameter planned from another parameter's own key at that parameter and drop
    it from the plan. Its own storage, never written, is freed without having cost memory."""
    for name, src in list(plan.items()):
        owner = plan.get(src.key)
        if src.rows is not None or src.key == name or owner is None or owner.key != src.key:
            continue
        if targets[name].shape != targets[src.key].shape or targets[name].dtype != targets[src.key].dtype:
            continue
        prefix, _, leaf = name.rpartition(".")
        parent = model.get_submodule(prefix)
        if not isinstance(parent._parameters.get(leaf), nn.Parameter):
            continue
        parent._parameters[leaf] = model.get_parameter(src.key)
        del plan[name]


@torch.no_grad()
def _copy(files: list, where: dict, plan: dict[str, Source], targets: dict[str, torch.Tensor]) -> None:
    """One file at a time, one tensor at a time: read each used key once and copy it to every
    parameter planned from it."""
    by_key: dict[str, list[tuple[str, Source]]] = {}
    for name, src in plan.items():
        by_key.setdefault(src.key, []).append((name, src))
    for f in files:
        for key in [k for k in f.entries if k in by_key]:
            uses = by_key[key]
            name, src = uses[0]
            target = targets[name]
            direct = (src.rows is None and target.dtype == f.entries[key].dtype and target.is_contiguous()
                      and isinstance(f, _SafetensorsFile))
            if direct:  # straight from the file into the parameter: no temporary
                f.read_into(key, target)
                tensor = target
            else:
                tensor = f.read(key)
            for name, src in uses:
                if targets[name] is tensor:
                    continue
                part = tensor if src.rows is None else tensor[src.rows]
                targets[name].copy_(part.to(targets[name].dtype))
            del tensor
        f.close()


def checkpoint_keys(folder: Path) -> list[str]:
    """Every key of the checkpoint, from the files' headers (no tensor data is read)."""
    _, where = _open_all(Path(folder))
    return list(where)


def empty_module(build, dtype: torch.dtype = torch.float32, keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """`build()` on the meta device, then uninitialized CPU storage for every parameter: dtype, or
    fp32 for the submodules and parameters named in keep_fp32 (top-level names, e.g. "qformer").

    load_into fills every parameter (or fails), so initializing them first would only cost time and,
    for a half-precision build, a full fp32 copy on the way. Untouched pages of torch.empty cost no
    memory until the checkpoint's data is written into them. Parameters shared between modules stay
    shared. Buffers would be left on the meta device, so reference modules hold none.
    """
    with torch.device("meta"):
        model = build()
    made: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                full = f"{prefix}.{name}" if prefix else name
                want = torch.float32 if full.split(".")[0] in keep_fp32 else dtype
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=want), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                raise ValueError(f"{type(module).__name__}.{name}: reference modules hold no buffers")
    return model
