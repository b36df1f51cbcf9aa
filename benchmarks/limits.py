"""The machine's limits, measured in the same run as the benchmark, and the model's work in the same
units, so a time can be judged against what the hardware allows:

- matmul rate: fp32 GEMM at 4096^3 on THREADS threads, best of several runs, the faster of torch
  (MKL) and onnxruntime (MLAS). numpy is not used: its OpenBLAS may run with OPENBLAS_CORETYPE
  forced to an older core.
  The vision graph is compute bound; its FLOPs over its time, as a share of this rate, is its efficiency.
- int8 GEMM rate: the same 4096^3 product through ONNX Runtime's integer kernels, the ones the int8-cpu
  graphs use: MatMulInteger (u8 activations x s8 weights -> int32, what the vision graph runs after
  DynamicQuantizeLinear) and com.microsoft MatMulIntegerToFloat (the same with the dequantizing scale
  fused). The CPU's int8 dot-product extensions (VNNI, AMX) are listed beside it: they set this rate.
- memory bandwidth: best of a numpy copy (read + write bytes) and a torch 2-thread sum (read only)
  of 512 MiB arrays. One decoder step with a short cache is bound by reading the decoder's weights
  once, so weight bytes / bandwidth is the floor of a per-token decode step.

    python -m benchmarks.limits [--quick] [--out limits.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .contenders import THREADS


def best_seconds(fn, runs: int) -> float:
    fn()  # warm-up: page faults, thread pools
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_gemm(n: int, runs: int) -> float:
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), runs) / 1e9


def ort_gemm(n: int, runs: int) -> float:
    """The same GEMM through ONNX Runtime's own kernel (MLAS), which is what our graphs use."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [b])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.ones((n, n), np.float32)
    return 2 * n**3 / best_seconds(lambda: sess.run(None, {"a": a}), runs) / 1e9


def _ort_session(nodes, inputs, outputs, initializers, opsets):
    import onnxruntime as ort
    from onnx import helper

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    graph = helper.make_graph(nodes, "gemm", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_int8_gemm(n: int, runs: int, fused_scale: bool) -> float:
    """GOP/s (2 n^3 multiply-adds) of u8 [n, n] x s8 [n, n] on ONNX Runtime's CPU integer GEMM;
    fused_scale: MatMulIntegerToFloat (float output, scales applied in the kernel) instead of MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    inits = [b, numpy_helper.from_array(np.uint8(128), "a_zp"), numpy_helper.from_array(np.int8(0), "b_zp")]
    a_info = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
    if fused_scale:
        inits += [numpy_helper.from_array(np.float32(0.01), "a_scale"), numpy_helper.from_array(np.float32(0.02), "b_scale")]
        node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "a_scale", "b_scale", "a_zp", "b_zp"], ["c"],
                                domain="com.microsoft")
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    else:
        node = helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["c"])
        out = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
    sess = _ort_session([node], [a_info], [out], inits, {"": 17, "com.microsoft": 1})
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return 2 * n**3 / best_seconds(lambda: sess.run(None, {"a": a}), runs) / 1e9


def int8_extensions() -> list[str]:
    """The CPU's int8 dot-product extensions, from /proc/cpuinfo's flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "avx512_bf16", "amx_bf16") if f in flags]


def int8_rate(n: int = 4096, runs: int = 5) -> dict:
    """The int8 GEMM rate: the faster of ORT's MatMulInteger and MatMulIntegerToFloat."""
    rates = {"onnxruntime MatMulInteger (u8s8)": ort_int8_gemm(n, runs, False),
             "onnxruntime MatMulIntegerToFloat (u8s8)": ort_int8_gemm(n, runs, True)}
    kernel = max(rates, key=rates.get)
    return {"gops": rates[kernel], "kernel": kernel, "by_kernel": rates, "size": n, "threads": THREADS,
            "extensions": int8_extensions()}


def matmul_rate(n: int = 4096, runs: int = 5) -> dict:
    """The best of torch (MKL) and ONNX Runtime (MLAS): the rate this machine can reach."""
    import torch

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    rates = {f"torch.mm ({blas.group(1) if blas else '?'})": torch_gemm(n, runs),
             "onnxruntime MatMul (MLAS)": ort_gemm(n, runs)}
    kernel = max(rates, key=rates.get)
    return {"gflops": rates[kernel], "kernel": kernel, "by_kernel": rates, "size": n, "threads": THREADS}


def bandwidth(mib: int = 512, runs: int = 5) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), runs) / 1e9
    t = torch.from_numpy(src)
    read = src.nbytes / best_seconds(lambda: t.sum(), runs) / 1e9
    return {"gbps": max(copy, read), "copy_gbps": copy, "read_gbps": read, "mib": mib}


def vision_flops(config: dict, batch: int = 1) -> float:
    """Multiply-adds x 2 of the ViT from its config: patch embedding and, per layer, QKV,
    attention scores, attention x V, output projection and the two MLP matmuls (N tokens)."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    size, patch = config["image_size"], config["patch_size"]
    patches = (size // patch) ** 2
    n = patches + 1  # + [CLS]
    embed = 2 * patches * (3 * patch * patch) * d
    layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * inter
    return batch * (embed + layers * layer)


def graph_weight_bytes(path: Path) -> dict:
    """Bytes of a graph's initializers from their shapes and types (external data is not read), split into
    tables only ever gathered from (one row per token) and the rest, which a step reads whole."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    read = gathered = 0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            size //= 2
        if consumers[init.name] == {"Gather"}:
            gathered += size
        else:
            read += size
    return {"read_bytes": read, "gathered_bytes": gathered}


def measure(quick: bool = False) -> dict:
    """quick: small sizes, for smoke runs (the numbers then understate the machine)."""
    sizes = dict(n=1024, runs=2), dict(mib=64, runs=2)
    return {"matmul": matmul_rate(**sizes[0]) if quick else matmul_rate(),
            "int8": int8_rate(**sizes[0]) if quick else int8_rate(),
            "bandwidth": bandwidth(**sizes[1]) if quick else bandwidth(), "quick": quick,
            "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS") if k in os.environ}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args()
    text = json.dumps(measure(args.quick), indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
