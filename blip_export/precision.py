"""Precision lives in the ONNX graph: fp32 graphs -> fp16 graphs with fp32 islands, and the checks
every converted graph must pass.

TensorRT 10/11 builds strongly typed networks (no FP16/INT8 builder flags, no calibrator), so the
precision of every tensor is decided here and TensorRT only compiles it. ONNX Runtime on the CPU runs
the same files, which is how the tests check them. INT8 lives in quantize.py, calibration data and
the end-to-end accuracy check in calibration.py, the bundle conversion in convert.py.

Graph inputs and outputs keep the dtypes of the I/O table (blip_runtime.graphs: float32 tensors,
int64 ids and masks) in every precision, so the runtime feeds every bundle the same arrays. The
decoder's KV cache therefore crosses the graph boundary as float32 (a Cast on each side inside the
graph); an fp16 cache would halve that traffic but needs a second I/O table, which is not worth it
until a benchmark says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# fp32 islands of the fp16 graphs, by op type. Why each:
# - LayerNormalization: the variance is a mean of squares; fp16 overflows once |x| passes ~256 and
#   loses the small variances; the residual stream of ViTs carries outlier channels in the hundreds.
# - Softmax: the exp-sum is a long accumulation, and the scores of a fully masked row (left-padded
#   prompts) must stay finite (see FP16_MASK below).
# - ReduceL2: the ITC features' norm is a sum of squares (and its Clip/Expand/Div follow it; tiny).
FP16_KEEP_OPS = ("LayerNormalization", "Softmax", "ReduceL2")
# ONNX Runtime's default block list (ops without fp16 kernels: Range, CumSum, TopK, ...) stays blocked.


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph) -> dict[str, object]:
    return {name: node for node in graph.node for name in node.output}


def fp16_islands(model) -> dict[str, list[str]]:
    """Names of the nodes to keep in fp32, by reason: {"op_type": [...], "attention_mask": [...],
    "normalize": [...], "constants": [...]}.

    attention_mask: the Where that builds the additive mask (0 / float32 min, as transformers) and
    the Add that applies it to the scores before Softmax. In fp16 the mask clamps to -65504, score +
    mask rounds to -inf once the score is below about -16, and a fully masked row (a left-padding
    query) softmaxes to NaN; NaN in the keys/values of padding then poisons every later step through
    0 * NaN in probs @ V. Kept in fp32 the mask is exactly the fp32 graph's.
    """
    graph = model.graph
    consumers, producers = _consumers(graph), _producers(graph)
    keep = {"op_type": [], "attention_mask": [], "normalize": [], "constants": []}
    for node in graph.node:
        if node.op_type in FP16_KEEP_OPS:
            keep["op_type"].append(node.name)
        if node.op_type == "Softmax":
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add":
                keep["attention_mask"].append(add.name)
                for name in add.input:  # the mask's side of the Add: Where (maybe via Unsqueeze/Expand)
                    src = producers.get(name)
                    while src is not None and src.op_type in ("Unsqueeze", "Expand", "Cast", "Reshape"):
                        src = producers.get(src.input[0])
                    if src is not None and src.op_type == "Where" and src.name not in keep["attention_mask"]:
                        keep["attention_mask"].append(src.name)
        if node.op_type == "ReduceL2":  # F.normalize: x / expand(clip(norm(x)))
            frontier = [node]
            while frontier:
                nxt = []
                for n in frontier:
                    for c in consumers.get(n.output[0], []):
                        if c.op_type in ("Clip", "Expand", "Div") and c.name not in keep["normalize"]:
                            keep["normalize"].append(c.name)
                            nxt.append(c)
                frontier = nxt
    blocked = {n for names in keep.values() for n in names}
    # Constants read only by fp32 nodes stay fp32 (the mask's float32 min would clamp to -65504).
    for node in graph.node:
        users = consumers.get(node.output[0], []) if node.op_type == "Constant" else []
        if users and all(u.name in blocked for u in users):
            keep["constants"].append(node.name)
    return keep


def to_fp16(src: Path, dst: Path, graph: str) -> dict:
    """Write a mixed-precision copy of the fp32 graph `src` to `dst`: fp16 weights and activations,
    fp32 islands where fp16 overflows or loses accuracy (see FP16_KEEP_OPS and fp16_islands), graph
    inputs and outputs unchanged (float32 / int64, as the I/O table says).

    Returns what stays in fp32, for the manifest: {"precision": "fp16", "kept_fp32": {reason:
    [node names]}, "kept_fp32_ops": {op type: count}, "fp16_nodes": count}.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # ONNX Runtime's copy of onnxconverter-common's converter (same code, maintained with ORT), so
    # the export needs no extra package.
    model = onnx.load(str(src))
    keep = fp16_islands(model)
    node_block = [n for names in keep.values() for n in names]
    fp16 = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_OPS)),
        node_block_list=node_block,
    )
    folded = _fold_round_trips(fp16.graph)
    OnnxModel.graph_topological_sort(fp16.graph, is_deterministic=True)  # the converter appends its Casts
    _set_meta(fp16, {"precision": "fp16"})
    onnx.save(fp16, str(dst))
    check_typed(dst)
    kinds = {}
    by_name = {n.name: n.op_type for n in fp16.graph.node}
    for name in node_block:
        kinds[by_name.get(name, "?")] = kinds.get(by_name.get(name, "?"), 0) + 1
    fp16_nodes = sum(1 for n in fp16.graph.node if n.op_type not in ("Cast", "Constant") and n.name not in node_block)
    return {"precision": "fp16", "graph": graph, "kept_fp32": keep, "kept_fp32_ops": kinds, "fp16_nodes": fp16_nodes,
            "fp16_round_trips_removed": folded}


def _fold_round_trips(graph) -> int:
    """Cast(to fp16) -> Cast(to fp32) becomes one Cast(to fp32) of the original tensor.

    The converter types every float tensor fp16 and puts Casts on both sides of each fp32 node, so a
    tensor between two fp32 nodes (mask constant -> Where -> Add, normalize Div -> graph output)
    goes through fp16 and back: the rounding the island exists to avoid, and float32 min casts to
    -inf (Cast does not saturate), which makes a fully masked row NaN. Returns how many were folded."""
    from onnx import TensorProto

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = _producers(graph)
    folded = 0
    for node in graph.node:
        parent = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if parent is not None and cast_to(node) == TensorProto.FLOAT and cast_to(parent) == TensorProto.FLOAT16:
            node.input[0] = parent.input[0]
            folded += 1
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    for n in dead:
        graph.node.remove(n)
    return folded


def _set_meta(model, meta: dict) -> None:
    props = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        entry = props.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def check_typed(path: Path) -> None:
    """Raise AssertionError unless the ONNX checker passes (with strict shape inference) and every
    tensor has a determined element type: a strongly typed TensorRT network needs one per tensor."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    g = model.graph
    undefined = [v.name for v in (*g.value_info, *g.input, *g.output) if v.type.tensor_type.elem_type == 0]
    assert not undefined, f"{path.name}: tensors of undefined type: {undefined[:10]}"
    typed = {v.name for v in (*g.value_info, *g.input, *g.output)} | {t.name for t in g.initializer}
    untyped = [o for n in g.node for o in n.output if o and o not in typed]
    assert not untyped, f"{path.name}: node outputs without an inferred type: {untyped[:10]}"


def tensor_types(path: Path) -> dict[str, int]:
    """{tensor name: ONNX elem type} of every value in the graph after shape inference."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


# -- measuring a converted graph against its fp32 source --------------------------------------------

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
