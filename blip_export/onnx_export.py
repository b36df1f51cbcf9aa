"""Export one graph to ONNX and check it against the reference module with ONNX Runtime.

Family-neutral: the wrapper (the nn.Module whose inputs and outputs are the spec's) and the axis
sizes to trace and verify at come from the family (blip_export.families)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from blip_runtime.graphs import GraphSpec

from .files import store_graph

OPSET = 17  # TensorRT 10's parser and ONNX Runtime both cover it fully


def export_graph(wrapper: torch.nn.Module, spec: GraphSpec, feeds: dict[str, np.ndarray], path: Path) -> None:
    """Trace `wrapper` (inputs and outputs positional in `spec`'s order) on `feeds` (valid inputs at
    axis sizes that are all distinct and > 1) and write `path`, its weights inside the file or, over
    files.EXTERNAL_DATA_THRESHOLD, in one `<graph>.onnx.data` beside it (files.store_graph).

    torch writes a graph over 2 GB with one file per weight beside it, named after the weights: it
    writes into a scratch folder of its own, so those names never meet the bundle's files."""
    wrapper.eval()
    path = Path(path)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _trace(wrapper, spec, args, scratch / path.name)
        declare_outputs(scratch / path.name, spec)
        store_graph(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trace(wrapper: torch.nn.Module, spec: GraphSpec, args: tuple, path: Path) -> None:
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


def declare_outputs(path: Path, spec: GraphSpec) -> None:
    """Write the table's output shapes into the file: the tracer names every output axis it cannot
    prove fixed (`LayerNormalizationimage_embeds_dim_1`) where the table says 257 or `prompt`, and a
    graph should describe itself as the table does. Weights stored beside the graph stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for out, t in zip(model.graph.output, spec.outputs):
        if out.name != t.name:
            raise ValueError(f"{spec.name}: ONNX output {out.name!r} where the table has {t.name!r}")
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise ValueError(f"{spec.name}: output {t.name!r} has rank {len(dims)}, the table says {t.shape}")
        for d, axis in zip(dims, t.shape):
            if isinstance(axis, int):
                d.ClearField("dim_param")
                d.dim_value = axis
            else:
                d.ClearField("dim_value")
                d.dim_param = axis
    onnx.save(model, str(path))


def reference_outputs(wrapper: torch.nn.Module, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`wrapper`'s outputs on `feeds`, by `spec`'s output names."""
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
