"""SmoothQuant-style smoothing (Xiao et al. 2022) of fp32 ONNX graphs before int8 with static activations.

Large pre-LayerNorm transformers (OPT from 6.7B on) carry a few activation channels ~100x larger
than the rest in the LayerNorm outputs that feed their Linears. One symmetric int8 scale per tensor
(what Q/DQ gives activations) is then set by those channels and the others quantize to a few steps.
Smoothing moves the difficulty into the weights, which are quantized per output channel: for each
input channel j of the Linears that read one LayerNorm,

    s_j = max|X_j| ** alpha / max_over_those_Linears|W_j,:| ** (1 - alpha)

and the LayerNorm's gamma and beta are divided by s while the weight rows W_j,: are multiplied by
it. X W = (X / s)(s W), so the fp32 graph computes the same function (up to rounding: ~1e-6
relative); only the ranges that int8 sees change.

The rewrite is pattern-based and names no family or graph: a normalization node (NORM_OPS) whose
output goes only to MatMul (or Gemm) nodes with constant 2-D fp32 weights contracting its last axis,
and to nodes that read only its shape (Shape, Size), is smoothed; any other consumer (a residual Add
of a post-LayerNorm block, a graph output) would see X / s, so that LayerNorm is left alone.
Initializers shared with nodes outside the smoothed group are copied, never changed under them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .files import data_file, external_files, save_graph
from .measure import set_metadata

# Normalization op -> (scale input index, bias input index or None). The ONNX standard's LayerNormalization;
# RMS norms (scale only) would be one more row each.
NORM_OPS = {"LayerNormalization": (1, 2)}
SHAPE_ONLY = ("Shape", "Size")  # consumers that read the tensor's shape, not its values
MIN_SCALE = 1e-5  # SmoothQuant's clamp of s and of the weight ranges: no division by ~0


@dataclass(frozen=True)
class SmoothGroup:
    """One normalization node and the Linears that read its output: the unit that shares one s."""

    norm: str  # node name (or, for an unnamed node, its op type and output)
    index: int  # its position in graph.node (names need not be unique; smoothing adds no node)
    output: str  # its output tensor, [..., C] float32
    scale: str  # gamma initializer, [C]
    bias: str | None  # beta initializer, [C], or None when the node has none
    axis: int  # the node's normalized axis attribute (must be the last axis)
    linears: tuple[str, ...]  # MatMul / Gemm node names reading `output`
    linear_indices: tuple[int, ...]  # their positions in graph.node
    weights: tuple[tuple[str, bool], ...]  # per linear: (weight initializer, input channels on columns: Gemm transB)


def _uses(graph) -> dict[str, int]:
    """How many node inputs (subgraphs included) and graph outputs name each tensor. A subgraph's own
    tensors that shadow an outer name count too: counting too many only ever makes a copy."""
    count: dict[str, int] = {}

    def walk(g):
        for node in g.node:
            for name in node.input:
                count[name] = count.get(name, 0) + 1
            for attr in node.attribute:
                for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    walk(sub)
        for out in g.output:
            count[out.name] = count.get(out.name, 0) + 1

    walk(graph)
    return count


def _label(node) -> str:
    """A node's name for reports; unnamed nodes by op type and first output."""
    return node.name or f"{node.op_type}->{node.output[0]}"


def _attr(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def find_groups(model) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The smoothable normalization nodes of `model` (a ModelProto, weights loaded or not) and, for the
    other normalization nodes, why not: ({norm node: reason}). The last-axis check needs the
    activation's rank and is made in smooth_graph."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    constant = set(inits) - {i.name for i in graph.input}  # an initializer that is also an input can be fed
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def fp32_const(name: str, rank: int) -> bool:
        t = inits.get(name)
        return name in constant and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == rank

    uses = _uses(graph)
    position = {id(n): i for i, n in enumerate(graph.node)}
    groups, skipped = [], {}
    for index, node in enumerate(graph.node):
        if node.op_type not in NORM_OPS:
            continue
        name = _label(node)
        scale_at, bias_at = NORM_OPS[node.op_type]
        scale = node.input[scale_at] if len(node.input) > scale_at else ""
        has_bias = bias_at is not None and len(node.input) > bias_at and node.input[bias_at]
        bias = node.input[bias_at] if has_bias else None
        out = node.output[0]
        if not fp32_const(scale, 1) or (bias is not None and not fp32_const(bias, 1)):
            skipped[name] = "scale or bias is not a constant 1-D float32 initializer"
            continue
        width = inits[scale].dims[0]
        if out in outputs:
            skipped[name] = "its output is a graph output"
            continue
        if uses.get(out, 0) != sum(list(c.input).count(out) for c in consumers.get(out, [])):
            skipped[name] = "its output is read inside a subgraph (If / Loop / Scan)"
            continue
        linears, weights, reason = [], [], None
        at = []
        for user in consumers.get(out, []):
            if user.op_type in SHAPE_ONLY:
                continue
            w = user.input[1] if len(user.input) > 1 else ""
            ok = user.op_type in ("MatMul", "Gemm") and user.input[0] == out and w != out and fp32_const(w, 2)
            columns = user.op_type == "Gemm" and _attr(user, "transB", 0) == 1
            if ok and user.op_type == "Gemm" and _attr(user, "transA", 0):
                ok = False
            if ok and inits[w].dims[1 if columns else 0] != width:
                ok = False
            if not ok:
                reason = f"read by {user.op_type} {_label(user)!r}, not a MatMul/Gemm with a constant weight"
                break
            linears.append(_label(user))
            at.append(position[id(user)])
            weights.append((w, columns))
        if reason is None and not linears:
            reason = "no MatMul reads its output"
        if reason:
            skipped[name] = reason
            continue
        groups.append(SmoothGroup(name, index, out, scale, bias, _attr(node, "axis", -1), tuple(linears),
                                  tuple(at), tuple(weights)))
    return groups, skipped


def activation_ranges(src: Path, model, tensors: list[str], feeds: list[dict]) -> dict[str, tuple[np.ndarray, int]]:
    """{tensor: (per-channel max|x| over every feed (C,) float32, the tensor's rank)} for float tensors
    of the graph at `src` (`model`: its ModelProto loaded without external data), from an ONNX Runtime
    session on a copy of the graph that also outputs them. Not onnxruntime.quantization's calibrators:
    they reduce every tensor to one min/max pair, and smoothing needs one range per channel."""
    import onnx
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in present:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The session is built from bytes (the graph alone): its weights stay in the data file beside src.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(src).parent))
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    ranges: dict[str, tuple[np.ndarray, int]] = {}
    for feed in feeds:
        values = session.run(tensors, {k: v for k, v in feed.items() if k in inputs})
        for name, x in zip(tensors, values):
            if x.size == 0:
                continue
            r = np.abs(x.reshape(-1, x.shape[-1])).max(0)  # (C,)
            ranges[name] = (np.maximum(ranges[name][0], r) if name in ranges else r, x.ndim)
    return ranges


def smoothing_scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s (C,) float32 for activations with per-channel range act_max (C,) read by `weights`, each (C, N)
    (input channels on rows): act_max**alpha / w_max**(1-alpha), w_max the largest |W_j,:| over all of
    them. A channel that is zero in every feed or every weight keeps s = 1 (nothing to balance, and
    dividing its gamma by ~0 would only add rounding)."""
    w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)  # (C,)
    s = np.power(np.maximum(act_max, MIN_SCALE), alpha) / np.power(np.maximum(w_max, MIN_SCALE), 1.0 - alpha)
    s = np.where((act_max > 0) & (w_max > 0), np.maximum(s, MIN_SCALE), 1.0)
    return s.astype(np.float32)


def _spread(r: np.ndarray) -> float:
    """Largest channel range over the median one: how far the outlier channels stand out."""
    return float(r.max() / max(float(np.median(r)), 1e-30))


def smooth_graph(src: Path, dst: Path, feeds: list[dict], alpha: float = 0.5) -> dict:
    """Write the smoothed copy of the fp32 graph `src` to `dst` (save_graph: weights inside, or beside
    it in `<dst>.data` over the threshold; `dst` may be `src`). `feeds`: dicts of the graph's inputs
    (numpy) over which the per-channel activation ranges are taken, the calibration feeds of the int8
    conversion that follows. alpha in [0, 1]: how much of the range moves into the weights.

    Returns {"alpha", "feeds", "smoothed": {norm node: {"linears": [...], "max_scale", "min_scale",
    "spread_before", "spread_after"}}, "skipped": {norm node: reason}, "max_scale"} where spread is
    the largest per-channel range of the normalization's output over the median one."""
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a number in [0, 1]")
    feeds = list(feeds)
    if not feeds:
        raise ValueError("feeds: expected at least one dict of the graph's inputs to measure activation ranges")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    groups, skipped = find_groups(model)
    ranges = activation_ranges(src, model, [g.output for g in groups], feeds) if groups else {}
    if external_files(model):
        onnx.load_external_data_for_model(model, str(src.parent))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    smoothed, replaced = {}, set()
    for g in groups:
        if g.output not in ranges:
            skipped[g.norm] = "its output was empty on every feed"
            continue
        act, rank = ranges[g.output]
        if g.axis not in (-1, rank - 1) or act.shape[0] != inits[g.scale].dims[0]:
            skipped[g.norm] = f"normalizes axis {g.axis} of a rank-{rank} tensor, not its last axis only"
            continue
        weights = {name: (numpy_helper.to_array(inits[name]), columns) for name, columns in g.weights}
        rows = {name: (w.T if columns else w) for name, (w, columns) in weights.items()}  # (C, N) each
        s = smoothing_scales(act, list(rows.values()), alpha)
        uses = _uses(graph)
        # LayerNorm side: gamma / s, beta / s
        norm = graph.node[g.index]
        for index, name in ((NORM_OPS[norm.op_type][0], g.scale), (NORM_OPS[norm.op_type][1], g.bias)):
            if name is None:
                continue
            value = numpy_helper.to_array(inits[name]) / s
            norm.input[index] = _store(graph, inits, name, value, private=uses[name] == 1)
            replaced.add(name)
        # Linear side: weight rows * s (columns for Gemm transB)
        for name, (w, columns) in weights.items():
            readers = [graph.node[i] for i in g.linear_indices if graph.node[i].input[1] == name]
            value = w * (s[None, :] if columns else s[:, None])
            new = _store(graph, inits, name, value.astype(np.float32), private=uses[name] == len(readers))
            for node in readers:
                node.input[1] = new
            replaced.add(name)
        smoothed[g.norm] = {"linears": list(g.linears), "max_scale": float(s.max()), "min_scale": float(s.min()),
                            "spread_before": _spread(act), "spread_after": _spread(act / s)}
    _drop_unused(graph, replaced)
    set_metadata(model, {"smoothquant_alpha": alpha})
    save_graph(model, dst)
    return {"alpha": alpha, "feeds": len(feeds), "smoothed": smoothed, "skipped": skipped,
            "max_scale": max((v["max_scale"] for v in smoothed.values()), default=1.0)}


SMOOTH_ALPHAS = (0.5, 0.75, 0.85)  # 0.5 first: best or tied on every model measured (benchmarks/RESULTS_smoothquant.md)


def choose_alpha(src: Path, work: Path, feeds: list[dict], score: Callable[[Path], float],
                 alphas: Sequence[float] = SMOOTH_ALPHAS, unsmoothed: bool = True) -> dict:
    """Smooth `src` at each of `alphas` (on `feeds`, the calibration feeds) into `work` and keep the one
    `score` rates lowest: score(graph path) -> a number, e.g. quantize.badness of the int8 graph
    quantized from it, measured on held-out feeds. With `unsmoothed`, `src` itself is scored first and
    a smoothed graph is kept only when it scores strictly lower (smoothing fitted on few calibration
    feeds can cost a little where there are no outliers). Ties keep the earlier candidate; the others
    are deleted. Returns smooth_graph's description of the kept graph with "path" (None: keep `src`),
    "alpha" (None likewise), "scores" ({alpha: score}) and "unsmoothed_score" (or None)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    base = float(score(Path(src))) if unsmoothed else None
    best: dict | None = None
    scores: dict[float, float] = {}
    for alpha in alphas:
        path = work / f"smoothed-{alpha}.onnx"
        info = smooth_graph(src, path, feeds, alpha)
        if not info["smoothed"]:  # the same for every alpha: which nodes qualify does not depend on it
            _remove(path)
            return {**info, "alpha": None, "path": None, "scores": {}, "unsmoothed_score": base}
        scores[alpha] = float(score(path))
        if scores[alpha] < (scores[best["alpha"]] if best else base if base is not None else float("inf")):
            if best is not None:
                _remove(best["path"])
            best = {**info, "path": path}
        else:
            _remove(path)
        last = info
    if best is None:  # src scored no worse than every smoothed candidate
        best = {**last, "alpha": None, "path": None}
    return {**best, "scores": scores, "unsmoothed_score": base}


def _remove(path: Path) -> None:
    """Delete a candidate graph and the data file beside it."""
    path.unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)


def _store(graph, inits: dict, name: str, value: np.ndarray, private: bool) -> str:
    """Write `value` as initializer `name` when only the smoothed nodes read it (`private`), else as a
    new initializer beside it (the other readers keep the original). Returns the name to read."""
    from onnx import numpy_helper

    if private:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        return name
    new, k = f"{name}/smoothed", 1
    while new in inits:
        new, k = f"{name}/smoothed{k}", k + 1
    tensor = numpy_helper.from_array(value.astype(np.float32), new)
    graph.initializer.append(tensor)
    inits[new] = graph.initializer[-1]
    return new


def _drop_unused(graph, names: set[str]) -> None:
    """Remove the initializers among `names` that no node reads any more (originals whose every reader
    got a smoothed copy); initializers the source graph left unused are not ours to remove."""
    uses = _uses(graph)
    dead = [t for t in graph.initializer if t.name in names and not uses.get(t.name)]
    for t in dead:
        graph.initializer.remove(t)
