"""BLIP-2's LM graphs at real size: export OPT-2.7b's step and prefill graphs in fp16 and report
each graph's size and the export's peak memory, then check the step graph against its reference.

Why these numbers: blip2-opt-2.7b's LM is ~5.3 GB in fp16, over protobuf's 2 GB limit, so its graphs
exist only with external data (weights in `<graph>.onnx.data` beside the graph), and the question is
whether exporting them fits a 24 GB machine. Random weights (the sizes matter, not the values; no
checkpoint download): the LM is built on the meta device, materialized in fp16 and filled in place,
so the weights exist once in memory, as a streamed checkpoint load leaves them. The whole LM is
exported in one trace (not layer by layer and stitched): the same path `blip-export` takes.

Every stage runs in a subprocess of its own, which reports its peak resident memory (VmHWM, and
ru_maxrss) so that stages do not hide each other's peaks:
- export: build the LM, trace the graph, gather torch's per-tensor files into one data file, run
  the ONNX checker on the path; the step graph's reference outputs on one small feed are saved.
- verify: ONNX Runtime (CPU) runs the exported step graph on that feed and compares.

    .venv/bin/python benchmarks/blip2_export_size.py [--layers 32] [--work /tmp/blip2-size]
        [--results benchmarks/RESULTS_blip2_export.md]
The multi-GB files are removed at the end (--keep leaves them).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# OPT-2.7b as blip2-opt-2.7b has it (its vocabulary 50272 here, the checkpoint's padded 50304 aside)
OPT_27B = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, vocab_size=50272,
               max_position_embeddings=2048)
Q = 32  # BLIP-2's query tokens: the image prefix of the prompt
VERIFY_SIZES = {"batch": 1, "rows": 1, "text": 2, "prompt": Q + 3, "new": 1, "past": 3}
TRACE_SIZES = {"batch": 2, "rows": 2, "text": 3, "prompt": Q + 3, "new": 2, "past": 5}


def peak_memory() -> dict:
    """This process's peak resident set: VmHWM from /proc and ru_maxrss, in GB."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"vmhwm_gb": round(hwm / 1e6, 2), "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def dims(layers: int, dtype: str):
    from blip_runtime.families.blip2.graphs import Blip2Dims

    c = OPT_27B
    return Blip2Dims(image_size=224, num_image_tokens=257, vision_hidden=1408, num_query_tokens=Q, qformer_hidden=768,
                     qformer_vocab_size=30523, lm="opt", lm_hidden=c["hidden_size"], lm_layers=layers,
                     lm_heads=c["num_attention_heads"], lm_head_dim=c["hidden_size"] // c["num_attention_heads"],
                     vocab_size=c["vocab_size"], image_token_id=c["vocab_size"],
                     max_position_embeddings=c["max_position_embeddings"], lm_dtype=dtype)


def build_lm(layers: int, dtype, seed: int = 0):
    """OPT at OPT_27B's width with `layers` layers, random weights in `dtype` (std 0.02, LayerNorm
    weights near 1), head tied to the token table as in OPT checkpoints."""
    import torch

    from blip_export.families.blip2.lm_config import OptConfig
    from blip_export.families.blip2.modeling.opt import OptForCausalLM

    with torch.device("meta"):  # no init pass over 2.7 B parameters: they are filled below
        lm = OptForCausalLM(OptConfig(**{**OPT_27B, "num_hidden_layers": layers})).to(dtype)
    lm = lm.to_empty(device="cpu").eval()
    lm.lm_head.weight = lm.model.decoder.embed_tokens.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:  # drawn in fp32 one tensor at a time (torch has no fp16 generator on the CPU)
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return lm


def _wrapper(lm, name: str, d):
    from types import SimpleNamespace

    from blip_export.families.blip2.wrappers import OptPrefillGraph, OptStepGraph

    model = SimpleNamespace(language_model=lm)
    return OptStepGraph(model).eval() if name == "opt_step" else OptPrefillGraph(model, d.image_token_id).eval()


def stage_export(args) -> dict:
    import numpy as np
    import onnx
    import torch

    from blip_export.bundle import check_onnx
    from blip_export.families.blip2.export import random_feeds
    from blip_export.files import graph_data_files
    from blip_export.onnx_export import export_graph, reference_outputs
    from blip_runtime.families.blip2.graphs import graphs

    dtype = {"float16": torch.float16, "float32": torch.float32}[args.dtype]
    d = dims(args.layers, args.dtype)
    spec = graphs(d, {"generate"})[args.graph]
    t0 = time.time()
    lm = build_lm(args.layers, dtype)
    built = time.time()
    wrapper = _wrapper(lm, args.graph, d)
    out = Path(args.work) / f"{args.graph}.onnx"
    export_graph(wrapper, spec, random_feeds(spec, d, TRACE_SIZES), out)
    exported = time.time()
    check_onnx(out)
    checked = time.time()
    if args.graph == "opt_step":  # the reference on one small feed, for the verify stage
        feeds = random_feeds(spec, d, VERIFY_SIZES, seed=1)
        ref = reference_outputs(wrapper, spec, feeds)
        np.savez(Path(args.work) / "verify.npz", **{f"in:{k}": v for k, v in feeds.items()},
                 **{f"out:{k}": v for k, v in ref.items()})
    data = graph_data_files(out)
    model = onnx.load(str(out), load_external_data=False)
    return {"graph": args.graph, "dtype": args.dtype, "layers": args.layers,
            "parameters": sum(p.numel() for p in lm.parameters()),
            "graph_file_mb": round(out.stat().st_size / 1e6, 2),
            "data_files": {p.name: round(p.stat().st_size / 1e9, 3) for p in data},
            "nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "seconds": {"build": round(built - t0, 1), "export": round(exported - built, 1),
                        "check": round(checked - exported, 1)},
            **peak_memory()}


def stage_verify(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    path = Path(args.work) / "opt_step.onnx"
    saved = np.load(Path(args.work) / "verify.npz")
    feeds = {k[3:]: saved[k] for k in saved.files if k.startswith("in:")}
    ref = {k[4:]: saved[k] for k in saved.files if k.startswith("out:")}
    t0 = time.time()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    loaded = time.time()
    names = list(ref)
    ours = dict(zip(names, session.run(names, feeds)))
    ran = time.time()
    worst = {}
    for name in names:
        o, r = ours[name].astype(np.float64), ref[name].astype(np.float64)
        err = float(np.abs(o - r).max())
        worst[name] = (err, err / max(float(np.abs(r).max()), 1e-30))
    top = max(worst, key=lambda n: worst[n][1])
    return {"stage": "verify", "max_abs": max(e for e, _ in worst.values()), "rel": worst[top][1], "worst_output": top,
            "logits_rel": worst["logits"][1], "argmax_agrees": bool(ours["logits"].argmax(-1) == ref["logits"].argmax(-1)),
            "output_dtypes": sorted({str(v.dtype) for v in ours.values()}),
            "seconds": {"session": round(loaded - t0, 1), "run": round(ran - loaded, 1)}, **peak_memory()}


def run_stage(stage: str, args, **extra) -> dict:
    """Run one stage in a child process; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(args.work), "--layers", str(args.layers),
           "--dtype", args.dtype, *(x for k, v in extra.items() for x in (f"--{k}", str(v)))]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"stage": stage, **extra, "failed": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("export", "verify"))
    ap.add_argument("--graph", default="opt_step", choices=("opt_step", "opt_prefill"))
    ap.add_argument("--layers", type=int, default=OPT_27B["num_hidden_layers"])
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/blip2-size"))
    ap.add_argument("--graphs", default="opt_step,opt_prefill")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, help="append the results as one JSON line here")
    args = ap.parse_args()
    if args.stage:
        sys.path.insert(0, str(ROOT))
        result = stage_export(args) if args.stage == "export" else stage_verify(args)
        print(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for graph in args.graphs.split(","):
            results.append(run_stage("export", args, graph=graph))
            if graph == "opt_step" and not args.no_verify and "failed" not in results[-1]:
                results.append(run_stage("verify", args))
            if not args.keep:  # one multi-GB graph on disk at a time
                for p in args.work.glob(f"{graph}.onnx*"):
                    p.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"layers": args.layers, "dtype": args.dtype, "results": results}) + "\n")


if __name__ == "__main__":
    main()
