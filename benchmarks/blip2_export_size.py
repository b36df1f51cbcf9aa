"""BLIP-2's graphs at real size: export OPT-2.7b's step and prefill graphs in fp16 (part `lm`) and the
image side, ViT-g/14 in fp16 and the Q-Former in fp32 (part `image`), and report each graph's size and
the export's peak memory, then check the graphs against their reference modules.

Why these numbers: blip2-opt-2.7b's LM is ~5.3 GB in fp16, over protobuf's 2 GB limit, so its graphs
exist only with external data (weights in `<graph>.onnx.data` beside the graph), and the question is
whether exporting them fits a 24 GB machine. Random weights (the sizes matter, not the values; no
checkpoint download): the LM is built on the meta device, materialized in fp16 and filled in place,
so the weights exist once in memory, as a streamed checkpoint load leaves them. The whole LM is
exported in one trace (not layer by layer and stitched): the same path `blip-export` takes.

Every stage runs in a subprocess of its own, which reports its peak resident memory (VmHWM, and
ru_maxrss) so that stages do not hide each other's peaks:
- export: build the module, trace the graph, gather torch's per-tensor files into one data file, run
  the ONNX checker on the path; the reference outputs of opt_step, vision and qformer on one small
  feed (batch 1) are saved.
- convert (vision only): the fp32 graph to fp16, see below.
- verify: ONNX Runtime (CPU) runs the exported graph on that feed and compares (relative error =
  max |ours - reference| / max |reference|, per output).

The image part: ViT-g (1408 wide, 39 layers, 16 heads, mlp 6144, 257 tokens at 224 px, ~1 B
parameters) cannot be traced in fp16 here: torch's CPU fp16 matmul runs at ~0.2 GFLOPS, and the trace
runs the model once over 2 x 257 tokens (hours). So it is traced in fp32 through the same export_graph
and converted by blip_export.precision.to_fp16 (blip-export's fp16: fp32 islands, fp32 graph I/O as
the table says), in a stage of its own; it is checked against the fp32 module. The Q-Former (768 wide,
12 layers, cross-attention to 1408 every 2nd layer, 32 queries) and language_projection (to 2560) stay
fp32, as transformers keeps the Q-Former.

    .venv/bin/python benchmarks/blip2_export_size.py [--parts lm|image|all] [--layers 32]
        [--vision-layers 39] [--work /tmp/blip2-size] [--json results.jsonl]
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
VERIFY_SIZES = {"batch": 1, "rows": 1, "text": 2, "prompt": Q + 3, "new": 1, "past": 3, "prefix": 0}
TRACE_SIZES = {"batch": 2, "rows": 2, "text": 3, "prompt": Q + 3, "new": Q + 2, "past": 5, "prefix": Q}
PARTS = {"lm": ("opt_step",), "image": ("vision", "qformer"), "all": ("vision", "qformer", "opt_step")}
VISION_LAYERS = 39  # ViT-g/14's; the other vision and Q-Former sizes are the config defaults (BLIP-2's)


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


def fill_random(module, seed: int = 0) -> None:
    """Random weights with a spread, as tests/oracle.py's rerandomize: std 0.02, embeddings and the
    learned queries x5, LayerNorm weights near 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("layer_norm" in name or "layernorm" in name or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = 5.0 if "embedding" in name or "query_tokens" in name else 1.0
                p.copy_(0.02 * scale * torch.randn(p.shape, generator=g))


def build_image_part(graph: str, vision_layers: int, seed: int = 0):
    """Blip2ForConditionalGeneration at blip2-opt-2.7b's sizes, built on the meta device, with only the
    modules of `graph` materialized in fp32 ("vision": vision_model; "qformer": query_tokens, qformer,
    language_projection) and filled with random weights; the others are dropped unmaterialized."""
    import torch

    from blip_export.families.blip2.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
    from blip_export.families.blip2.lm_config import OptConfig
    from blip_export.families.blip2.modeling.models import Blip2ForConditionalGeneration

    cfg = Blip2Config(architecture="Blip2ForConditionalGeneration",
                      vision_config=Blip2VisionConfig(num_hidden_layers=vision_layers),
                      qformer_config=Blip2QFormerConfig(), text_config=OptConfig(**OPT_27B))
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(cfg)
    model.language_model = None  # never materialized: the LM part measures it
    if graph == "vision":
        model.qformer = model.language_projection = None
        del model.query_tokens
    else:
        model.vision_model = None
    model = model.to_empty(device="cpu").eval()
    fill_random(model, seed)
    return model


def _wrapper(lm, name: str, d):
    from types import SimpleNamespace

    from blip_export.families.blip2.wrappers import OptStepGraph

    return OptStepGraph(SimpleNamespace(language_model=lm), d.image_token_id).eval()


def _sizes(out: Path) -> dict:
    import onnx

    from blip_export.files import EXTERNAL_DATA_THRESHOLD, graph_data_files, weight_bytes

    model = onnx.load(str(out), load_external_data=False)
    data = graph_data_files(out)
    weights = weight_bytes(model) if not data else sum(p.stat().st_size for p in data)
    return {"graph_file_mb": round(out.stat().st_size / 1e6, 2),
            "data_files": {p.name: round(p.stat().st_size / 1e9, 3) for p in data},
            "weight_gb": round(weights / 1e9, 3), "over_threshold": weights > EXTERNAL_DATA_THRESHOLD,
            "nodes": len(model.graph.node), "initializers": len(model.graph.initializer)}


def _save_reference(work: Path, graph: str, wrapper, spec, d) -> None:
    """The reference outputs on one small feed, for the verify stage."""
    import numpy as np

    from blip_export.families.blip2.export import random_feeds
    from blip_export.onnx_export import reference_outputs

    feeds = random_feeds(spec, d, VERIFY_SIZES, seed=1)
    ref = reference_outputs(wrapper, spec, feeds)
    np.savez(work / f"{graph}.verify.npz", **{f"in:{k}": v for k, v in feeds.items()},
             **{f"out:{k}": v for k, v in ref.items()})


def stage_export(args) -> dict:
    import torch

    from blip_export.bundle import check_onnx
    from blip_export.families.blip2.export import random_feeds
    from blip_export.families.blip2.wrappers import make_wrapper
    from blip_export.onnx_export import export_graph
    from blip_runtime.families.blip2.graphs import graphs

    work = Path(args.work)
    image = args.graph in PARTS["image"]
    dtype = "float32" if image else args.dtype  # the vision graph reaches fp16 in the convert stage
    d = dims(args.layers, dtype)
    spec = graphs(d, {"generate"})[args.graph]
    t0 = time.time()
    if image:
        module = build_image_part(args.graph, args.vision_layers)
        wrapper = make_wrapper(module, spec, d)
    else:
        module = build_lm(args.layers, {"float16": torch.float16, "float32": torch.float32}[dtype])
        wrapper = _wrapper(module, args.graph, d)
    built = time.time()
    # the vision graph is written in fp32 first, under another name
    out = work / (f"{args.graph}.fp32.onnx" if args.graph == "vision" else f"{args.graph}.onnx")
    export_graph(wrapper, spec, random_feeds(spec, d, TRACE_SIZES), out)
    exported = time.time()
    check_onnx(out)
    checked = time.time()
    if args.graph in ("opt_step", *PARTS["image"]):
        _save_reference(work, args.graph, wrapper, spec, d)
    referenced = time.time()
    return {"graph": args.graph, "dtype": dtype, **({} if image else {"layers": args.layers}),
            **({"vision_layers": args.vision_layers} if args.graph == "vision" else {}),
            "parameters": sum(p.numel() for p in module.parameters()), **_sizes(out),
            "seconds": {"build": round(built - t0, 1), "export": round(exported - built, 1),
                        "check": round(checked - exported, 1), "reference": round(referenced - checked, 1)},
            **peak_memory()}


def stage_convert(args) -> dict:
    """vision.fp32.onnx -> vision.onnx in fp16 (blip-export's conversion), the fp32 files removed."""
    from blip_export.bundle import check_onnx
    from blip_export.files import graph_data_files
    from blip_export.precision import to_fp16

    work = Path(args.work)
    src, dst = work / f"{args.graph}.fp32.onnx", work / f"{args.graph}.onnx"
    t0 = time.time()
    info = to_fp16(src, dst, args.graph)
    converted = time.time()
    check_onnx(dst)
    checked = time.time()
    for p in [src, *graph_data_files(src)]:
        p.unlink()
    return {"stage": "convert", "graph": args.graph, "dtype": "float16", **_sizes(dst),
            "kept_fp32_ops": info["kept_fp32_ops"], "fp16_nodes": info["fp16_nodes"],
            "seconds": {"convert": round(converted - t0, 1), "check": round(checked - converted, 1)},
            **peak_memory()}


def stage_verify(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    path = Path(args.work) / f"{args.graph}.onnx"
    saved = np.load(Path(args.work) / f"{args.graph}.verify.npz")
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
    if "logits" in ref:
        extra = {"logits_rel": worst["logits"][1],
                 "argmax_agrees": bool((ours["logits"].argmax(-1) == ref["logits"].argmax(-1)).all())}
    else:
        extra = {"rel_by_output": {n: float(f"{worst[n][1]:.3g}") for n in names}}
    print(f"{args.graph}: max abs error {max(e for e, _ in worst.values()):.3e}, relative error {worst[top][1]:.3e} "
          f"(worst output {top})", file=sys.stderr)
    return {"stage": "verify", "graph": args.graph, "max_abs": max(e for e, _ in worst.values()), "rel": worst[top][1],
            "worst_output": top, **extra, "output_dtypes": sorted({str(v.dtype) for v in ours.values()}),
            "seconds": {"session": round(loaded - t0, 1), "run": round(ran - loaded, 1)}, **peak_memory()}


def run_stage(stage: str, args, **extra) -> dict:
    """Run one stage in a child process; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(args.work), "--layers", str(args.layers),
           "--vision-layers", str(args.vision_layers), "--dtype", args.dtype, *(x for k, v in extra.items() for x in (f"--{k}", str(v)))]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"stage": stage, **extra, "failed": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


STAGES = {"export": stage_export, "convert": stage_convert, "verify": stage_verify}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=tuple(STAGES))
    ap.add_argument("--graph", default="opt_step", choices=PARTS["all"])
    ap.add_argument("--parts", default="all", choices=tuple(PARTS),
                    help="lm: opt_step; image: vision, qformer; all: both")
    ap.add_argument("--layers", type=int, default=OPT_27B["num_hidden_layers"], help="OPT decoder layers")
    ap.add_argument("--vision-layers", type=int, default=VISION_LAYERS, help="ViT-g layers")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="the LM's dtype")
    ap.add_argument("--work", type=Path, default=Path("/tmp/blip2-size"))
    ap.add_argument("--graphs", help="comma-separated graphs of --parts (default: all of them)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, help="append the results as one JSON line here")
    args = ap.parse_args()
    if args.stage:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(STAGES[args.stage](args)))
        return
    chosen = args.graphs.split(",") if args.graphs else list(PARTS[args.parts])
    unknown = [g for g in chosen if g not in PARTS[args.parts]]
    if unknown:
        ap.error(f"--graphs: {unknown} not in part {args.parts!r}, expected some of {list(PARTS[args.parts])}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for graph in chosen:
            results.append(run_stage("export", args, graph=graph))
            if graph == "vision" and "failed" not in results[-1]:
                results.append(run_stage("convert", args, graph=graph))
            verified = graph in ("opt_step", *PARTS["image"])
            if verified and not args.no_verify and "failed" not in results[-1]:
                results.append(run_stage("verify", args, graph=graph))
            if not args.keep:  # one multi-GB graph on disk at a time
                for p in args.work.glob(f"{graph}.*"):
                    p.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"parts": args.parts, "layers": args.layers, "vision_layers": args.vision_layers,
                                "dtype": args.dtype, "results": results}) + "\n")


if __name__ == "__main__":
    main()
