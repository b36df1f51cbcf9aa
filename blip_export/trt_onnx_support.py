"""Which ONNX operators and data types TensorRT's ONNX parser takes: checked before building engines
(and by tests on every exported graph), so an unsupported node fails with its name, not deep inside
the TensorRT build.

Source: onnx/onnx-tensorrt, docs/operators.md of the TensorRT 10 parser (branch 10.1-GA, commit
96e781103cfc4adf4a6bb557e94bac8e693f6f4c, "ONNX-TensorRT 10.1 GA release"):
https://github.com/onnx/onnx-tensorrt/blob/10.1-GA/docs/operators.md
It states: opsets 9 to 20; data types DOUBLE (cast down to FLOAT), FLOAT32, FLOAT16, BFLOAT16,
INT32, INT64, FP8, INT8, INT4, UINT8 and BOOL, where INT8, INT4 and FP8 exist only through
quantization (Q/DQ) and UINT8 only as a network input or output. SUPPORTED below is its table,
rows marked "Y" only, with the "Supported Types" column as written (its "INF64" typo for
ConstantOfShape read as INT64). The restrictions checked are the table's "must be an initializer /
constant" and "only the first output" notes. TensorRT 11 keeps these operators (and adds some);
writing against the TensorRT 10 list keeps the graphs buildable on both.
"""

from __future__ import annotations

import onnx
import onnx.numpy_helper

OPSETS = range(9, 21)  # default-domain opsets the TensorRT 10 parser reads
DOMAINS = ("", "ai.onnx")  # anything else (com.microsoft, ...) would need a TensorRT plugin

# TensorProto element type -> the type names of operators.md
TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.INT4: "INT4", onnx.TensorProto.DOUBLE: "DOUBLE",
}
QUANTIZED = {"INT8", "INT4", "FP8"}  # only between QuantizeLinear and DequantizeLinear
CONSTANT_INPUTS = {  # op -> (input index, what operators.md calls it) that must be an initializer/constant
    "CumSum": (1, "axis"), "Pad": (3, "axes"), "Slice": (3, "axes"), "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"), "Dropout": (2, "training_mode"),
    **{op: (1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}

SUPPORTED = {
    "Abs": "FP32 FP16 BF16 INT32 INT64",
    "Acos": "FP32 FP16 BF16",
    "Acosh": "FP32 FP16 BF16",
    "Add": "FP32 FP16 BF16 INT32 INT64",
    "And": "BOOL",
    "ArgMax": "FP32 FP16 BF16 INT32 INT64",
    "ArgMin": "FP32 FP16 BF16 INT32 INT64",
    "Asin": "FP32 FP16 BF16",
    "Asinh": "FP32 FP16 BF16",
    "Atan": "FP32 FP16 BF16",
    "Atanh": "FP32 FP16 BF16",
    "AveragePool": "FP32 FP16 BF16",
    "BatchNormalization": "FP32 FP16 BF16",
    "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "Ceil": "FP32 FP16 BF16",
    "Celu": "FP32 FP16 BF16",
    "Clip": "FP32 FP16 BF16",
    "Concat": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Constant": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Conv": "FP32 FP16 BF16",
    "ConvTranspose": "FP32 FP16 BF16",
    "Cos": "FP32 FP16 BF16",
    "Cosh": "FP32 FP16 BF16",
    "CumSum": "FP32 FP16 BF16",
    "DeformConv": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 BF16 INT32 INT64",
    "DequantizeLinear": "INT8 FP8 INT4",
    "Div": "FP32 FP16 BF16 INT32 INT64",
    "Dropout": "FP32 FP16 BF16",
    "Einsum": "FP32 FP16 BF16",
    "Elu": "FP32 FP16 BF16",
    "Equal": "FP32 FP16 BF16 INT32 INT64",
    "Erf": "FP32 FP16 BF16",
    "Exp": "FP32 FP16 BF16",
    "Expand": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "EyeLike": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Flatten": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Floor": "FP32 FP16 BF16",
    "Gather": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherElements": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherND": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64",
    "Gemm": "FP32 FP16 BF16",
    "GlobalAveragePool": "FP32 FP16 BF16",
    "GlobalLpPool": "FP32 FP16 BF16",
    "GlobalMaxPool": "FP32 FP16 BF16",
    "Greater": "FP32 FP16 BF16 INT32 INT64",
    "GreaterOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "GridSample": "FP32 FP16",
    "GroupNormalization": "FP32 FP16 BF16",
    "GRU": "FP32 FP16 BF16",
    "HardSigmoid": "FP32 FP16 BF16",
    "HardSwish": "FP32 FP16 BF16",
    "Hardmax": "FP32 FP16 BF16",
    "Identity": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "If": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ImageScaler": "FP32 FP16 BF16",
    "InstanceNormalization": "FP32 FP16 BF16",
    "IsInf": "FP32 FP16 BF16",
    "IsNaN": "FP32 FP16 BF16 INT32 INT64",
    "LayerNormalization": "FP32 FP16 BF16",
    "LeakyRelu": "FP32 FP16 BF16",
    "Less": "FP32 FP16 BF16 INT32 INT64",
    "LessOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "Log": "FP32 FP16 BF16",
    "LogSoftmax": "FP32 FP16 BF16",
    "Loop": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "LRN": "FP32 FP16 BF16",
    "LSTM": "FP32 FP16 BF16",
    "LpNormalization": "FP32 FP16 BF16",
    "LpPool": "FP32 FP16 BF16",
    "MatMul": "FP32 FP16 BF16",
    "Max": "FP32 FP16 BF16 INT32 INT64",
    "MaxPool": "FP32 FP16 BF16",
    "Mean": "FP32 FP16 BF16 FP8 INT32 INT64",
    "MeanVarianceNormalization": "FP32 FP16 BF16",
    "Min": "FP32 FP16 BF16 INT32 INT64",
    "Mish": "FP32 FP16",
    "Mod": "FP32 FP16 BF16 INT32 INT64",
    "Mul": "FP32 FP16 BF16 INT32 INT64",
    "Neg": "FP32 FP16 BF16 INT32 INT64",
    "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16",
    "Not": "BOOL",
    "OneHot": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Or": "BOOL",
    "Pad": "FP32 FP16 BF16 INT32 INT64",
    "ParametricSoftplus": "FP32 FP16 BF16",
    "Pow": "FP32 FP16 BF16",
    "PRelu": "FP32 FP16 BF16",
    "QuantizeLinear": "FP32 FP16 BF16",
    "RandomNormal": "FP32 FP16 BF16",
    "RandomNormalLike": "FP32 FP16 BF16",
    "RandomUniform": "FP32 FP16 BF16",
    "RandomUniformLike": "FP32 FP16 BF16",
    "Range": "FP32 FP16 BF16 INT32 INT64",
    "Reciprocal": "FP32 FP16 BF16",
    "ReduceL1": "FP32 FP16 BF16 INT32 INT64",
    "ReduceL2": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSumExp": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMax": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMean": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMin": "FP32 FP16 BF16 INT32 INT64",
    "ReduceProd": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSumSquare": "FP32 FP16 BF16 INT32 INT64",
    "Relu": "FP32 FP16 BF16 INT32 INT64",
    "Reshape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Resize": "FP32 FP16 BF16",
    "ReverseSequence": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "RNN": "FP32 FP16 BF16",
    "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 BF16",
    "ScaledTanh": "FP32 FP16 BF16",
    "Scan": "FP32 FP16 BF16",
    "Scatter": "FP32 FP16 BF16 INT32 INT64",
    "ScatterElements": "FP32 FP16 BF16 INT32 INT64",
    "ScatterND": "FP32 FP16 BF16 INT32 INT64",
    "Selu": "FP32 FP16 BF16",
    "Shape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Shrink": "FP32 FP16 BF16 INT32 INT64",
    "Sigmoid": "FP32 FP16 BF16",
    "Sign": "FP32 FP16 BF16 INT32 INT64",
    "Sin": "FP32 FP16 BF16",
    "Sinh": "FP32 FP16 BF16",
    "Size": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Slice": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Softmax": "FP32 FP16 BF16",
    "Softplus": "FP32 FP16 BF16",
    "Softsign": "FP32 FP16 BF16",
    "SpaceToDepth": "FP32 FP16 BF16 INT32 INT64",
    "Split": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sqrt": "FP32 FP16 BF16",
    "Squeeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sub": "FP32 FP16 BF16 INT32 INT64",
    "Sum": "FP32 FP16 BF16 INT32 INT64",
    "Tan": "FP32 FP16 BF16",
    "Tanh": "FP32 FP16 BF16",
    "ThresholdedRelu": "FP32 FP16 BF16",
    "Tile": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "TopK": "FP32 FP16 BF16 INT32 INT64",
    "Transpose": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Trilu": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Unsqueeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Upsample": "FP32 FP16 BF16",
    "Where": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Xor": "BOOL",
}

_DATA_ONLY = {"QuantizeLinear": 1, "DequantizeLinear": 1}  # scale / zero point follow their own rules


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> TensorProto element type, for every tensor ONNX shape inference can type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        types[node.output[0]] = a.t.data_type
            for sub in _subgraphs(node):
                visit(sub)

    visit(inferred.graph)
    return types


def problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT's ONNX parser would refuse in `model`, one line each; empty when all is supported."""
    out: list[str] = []
    for opset in model.opset_import:
        if opset.domain in DOMAINS and opset.version not in OPSETS:
            out.append(f"opset {opset.version}: TensorRT 10 reads opsets {OPSETS.start} to {OPSETS.stop - 1}")
    used = {name for node in model.graph.node for name in node.input}
    for v in model.graph.input:  # TensorRT drops an unused input: the engine's I/O would not match the table
        if v.name not in used and v.name not in {t.name for t in model.graph.initializer}:
            out.append(f"graph input {v.name!r} is not used; TensorRT would drop it from the engine")
    for v in model.graph.output:
        if v.name in {i.name for i in model.graph.input}:
            out.append(f"graph output {v.name!r} is a graph input; TensorRT needs it computed")
    types = _element_types(model)
    named = lambda t: TYPE_NAMES.get(t, onnx.TensorProto.DataType.Name(t))  # noqa: E731

    def visit(graph: onnx.GraphProto) -> None:
        constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        io = {v.name for v in (*graph.input, *graph.output)}
        for node in graph.node:
            where = f"{node.op_type} node {node.name or node.output[0]!r}"
            if node.domain not in DOMAINS:
                out.append(f"{where}: domain {node.domain!r} needs a TensorRT plugin")
                continue
            allowed = SUPPORTED.get(node.op_type)
            if allowed is None:
                out.append(f"{where}: operator not supported by TensorRT's ONNX parser")
                continue
            allowed = set(allowed.split())
            checked = node.input[: _DATA_ONLY.get(node.op_type, len(node.input))]
            for i, name in enumerate(node.input):
                t = named(types[name]) if name in types else None
                if t is None:
                    continue
                if t in QUANTIZED:
                    if node.op_type not in ("DequantizeLinear", "QuantizeLinear") or (node.op_type, i) == ("QuantizeLinear", 0):
                        out.append(f"{where}: input {name!r} is {t}, which TensorRT takes only through Q/DQ")
                elif name in checked and t not in allowed:
                    out.append(f"{where}: input {name!r} is {t}; TensorRT's {node.op_type} takes {', '.join(sorted(allowed))}")
            for name in node.output:
                t = named(types[name]) if name in types else None
                if t is None:
                    continue
                if t not in TYPE_NAMES.values():
                    out.append(f"{where}: output {name!r} is {t}, a type TensorRT does not have")
                elif t in QUANTIZED and node.op_type not in ("QuantizeLinear", "Constant"):
                    out.append(f"{where}: output {name!r} is {t}, which TensorRT makes only with QuantizeLinear")
                elif t == "UINT8" and name not in io and node.op_type != "Cast":
                    out.append(f"{where}: output {name!r} is UINT8, which TensorRT allows only as graph I/O")
                elif t == "DOUBLE":
                    out.append(f"{where}: output {name!r} is DOUBLE, which TensorRT silently casts down to FP32")
            if node.op_type in CONSTANT_INPUTS:
                index, what = CONSTANT_INPUTS[node.op_type]
                if len(node.input) > index and node.input[index] and node.input[index] not in constants:
                    out.append(f"{where}: `{what}` must be an initializer or Constant for TensorRT")
            if node.op_type == "LayerNormalization" and any(n for n in node.output[1:]
                                                          if consumers.get(n) or n in io):
                out.append(f"{where}: TensorRT supports only the first output (Y)")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
                zero = next((t for t in graph.initializer if t.name == node.input[2]), None)
                if zero is None or onnx.numpy_helper.to_array(zero).any():
                    out.append(f"{where}: the zero point must be a zero initializer for TensorRT")
            for sub in _subgraphs(node):
                visit(sub)
        for t in graph.initializer:  # quantized weights: DQ inputs; zero points: also a Q's third input
            if named(t.data_type) in QUANTIZED and any(
                    c.op_type != "DequantizeLinear" and not (c.op_type == "QuantizeLinear" and list(c.input[2:3]) == [t.name])
                    for c in consumers.get(t.name, [])):
                out.append(f"initializer {t.name}: {named(t.data_type)} weights must feed DequantizeLinear only")

    visit(model.graph)
    return out
