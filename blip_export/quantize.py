"""INT8 graphs, in two forms:

- `int8` (to_int8): explicit symmetric Q/DQ, what TensorRT 10/11 strongly typed networks need
  (TensorRT has no INT8 builder flag or calibrator any more; it fuses DequantizeLinear -> MatMul
  into int8 GEMMs). int8 zero points of 0, per-channel weight scales, activation scales calibrated
  on real feeds (calibration.py). Runs on ONNX Runtime too (CPU, CUDA, TensorRT EP).
- `int8-cpu` (to_int8_cpu): ONNX Runtime's fastest int8 forms on x86 CPUs, no calibration; TensorRT
  cannot build them. Graphs of many rows (vision, text encoder, cross_kv): dynamic quantization
  (DynamicQuantizeMatMul / MatMulInteger, u8 activations quantized per call, per-channel int8
  weights). The decoder step, a few rows per call: MatMulNBits with 8-bit symmetric weights in
  blocks of 128 along K and int8 compute (accuracy_level 4), see graphs.ROLE_GEMV.

Layers that lose too much stay float. Attention probabilities @ V are kept out by rule
(attention_prob_matmuls); the rest is chosen by measurement (search_exclusions): quantize, measure
the graph's error against fp32 on held-out feeds, and while it is out of bounds, keep the most
sensitive layer groups in float.

The decoder's present_value.N outputs come out of a DequantizeLinear (the quantizer puts the Q/DQ
of the probabilities @ V input on the tensor itself, which is also the graph output) when that
MatMul is quantized: the cached values are then on the int8 grid, which changes nothing the next
step computes, since its Q/DQ of the same tensor uses the same scale.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

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
HOLDOUT_FRACTION = 0.25  # of the feeds given, held out to measure errors when no held-out feeds are given

# int8-cpu graphs whose MatMuls see one row per request and beam: their weights stream through once
# per call, and ONNX Runtime's MatMulNBits kernel (8-bit, blocks of NBITS_BLOCK, int8 compute) streams
# them faster than DynamicQuantizeMatMul. Measured on the BLIP-base decoder step, 2 cores: batch 1
# 8.4 -> 7.7 ms per step (a 20-token caption's steps 175 -> 154 ms), 3 rows 13.1 -> 13.3 ms, 8 rows
# 23.3 -> 25.6 ms; at 64 rows and more DynamicQuantizeMatMul is twice as fast, so the other graphs keep it.
# Which graphs those are is their I/O spec's role (graphs.ROLE_GEMV): to_int8_cpu(gemv=True).
NBITS_BLOCK = 128


def qdq_extra_options(method: str) -> dict:
    """extra_options of quantize_static for TensorRT-compatible Q/DQ."""
    options = {
        "ActivationSymmetric": True,  # int8 zero point 0: TensorRT supports symmetric quantization only
        "WeightSymmetric": True,
        # Q/DQ on the GEMM inputs only: a Q/DQ on the MatMul output would round the pre-bias
        # accumulator again and keep TensorRT from fusing the bias and the activation.
        "OpTypesToExcludeOutputQuantization": list(INT8_OPS),
        # One Q/DQ pair per consumer: a shared pair on a LayerNorm output would also feed the
        # MatMuls that the exclusion search keeps in fp32 (they read the float tensor instead).
        "DedicatedQDQPair": True,
        # Bias stays float: TensorRT has no int32 DequantizeLinear, and fuses a float bias anyway.
        "QuantizeBias": False,
        # Not "CalibMaxIntermediateOutputs": in onnxruntime 1.32 MinMaxCalibrater drops each full
        # chunk without merging its ranges, so only the last chunk of feeds would count. MinMax
        # needs no such bound anyway: its augmented graph reduces every tensor to min/max scalars.
    }
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    return options


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
        sensitivity[group] = _short(err)
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


class _Reader:
    """The calibration feeds as onnxruntime's CalibrationDataReader (get_next until None)."""

    def __init__(self, feeds: list[dict], inputs: set[str]):
        self.feeds, self.inputs, self.i = feeds, inputs, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return {k: v for k, v in self.feeds[self.i - 1].items() if k in self.inputs}

    def __len__(self):
        return len(self.feeds)


def _split(feeds: list[dict], holdout: Iterable[dict] | None) -> tuple[list[dict], list[dict]]:
    if holdout is not None:
        return feeds, list(holdout)
    if len(feeds) < 2:
        raise ValueError("need at least 2 feeds to hold some out for measuring, or pass holdout=")
    n = max(1, int(round(len(feeds) * HOLDOUT_FRACTION)))
    return feeds[:-n], feeds[-n:]


def _inputs(path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def to_int8(
    src: Path,
    dst: Path,
    graph: str,
    calibration: Iterable[dict[str, np.ndarray]],
    holdout: Iterable[dict[str, np.ndarray]] | None = None,
    bound: float | None = INT8_BOUND,
    method: str = "minmax",
    granularity: str = "layer",
    min_top1: float = INT8_MIN_TOP1,
    keep_attention_probs: bool = True,
    progress=None,
) -> dict:
    """Write the `int8` form of the fp32 graph `src` to `dst`: QuantizeLinear/DequantizeLinear with
    int8 zero points of 0 on the inputs of every MatMul/Gemm/Conv (weights per output channel,
    activations per tensor, calibrated on `calibration` feeds: dicts of the graph's inputs), except
    the layer groups that search_exclusions keeps in fp32 to hold the error on `holdout` feeds
    (default: the last quarter of `calibration`) under `bound`. This is the form TensorRT builds.

    method: "minmax" (the calibration range), "percentile" (99.999th percentile of |x|) or
    "entropy" (both keep every calibration tensor in memory: use few feeds at BLIP-base size).
    granularity: "layer" (a role across all layers is one group) or "node". min_top1: for graphs
    with logits, the least greedy-token agreement with fp32 on the held-out feeds.
    keep_attention_probs: keep the probabilities @ V MatMuls out of int8 by rule
    (attention_prob_matmuls) before the search starts.
    Returns the manifest's description: {"precision", "format", "calibration", "bound",
    "excluded_nodes" (all of them), "excluded_by_rule", "excluded_groups" (by the search),
    "sensitivity", "error", "error_all_quantized" (with the rule's exclusions only)}.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    say = progress or (lambda msg: None)
    calib, held = _split(list(calibration), holdout)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory(prefix=f"int8-{graph}-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        # ONNX shape inference so every tensor to quantize has a type. Not ORT's symbolic shape
        # inference (it asserts on the cross_kv Reshapes) and no ORT optimization: TensorRT gets
        # the graph as exported.
        large = _large(src)
        _pre_process(src, pre, large)
        cache = work / "calibration.json"  # calibrate once, quantize many times during the search
        inputs = _inputs(src)

        def quantize(exclude: list[str], out: Path) -> None:
            quantize_static(
                str(pre), str(out), _Reader(calib, inputs),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=methods[method],
                extra_options=qdq_extra_options(method),
                calibration_cache_path=str(cache),
                use_external_data_format=large,
            )

        by_rule = attention_prob_matmuls(pre) if keep_attention_probs else []
        result = _search(src, pre, quantize, held, (bound, min_top1), granularity, work, say, False, by_rule)
        result["excluded_by_rule"] = by_rule
        _finish(result["path"], dst, "int8-qdq")
    return {"precision": "int8-qdq", "format": "qdq-symmetric-int8", "graph": graph,
            "calibration": {"method": method, "feeds": len(calib), "held_out_feeds": len(held)},
            **_describe(result, bound, min_top1)}


def to_int8_cpu(
    src: Path,
    dst: Path,
    graph: str,
    feeds: Iterable[dict[str, np.ndarray]],
    bound: float | None = INT8_BOUND,
    granularity: str = "layer",
    min_top1: float = INT8_MIN_TOP1,
    progress=None,
    gemv: bool = False,
) -> dict:
    """Write the `int8-cpu` form of `src` to `dst`: ONNX Runtime dynamic quantization (int8 weights
    per output channel, uint8 activations quantized at run time per tensor: DynamicQuantizeMatMul /
    MatMulInteger), or with gemv=True (graphs of ROLE_GEMV) MatMulNBits (8-bit symmetric weights per block of NBITS_BLOCK,
    activations quantized to int8 per block at run time). Only MatMul/Gemm with constant weights are
    quantized (a patch-embedding ConvInteger is slower than the fp32 Conv). No calibration: `feeds`
    only measure the error and drive the same exclusion search as to_int8. Not for TensorRT.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    say = progress or (lambda msg: None)
    held = list(feeds)
    with tempfile.TemporaryDirectory(prefix=f"int8cpu-{graph}-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        large = _large(src)
        _pre_process(src, pre, large)

        MatMulNBitsQuantizer = _nbits_quantizer() if gemv else None

        def quantize(exclude: list[str], out: Path) -> None:
            if gemv:
                q = MatMulNBitsQuantizer(onnx.load(str(pre)), bits=8, block_size=NBITS_BLOCK, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=exclude)
                with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
                    q.process()
                q.model.save_model_to_file(str(out), use_external_data_format=large)
                return
            quantize_dynamic(
                str(pre), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True},
                use_external_data_format=large,
            )

        result = _search(src, pre, quantize, held, (bound, min_top1), granularity, Path(tmp), say, True, [])
        _finish(result["path"], dst, "int8-cpu")
    form = ({"format": "ort-matmulnbits-int8", "block_size": NBITS_BLOCK, "accuracy_level": 4} if gemv
            else {"format": "ort-dynamic-u8s8"})
    return {"precision": "int8-cpu", **form, "graph": graph,
            "measured_on_feeds": len(held), **_describe(result, bound, min_top1)}


def _nbits_quantizer():
    """onnxruntime's MatMulNBitsQuantizer class. Its module calls logging.basicConfig(level=INFO) when
    imported, which would turn on INFO logging for the whole host process (one line per node of
    every graph we quantize): a handler on the root logger during the import makes that a no-op."""
    import logging

    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.removeHandler(guard)
    return MatMulNBitsQuantizer


@contextmanager
def _quiet(logger_name: str):
    """The named logger at WARNING for the block (MatMulNBitsQuantizer logs every node at INFO)."""
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _search(src, pre, quantize, held, bounds, granularity, work, say, const_weight_only, fixed) -> dict:
    """search_exclusions over the layer groups of `pre`, with the `fixed` nodes always excluded."""
    reference = run_all(ort_session(Path(src)), held)

    def evaluate(path: Path) -> dict:
        return graph_errors(run_all(ort_session(path), held), reference)

    nodes = quantizable_nodes(pre, INT8_OPS if not const_weight_only else ("MatMul", "Gemm"), const_weight_only)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        if n not in fixed:
            groups.setdefault(layer_group(n) if granularity == "layer" else n, []).append(n)
    result = search_exclusions(lambda exclude, out: quantize([*fixed, *exclude], out), evaluate, groups,
                               bounds[0], work, say, bounds[1])
    result["excluded_nodes"] = [*fixed, *result["excluded_nodes"]]
    return result


def _large(src: Path) -> bool:
    """Whether the work copies of `src` (pre-processed graph, candidates) keep their weights beside
    them, as save_graph would store `src` (over files.EXTERNAL_DATA_THRESHOLD)."""
    import onnx

    from . import files

    return files.weight_bytes(onnx.load(str(src), load_external_data=False)) > files.EXTERNAL_DATA_THRESHOLD


def _pre_process(src: Path, pre: Path, large: bool) -> None:
    """ONNX shape inference only (see to_int8), the result beside `pre` with its data when large."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True,
                      save_as_external_data=large, all_tensors_to_one_file=True,
                      external_data_location=pre.name + ".data", external_data_size_threshold=EXTERNAL_TENSOR_MIN)


def _finish(path: Path, dst: Path, precision: str) -> None:
    import onnx

    model = onnx.load(str(path))  # with the candidate's external data, if any
    set_metadata(model, {"precision": precision})
    save_graph(model, dst)
    check_typed(dst)


def _describe(result: dict, bound: float | None, min_top1: float) -> dict:
    return {
        "bound": bound,
        "exclusion_search": "off: every layer quantized (--quantize-all)" if bound is None else "on",
        "min_top1": min_top1,
        "excluded_by_rule": result.get("excluded_by_rule", []),
        "excluded_groups": result["excluded_groups"],
        "excluded_nodes": result["excluded_nodes"],
        "sensitivity": result["sensitivity"],
        "error": _short(result["error"]),
        "error_all_quantized": _short(result["error_all_quantized"]),
    }


def _short(err: dict) -> dict:
    return {k: v for k, v in err.items() if k != "outputs"}
