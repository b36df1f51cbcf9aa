"""The measured exclusion search shared by every quantized form (quantize.py: int8-qdq, int8-cpu;
weight_only.py: int4), and the work-copy helpers around it.

Layers that lose too much stay float. The search (search_exclusions): quantize, measure the graph's
error against fp32 on held-out feeds, and while it is out of bounds, keep the most sensitive layer
groups in float. A layer group is one role across the layers (layer_group: torch.onnx names nodes
by module path, so the layer index is the only part that varies), or a family's grouping where its
node names read otherwise (families.GraphPrecision.layer_groups).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from .files import EXTERNAL_TENSOR_MIN, save_graph
from .measure import check_typed, graph_errors, ort_session, run_all, set_metadata

# Only the GEMM-like ops carry Q/DQ: that is where int8 pays (TensorRT fuses DQ -> MatMul/Conv ->
# bias Add into an int8 kernel) and what NVIDIA's Q/DQ placement guidance recommends; Q/DQ around
# LayerNorm, Softmax, GELU or Add would cost accuracy and break TensorRT's fusions.
INT8_OPS = ("MatMul", "Gemm", "Conv")
INT8_BOUND = 0.05  # default bound of a graph's relative error vs fp32 (max|a-b| / max|b|, worst output)
# ... and for graphs with logits, the least fraction of rows whose argmax (the greedy token) agrees
# with fp32: the relative error alone says little where logit margins are small.
INT8_MIN_TOP1 = 0.98


def layer_group(node_name: str) -> str:
    """Node name -> its layer group: the same role in every layer ("/vision_model/layers.*/mlp/fc1/MatMul").
    torch.onnx names nodes by module path, so the layer index is the only part that varies."""
    return re.sub(r"(layers?)\.\d+(?=/)", r"\1.*", node_name)


def quantizable_nodes(path: Path, ops: tuple[str, ...] = INT8_OPS, const_weight_only: bool = False) -> list[str]:
    """Names of the nodes that the quantizer would touch (with const_weight_only: those whose second
    input is an initializer, which is all that dynamic quantization handles)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [
        n.name for n in model.graph.node
        if n.op_type in ops and (not const_weight_only or (len(n.input) > 1 and n.input[1] in inits))
    ]


def attention_prob_matmuls(path: Path) -> list[str]:
    """The MatMuls whose first input is a Softmax output (attention probabilities @ V).

    They stay out of int8 by rule: a per-tensor symmetric int8 scale for probabilities is
    max/127, about 1/127, while over 577 image tokens a typical probability is ~1/577, below half a
    step, so most probabilities quantize to 0. Measured at BLIP-base size (random weights, minmax):
    quantizing only these MatMuls gives relative error 0.15 on vision, and on decoder_step 0.22
    with 54% greedy-token agreement (cross-attention) and 0.16 (self-attention); every other
    layer group alone stays near 0.02."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for n in graph.node:
        src = producers.get(n.input[0]) if n.op_type == "MatMul" else None
        while src is not None and src.op_type in ("Cast", "Dropout", "Identity"):
            src = producers.get(src.input[0])
        if src is not None and src.op_type == "Softmax":
            out.append(n.name)
    return out


def badness(err: dict, bound: float, min_top1: float = INT8_MIN_TOP1) -> float:
    """How far a graph_errors result is from acceptable: <= 1 is within the bounds (relative error
    <= bound and, where the graph has logits, top-1 agreement >= min_top1)."""
    score = err["rel"] / bound
    if "top1" in err:
        score = max(score, (1.0 - err["top1"]) / max(1.0 - min_top1, 1e-9))
    return score


def search_exclusions(
    quantize: Callable[[list[str], Path], None],
    evaluate: Callable[[Path], dict],
    groups: dict[str, list[str]],
    bound: float | None,
    workdir: Path,
    say=lambda msg: None,
    min_top1: float = INT8_MIN_TOP1,
) -> dict:
    """Find which layer groups to keep in fp32 so the graph's error is within the bounds (badness).

    `quantize(nodes_to_exclude, out_path)` writes a quantized graph; `evaluate(path)` returns its
    graph_errors against fp32 on held-out feeds. First all groups are quantized; if that is out of
    bounds, each group's sensitivity is measured (the error with only that group quantized), and
    groups are excluded from the most sensitive down until the error is within bounds (or
    everything is excluded); then each excluded group but the last is tried quantized again and
    stays quantized if the graph remains within bounds. Returns {"excluded_groups", "excluded_nodes", "error",
    "error_all_quantized", "sensitivity": {group: graph_errors without "outputs"}, "path"}.
    """
    everything = [n for nodes in groups.values() for n in nodes]
    count = iter(range(1 << 30))

    def attempt(excluded_groups: list[str]) -> tuple[dict, Path]:
        path = workdir / f"candidate{next(count)}.onnx"
        quantize([n for g in excluded_groups for n in groups[g]], path)
        return evaluate(path), path

    def accept(excluded_groups: list[str], err: dict, path: Path) -> None:
        if result.get("path") not in (None, path):
            _remove(result["path"])  # candidates are whole graphs: hundreds of MB at base size
        result.update(excluded_groups=list(excluded_groups), error=err, path=path,
                      excluded_nodes=[n for g in excluded_groups for n in groups[g]])

    result: dict = {"sensitivity": {}}
    first, path = attempt([])
    accept([], first, path)
    result["error_all_quantized"] = first
    say(f"all {len(everything)} nodes quantized: {_fmt(first)}")
    if bound is None or badness(first, bound, min_top1) <= 1:  # None: quantize everything, no search
        return result
    sensitivity = {}
    for group in groups:
        err, path = attempt([g for g in groups if g != group])
        sensitivity[group] = short(err)
        _remove(path)
    order = sorted(sensitivity, key=lambda g: -badness(sensitivity[g], bound, min_top1))
    result["sensitivity"] = {g: sensitivity[g] for g in order}
    excluded: list[str] = []
    for group in order:
        excluded.append(group)
        err, path = attempt(excluded)
        say(f"excluding {group} (alone: {_fmt(sensitivity[group])}): {_fmt(err)}")
        accept(excluded, err, path)
        if badness(err, bound, min_top1) <= 1:
            break
    # Errors do not add up exactly: a group excluded early may be harmless once later ones are out.
    # Quantize each again (least sensitive first) where the graph stays within bounds.
    for group in reversed(excluded[:-1]):
        trial = [g for g in excluded if g != group]
        err, path = attempt(trial)
        if badness(err, bound, min_top1) <= 1:
            say(f"quantizing {group} again: {_fmt(err)}")
            excluded = trial
            accept(excluded, err, path)
        else:
            _remove(path)
    return result


def _remove(path: Path) -> None:
    """Delete a candidate graph and the data file beside it (large graphs: GBs each)."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _fmt(err: dict) -> str:
    return f"rel {err['rel']:.3e}" + (f", top-1 {err['top1']:.3f}" if "top1" in err else "")



def search_graph(src: Path, pre: Path, quantize, held: list[dict], bounds: tuple, granularity: str, work: Path,
                 say, nodes: list[str], fixed: list[str], layer_groups=None) -> dict:
    """search_exclusions over the layer groups of `nodes` (of the pre-processed graph `pre`), with the
    `fixed` nodes always excluded; errors against the fp32 graph `src` on the `held` feeds. bounds:
    (bound, min_top1); granularity "layer" (layer_groups, default layer_group of each name) or "node"."""
    reference = run_all(ort_session(Path(src)), held)

    def evaluate(path: Path) -> dict:
        return graph_errors(run_all(ort_session(path), held), reference)

    free = [n for n in nodes if n not in fixed]
    if granularity != "layer":
        keys = free
    else:
        keys = layer_groups(free) if layer_groups else [layer_group(n) for n in free]
    groups: dict[str, list[str]] = {}
    for key, n in zip(keys, free):
        groups.setdefault(key, []).append(n)
    result = search_exclusions(lambda exclude, out: quantize([*fixed, *exclude], out), evaluate, groups,
                               bounds[0], work, say, bounds[1])
    result["excluded_nodes"] = [*fixed, *result["excluded_nodes"]]
    return result


def is_large(src: Path) -> bool:
    """Whether the work copies of `src` (pre-processed graph, candidates) keep their weights beside
    them, as save_graph would store `src` (over files.EXTERNAL_DATA_THRESHOLD)."""
    import onnx

    from . import files

    return files.weight_bytes(onnx.load(str(src), load_external_data=False)) > files.EXTERNAL_DATA_THRESHOLD


def pre_process(src: Path, pre: Path, large: bool) -> None:
    """ONNX shape inference only, the result beside `pre` with its data when large. Not ORT's symbolic
    shape inference (it asserts on the cross_kv Reshapes) and no ORT optimization: TensorRT gets the
    graph as exported."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True,
                      save_as_external_data=large, all_tensors_to_one_file=True,
                      external_data_location=pre.name + ".data", external_data_size_threshold=EXTERNAL_TENSOR_MIN)


def finish(path: Path, dst: Path, precision: str) -> None:
    """The chosen candidate at `path` -> `dst`, with its "precision" metadata, checked typed."""
    import onnx

    model = onnx.load(str(path))  # with the candidate's external data, if any
    set_metadata(model, {"precision": precision})
    save_graph(model, dst)
    check_typed(dst)


def describe(result: dict, bound: float | None, min_top1: float) -> dict:
    """The manifest's account of a search_graph result."""
    return {
        "bound": bound,
        "exclusion_search": "off: every layer quantized (--quantize-all)" if bound is None else "on",
        "min_top1": min_top1,
        "excluded_by_rule": result.get("excluded_by_rule", []),
        "excluded_groups": result["excluded_groups"],
        "excluded_nodes": result["excluded_nodes"],
        "sensitivity": result["sensitivity"],
        "error": short(result["error"]),
        "error_all_quantized": short(result["error_all_quantized"]),
    }


def short(err: dict) -> dict:
    """graph_errors without the per-output detail."""
    return {k: v for k, v in err.items() if k != "outputs"}
