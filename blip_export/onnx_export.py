"""Export one graph to ONNX and check it against the reference module with ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from blip_runtime.families.blip.graphs import Dims, cross_keys_transposed
from blip_runtime.graphs import BATCH, ENC, PAST, TEXT, GraphSpec, random_feeds

from .wrappers import WRAPPERS

OPSET = 17  # TensorRT 10's parser and ONNX Runtime both cover it fully


def trace_sizes(spec: GraphSpec, dims: Dims) -> dict[str, int]:
    """Axis sizes for the tracing inputs: all distinct and > 1, so no axis is baked in as a constant."""
    return {BATCH: 2, TEXT: 3, PAST: 5, ENC: 7 if spec.name in ("cross_kv", "decoder_step") else dims.num_image_tokens}


def make_wrapper(model: torch.nn.Module, spec: GraphSpec, with_feat: bool = False) -> torch.nn.Module:
    """The module whose inputs and outputs are `spec`'s (wrappers.WRAPPERS)."""
    if spec.name == "vision":
        return WRAPPERS[spec.name](model, with_feat)
    if spec.name in ("cross_kv", "decoder_step"):
        return WRAPPERS[spec.name](model, keys_transposed=cross_keys_transposed(spec))
    return WRAPPERS[spec.name](model)


def export_graph(model: torch.nn.Module, spec: GraphSpec, dims: Dims, path: Path, with_feat: bool = False) -> None:
    """Trace the wrapper for `spec` and write `path` (weights inside the file, under 2 GB)."""
    wrapper = make_wrapper(model, spec, with_feat)
    wrapper.eval()
    feeds = random_feeds(spec, trace_sizes(spec, dims))
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints: shapes are covered by tests
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def reference_outputs(model: torch.nn.Module, spec: GraphSpec, feeds: dict[str, np.ndarray], with_feat: bool = False):
    wrapper = make_wrapper(model, spec, with_feat)
    with torch.no_grad():
        out = wrapper(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.numpy() for t, o in zip(spec.outputs, out)}


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs error, max relative error = max|a-b| / max|b| per tensor) over all outputs."""
    worst_abs = worst_rel = 0.0
    for name, r in ref.items():
        o = ours[name]
        if o.shape != r.shape:
            raise AssertionError(f"output {name}: shape {o.shape} != reference {r.shape}")
        if r.size == 0:
            continue
        err = float(np.abs(o.astype(np.float64) - r).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(r).max()), 1e-30))
    return worst_abs, worst_rel


def verify_sizes(spec: GraphSpec, dims: Dims) -> list[dict[str, int]]:
    """Dynamic sizes each graph is checked at: batch 1 and 3, several text and past lengths."""
    enc = lambda n: n if spec.name in ("cross_kv", "decoder_step") else dims.num_image_tokens  # noqa: E731
    return [
        {BATCH: 1, TEXT: 1, PAST: 0, ENC: enc(dims.num_image_tokens)},
        {BATCH: 3, TEXT: 5, PAST: 0, ENC: enc(4)},
        {BATCH: 3, TEXT: 1, PAST: 9, ENC: enc(6)},
        {BATCH: 2, TEXT: 11, PAST: 2, ENC: enc(dims.num_image_tokens)},
    ]
