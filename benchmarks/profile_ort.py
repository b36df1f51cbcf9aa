"""Where ONNX Runtime spends a graph's time, per operator type (SessionOptions.enable_profiling),
for the two graphs the targets are about: `vision` (compute bound) and `decoder_step` (bound by
reading weights). With --fusions it also times the same graph after onnxruntime's transformer
optimizer (attention / LayerNorm / GELU fusions), to show what that optimization would buy.

    python -m benchmarks.profile_ort [--scale tiny] [--fusions] [--out profile.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from blip_runtime.graphs import random_feeds
from blip_runtime.manifest import load_manifest

from . import models
from .cases import NEW_TOKENS
from .contenders import THREADS

RUNS = 5


def feeds_for(manifest, graph: str) -> dict:
    """Batch 1; the decoder step at half the forced caption length of cache, over all image tokens."""
    dims = manifest.dims
    sizes = {"batch": 1, "text": 1, "past": NEW_TOKENS // 2, "enc": dims.num_image_tokens}
    return random_feeds(manifest.graphs[graph], sizes, seed=0)


def session(path: Path, profile_dir: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / path.stem)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess, feeds: dict, runs: int = RUNS) -> float:
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def profile(path: Path, feeds: dict, runs: int = RUNS) -> dict:
    """Per op type: ms per run, share of the kernel time and node count; per MatMul shape: ms per
    run, the GFLOP/s it reached and the rate at which it read its B operand (weights, or K/V),
    from the shapes the profiler records."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, tmp)
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the first is the warm-up
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run, nodes = [defaultdict(float) for _ in runs], defaultdict(set)
    gemm_runs, gemm_flops, gemm_nodes = [defaultdict(float) for _ in runs], {}, defaultdict(set)
    for e in kernels:
        op = e["args"]["op_name"]
        for i, run in enumerate(runs):
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                per_run[i][op] += e["dur"] / 1000
                nodes[op].add(e["name"])
                if op in ("MatMul", "FusedMatMul"):
                    # A [.., M, K] (B is an initializer or the second input); out [.., M, N]
                    ins, out = e["args"]["input_type_shape"], e["args"]["output_type_shape"][0]
                    a, out = next(iter(ins[0].values())), next(iter(out.values()))
                    key = f"{op} {'×'.join(map(str, a))} → {'×'.join(map(str, out))}"
                    # one recorded input: B is a constant fp32 weight [K, N]; two: B is [.., K, N] per batch
                    weight = len(ins) == 1
                    b_bytes = 4 * a[-1] * out[-1] * (1 if weight else int(np.prod(out[:-2])))
                    gemm_flops[key] = (2 * int(np.prod(out)) * a[-1], b_bytes, weight)
                    gemm_runs[i][key] += e["dur"] / 1000
                    gemm_nodes[key].add(e["name"])
    # median over runs per op type: one preempted run must not move the picture
    per_op = {op: float(np.median([r.get(op, 0.0) for r in per_run])) for op in nodes}
    total = sum(per_op.values())
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])
    gemms = []
    for key, (flops, b_bytes, weight) in gemm_flops.items():
        ms = float(np.median([r.get(key, 0.0) for r in gemm_runs]))
        n, rate = len(gemm_nodes[key]), 1e-9 / (ms / 1000) if ms else 0.0
        gemms.append({"shape": key, "nodes": n, "ms": ms, "gflops": n * flops * rate, "b_gbps": n * b_bytes * rate,
                      "weight": weight})
    return {
        "run_ms": float(np.median([r["dur"] for r in runs])) / 1000,
        "kernel_ms": total,
        "ops": [{"op": op, "ms": ms, "share": ms / total, "nodes": len(nodes[op])} for op, ms in ops],
        "gemms": sorted(gemms, key=lambda g: -g["ms"]),
    }


def fused(path: Path, config: dict, graph: str, out: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    part = config["vision_config" if graph == "vision" else "text_config"]
    kind, heads, hidden = "vit" if graph == "vision" else "bert", part["num_attention_heads"], part["hidden_size"]
    model = optimize_model(str(path), model_type=kind, num_heads=heads, hidden_size=hidden, opt_level=0)
    model.save_model_to_file(str(out))
    return out


def main(scale: str = "base", fusions: bool = False) -> dict:
    bundle = models.bundle(scale, "caption", "fp32")
    manifest = load_manifest(bundle)
    config = json.loads((models.folder(scale, "caption") / "ckpt" / "config.json").read_text())
    result = {}
    for graph in ("vision", "decoder_step"):
        path = manifest.graph_path(graph)
        feeds = feeds_for(manifest, graph)
        entry = profile(path, feeds)
        shown = ("pixel_values", "input_ids", "past_key.0", "cross_key.0")
        entry["shapes"] = {k: list(v.shape) for k, v in feeds.items() if k in shown}
        if fusions:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    opt = fused(path, config, graph, Path(tmp) / f"{graph}-fused.onnx")
                    base_ms, fused_ms = median_ms(session(path), feeds), median_ms(session(opt), feeds)
                    entry["fusions"] = {"base_ms": base_ms, "fused_ms": fused_ms,
                                        "fused_profile": profile(opt, feeds)["ops"][:8]}
            except Exception as e:  # the optimizer is a what-if; its failure is a finding, not a crash
                entry["fusions"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        result[graph] = entry
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("base", "tiny"), default="base")
    p.add_argument("--fusions", action="store_true")
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout (the optimizer prints)")
    args = p.parse_args()
    text = json.dumps(main(args.scale, args.fusions), indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
