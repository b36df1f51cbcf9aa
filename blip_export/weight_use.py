"""Free each weight of the reference model once the last graph that reads it is exported and verified.

A BLIP-2 checkpoint at real size is 4-12 B parameters; the exporter holds the reference model while it
exports each graph and checks it in ONNX Runtime, which holds that graph's weights again. Holding the
whole model to the end made the peak the model plus the largest graph twice (ViT-g + OPT-1.3b fp32:
past 12 GB while vision.onnx was checked). Here a first pass runs every graph's wrapper once on small
feeds and records which of the model's parameters and buffers each one passes to a torch function;
after a graph's last user is verified, those tensors are replaced by meta tensors (same shape and dtype,
no storage). Reading the shape or dtype of a freed weight still works, and computing with one fails
loudly (a meta tensor cannot meet a CPU tensor), so a wrong record cannot change an exported graph.
Nothing here knows a family: it sees only the model and the wrappers the family made.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchFunctionMode):
    """Records which of `ids` (the model's weight tensors) reach a torch function."""

    def __init__(self, ids: set[int]):
        super().__init__()
        self.ids, self.seen = ids, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.ids:
                self.seen.add(id(leaf))
        return func(*args, **kwargs)


def weight_tensors(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Every parameter and buffer of `model` by id (a tied weight once)."""
    out = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None:
                    out[id(t)] = t
    return out


def last_uses(model: torch.nn.Module, runs: dict[str, Callable[[], object]]) -> dict[str, set[int]]:
    """{graph: ids of the weights whose last reader, in `runs`' order, is that graph}. `runs`: each
    graph's wrapper called once on small feeds (zero-argument callables, in export order)."""
    ids = set(weight_tensors(model))
    last: dict[int, str] = {}
    for name, run in runs.items():
        with torch.no_grad(), _Recorder(ids) as rec:
            run()
        for i in rec.seen:
            last[i] = name  # a later graph that reads it too moves its release later
    return {name: {i for i, n in last.items() if n == name} for name in runs}


def release(model: torch.nn.Module, ids: set[int]) -> int:
    """Replace the tensors of `model` with these ids by meta tensors; returns the bytes freed."""
    freed: dict[int, int] = {}  # a weight tied in several modules counts once
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None or id(t) not in ids or t.device.type == "meta":
                    continue
                meta = torch.empty_like(t, device="meta")
                table[key] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta
                freed[id(t)] = t.numel() * t.element_size()
    gc.collect()
    from blip_runtime.session import release_free_memory

    release_free_memory()
    return sum(freed.values())
