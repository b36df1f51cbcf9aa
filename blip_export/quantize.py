"""INT8 graphs, in two forms:

- `int8` (to_int8): explicit symmetric Q/DQ, what TensorRT 10/11 strongly typed networks need
  (TensorRT has no INT8 builder flag or calibrator any more; it fuses DequantizeLinear -> MatMul
  into int8 GEMMs). int8 zero points of 0, per-channel weight scales, activation scales calibrated
  on real feeds (calibration.py). Runs on ONNX Runtime too (CPU, CUDA, TensorRT EP).
- `int8-cpu` (to_int8_cpu): ONNX Runtime's fastest int8 forms on x86 CPUs, no calibration; TensorRT
  cannot build them. Graphs of many rows (vision, text encoder, cross_kv): dynamic quantization
  (DynamicQuantizeMatMul / MatMulInteger, u8 activations quantized per call, per-channel int8
  weights). The decoder step, a few rows per call: MatMulNBits with 8-bit symmetric weights in
  blocks of 128 along K and int8 compute (accuracy_level 4), see graphs.ROLE_GEMV and weight_only.py
  (which also writes the int4 form).

Layers that lose too much stay float. Attention probabilities @ V are kept out by rule
(attention_prob_matmuls); the rest is chosen by measurement (quant_search.search_exclusions).

The decoder's present_value.N outputs come out of a DequantizeLinear (the quantizer puts the Q/DQ
of the probabilities @ V input on the tensor itself, which is also the graph output) when that
MatMul is quantized: the cached values are then on the int8 grid, which changes nothing the next
step computes, since its Q/DQ of the same tensor uses the same scale.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .quant_search import (  # noqa: F401  (the search's names, as this module has always offered them)
    INT8_BOUND, INT8_MIN_TOP1, INT8_OPS, attention_prob_matmuls, badness, describe, finish, is_large, layer_group,
    pre_process, quantizable_nodes, search_exclusions, search_graph,
)
from .weight_only import NBITS_ACCURACY_LEVEL, NBITS_BLOCK, _nbits_quantizer, nbits_quantize  # noqa: F401

HOLDOUT_FRACTION = 0.25  # of the feeds given, held out to measure errors when no held-out feeds are given


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
    layer_groups=None,
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
    (attention_prob_matmuls) before the search starts. layer_groups: the family's grouping of node
    names (families.GraphPrecision.layer_groups; None: layer_group).
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
        large = is_large(src)
        pre_process(src, pre, large)  # ONNX shape inference only: every tensor to quantize has a type
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
        result = search_graph(src, pre, quantize, held, (bound, min_top1), granularity, work, say,
                              quantizable_nodes(pre, INT8_OPS), by_rule, layer_groups)
        result["excluded_by_rule"] = by_rule
        finish(result["path"], dst, "int8-qdq")
    return {"precision": "int8-qdq", "format": "qdq-symmetric-int8", "graph": graph,
            "calibration": {"method": method, "feeds": len(calib), "held_out_feeds": len(held)},
            **describe(result, bound, min_top1)}


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
    layer_groups=None,
) -> dict:
    """Write the `int8-cpu` form of `src` to `dst`: ONNX Runtime dynamic quantization (int8 weights
    per output channel, uint8 activations quantized at run time per tensor: DynamicQuantizeMatMul /
    MatMulInteger), or with gemv=True (graphs of ROLE_GEMV) MatMulNBits (8-bit symmetric weights per block of NBITS_BLOCK,
    activations quantized to int8 per block at run time). Only MatMul/Gemm with constant weights are
    quantized (a patch-embedding ConvInteger is slower than the fp32 Conv). No calibration: `feeds`
    only measure the error and drive the same exclusion search as to_int8. Not for TensorRT.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    say = progress or (lambda msg: None)
    held = list(feeds)
    with tempfile.TemporaryDirectory(prefix=f"int8cpu-{graph}-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        large = is_large(src)
        pre_process(src, pre, large)

        def quantize(exclude: list[str], out: Path) -> None:
            if gemv:
                nbits_quantize(pre, out, 8, NBITS_BLOCK, exclude, large)
                return
            quantize_dynamic(
                str(pre), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True},
                use_external_data_format=large,
            )

        nodes = quantizable_nodes(pre, ("MatMul", "Gemm"), const_weight_only=True)
        result = search_graph(src, pre, quantize, held, (bound, min_top1), granularity, Path(tmp), say, nodes, [],
                              layer_groups)
        finish(result["path"], dst, "int8-cpu")
    form = ({"format": "ort-matmulnbits-int8", "block_size": NBITS_BLOCK, "accuracy_level": NBITS_ACCURACY_LEVEL} if gemv
            else {"format": "ort-dynamic-u8s8"})
    return {"precision": "int8-cpu", **form, "graph": graph,
            "measured_on_feeds": len(held), **describe(result, bound, min_top1)}

