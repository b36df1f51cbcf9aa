"""Checks and measurements shared by the precision conversions: every tensor typed, and a converted
graph's error against its fp32 source on the same feeds (ONNX Runtime on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def set_metadata(model, meta: dict) -> None:
    props = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        entry = props.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def check_typed(path: Path) -> None:
    """Raise AssertionError unless the ONNX checker passes (with strict shape inference) and every
    tensor has a determined element type: a strongly typed TensorRT network needs one per tensor."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # by path: it reads external data itself
    # Shape inference needs the initializers' dims only, which the graph file holds even when the
    # weights are beside it (a loaded graph over 2 GB could not be serialized for it).
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    g = model.graph
    undefined = [v.name for v in (*g.value_info, *g.input, *g.output) if v.type.tensor_type.elem_type == 0]
    assert not undefined, f"{path.name}: tensors of undefined type: {undefined[:10]}"
    typed = {v.name for v in (*g.value_info, *g.input, *g.output)} | {t.name for t in g.initializer}
    untyped = [o for n in g.node for o in n.output if o and o not in typed]
    assert not untyped, f"{path.name}: node outputs without an inferred type: {untyped[:10]}"


def tensor_types(path: Path) -> dict[str, int]:
    """{tensor name: ONNX elem type} of every value in the graph after shape inference."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def ort_session(path: Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # fp16 nodes without CPU kernels get Casts inserted: expected
    if threads:
        options.intra_op_num_threads = threads
    model = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_all(session, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    return [dict(zip(names, session.run(names, {k: v for k, v in f.items() if k in inputs}))) for f in feeds]


def graph_errors(ours: list[dict], ref: list[dict]) -> dict:
    """Errors of `ours` against `ref` over all feeds: {"max_abs", "rel"} where rel = max|a-b| / max|b|
    per output, the worst output; "outputs": the same per output; for decoder logits also "top1": the
    fraction of rows whose argmax agrees (what greedy decoding sees)."""
    per: dict[str, list[float]] = {}
    scale: dict[str, float] = {}
    top1 = []
    for o, r in zip(ours, ref):
        for name, b in r.items():
            if b.size == 0:
                continue
            err = float(np.abs(o[name].astype(np.float64) - b).max())
            per.setdefault(name, []).append(err)
            scale[name] = max(scale.get(name, 0.0), float(np.abs(b).max()))
        if "logits" in r:
            top1.extend((o["logits"].argmax(-1) == r["logits"].argmax(-1)).tolist())
    outputs = {n: {"max_abs": max(e), "rel": max(e) / max(scale[n], 1e-30)} for n, e in per.items()}
    result = {
        "max_abs": max((v["max_abs"] for v in outputs.values()), default=0.0),
        "rel": max((v["rel"] for v in outputs.values()), default=0.0),
        "outputs": outputs,
    }
    if top1:
        result["top1"] = float(np.mean(top1))
    return result
