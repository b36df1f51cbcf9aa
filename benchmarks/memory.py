"""Resident memory of a running bundle against transformers, per ONNX Runtime memory option.

Every (contender, option) runs in a process of its own (RSS and ru_maxrss are then its own):
load the caption model, run the benchmark's caption cases once each (greedy, 3 beams, batch 8; 20 new
tokens), and report the RSS after load, the peak during load (ru_maxrss right after it), the peak
after each case and the time from load to the first caption. `--paired` then loads
ONNX Runtime's defaults and the chosen options in one process and alternates caption runs, timing the decoder
step of each, so that an option that saves memory is seen not to slow the step. Writes
RESULTS_memory.md (and memory.json) here.

    python -m benchmarks.memory [--scale base] [--kinds fp32,int8-cpu] [--options ort-defaults,runtime,no-arena,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from . import models
from .cases import CASES
from .contenders import THREADS

HERE = Path(__file__).resolve().parent
CASE = next(c for c in CASES if c.name == "caption-greedy")  # the paired decoder-step timing's case
CAPTION = [c for c in CASES if c.model == "caption"]  # greedy, beam3, batch8: as the benchmark runs them
# name -> ONNX Runtime memory options (blip_runtime.session.MEMORY_OPTIONS keys); "runtime" is
# what OrtSession uses (MEMORY_OPTIONS), "ort-defaults" ONNX Runtime's own (before MEMORY_OPTIONS).
OPTIONS = {
    "runtime": None,
    "ort-defaults": {},  # arena on, prepacking on
    "no-arena": {"enable_cpu_mem_arena": False},
    "no-prepack": {"session.disable_prepacking": "1"},
    "init-device-alloc": {"session.use_device_allocator_for_initializers": "1"},
    "no-mem-pattern": {"enable_mem_pattern": False},
    "no-arena+init-device-alloc": {"enable_cpu_mem_arena": False,
                                   "session.use_device_allocator_for_initializers": "1"},
    "no-arena+no-prepack": {"enable_cpu_mem_arena": False, "session.disable_prepacking": "1"},
    "no-arena+no-mem-pattern": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(scale: str, contender: str, option: str) -> dict:
    """One measurement, in this process: contender "transformers" or a bundle kind."""
    from .cases import images

    base = rss_mb()
    start = time.perf_counter()
    if contender == "transformers":
        from .contenders import TransformersContender

        c = TransformersContender()
        c.load(scale, CASE.model)
        run = c.run
    else:
        rt = load_runtime(scale, contender, OPTIONS[option])
        run = lambda case, imgs: rt.caption_tokens(imgs, **case.generation)  # noqa: E731
    load_s = time.perf_counter() - start
    after_load, load_peak = rss_mb(), peak_mb()
    first, cases = None, {}
    for case in CAPTION:  # one run each; the peak so far after each
        start = time.perf_counter()
        tokens = run(case, images(case.batch, seed=1))
        cases[case.name] = {"peak_mb": peak_mb(), "seconds": time.perf_counter() - start,
                            "tokens": [list(map(int, r)) for r in tokens]}
        if first is None:
            first = time.perf_counter() - start + load_s
    return {"contender": contender, "option": option, "rss_before_load_mb": base, "load_seconds": load_s,
            "first_result_seconds": first, "rss_after_load_mb": after_load, "load_peak_mb": load_peak,
            "rss_after_run_mb": rss_mb(), "peak_mb": peak_mb(), "cases": cases}


def load_runtime(scale: str, kind: str, memory: dict | None):
    from blip_runtime import BlipRuntime
    from blip_runtime.manifest import load_manifest
    from blip_runtime.session import OrtSession

    manifest = load_manifest(models.bundle(scale, CASE.model, kind))
    return BlipRuntime(manifest, OrtSession(manifest, threads=THREADS, memory=memory))


BEFORE = "ort-defaults"  # what the paired timing and the token check compare with


def paired(scale: str, kind: str, option: str, rounds: int) -> dict:
    """Decoder-step and end-to-end times of ONNX Runtime's defaults and `option`, alternated in one process."""
    from .cases import images
    from .contenders import StageClock

    imgs = images(1, seed=1)
    runtimes = {name: load_runtime(scale, kind, OPTIONS[name]) for name in (BEFORE, option)}
    clocks = {}
    for name, rt in runtimes.items():
        clocks[name] = clock = StageClock()
        run = rt.session.run
        rt.session.run = lambda graph, *a, _run=run, _clock=clock, **k: _clock.wrap(graph, _run)(graph, *a, **k)
    step, total = {n: [] for n in runtimes}, {n: [] for n in runtimes}
    for i in range(rounds + 1):
        for name, rt in runtimes.items():
            clocks[name].reset()
            start = time.perf_counter()
            rt.caption_tokens(imgs, **CASE.generation)
            if i:  # the first round warms up
                total[name].append(time.perf_counter() - start)
                step[name].append(clocks[name].seconds["decoder_step"] / clocks[name].calls["decoder_step"])
    return {"kind": kind, "option": option, "rounds": rounds, "step_seconds": step, "total_seconds": total}


def spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], capture_output=True, text=True,
                         cwd=HERE.parent, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="base", choices=("base", "tiny"))
    p.add_argument("--kinds", default="fp32,int8-cpu")
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--paired", default="", help="option to time against ort-defaults in one process")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--child", nargs=2, metavar=("CONTENDER", "OPTION"), help=argparse.SUPPRESS)
    p.add_argument("--pair-child", nargs=2, metavar=("KIND", "OPTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.scale, *args.child)))
        return 0
    if args.pair_child:
        print(json.dumps(paired(args.scale, *args.pair_child, args.rounds)))
        return 0
    load = os.getloadavg()[0]
    rows = [spawn(["--scale", args.scale, "--child", "transformers", "-"])]
    for kind in args.kinds.split(","):
        for option in args.options.split(","):
            rows.append(spawn(["--scale", args.scale, "--child", kind, option]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "cases"}), flush=True)
    pairs = [spawn(["--scale", args.scale, "--rounds", str(args.rounds), "--pair-child", kind, args.paired])
             for kind in args.kinds.split(",")] if args.paired else []
    result = {"scale": args.scale, "load_before": load, "load_after": os.getloadavg()[0], "rows": rows,
              "paired": pairs, "machine": platform.platform()}
    (HERE / "memory.json").write_text(json.dumps(result, indent=1))
    (HERE / "RESULTS_memory.md").write_text(report(result), encoding="utf-8")
    return 0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2


def report(result: dict) -> str:
    """RESULTS_memory.md from memory.json's contents."""
    rows = result["rows"]
    ref = next((r for r in rows if r.get("contender") == "transformers" and "peak_mb" in r), None)
    lines = ["# Memory of a running bundle: ONNX Runtime options against transformers", "",
             f"`python -m benchmarks.memory` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, scale "
             f"`{result['scale']}`, the caption cases once each in this order ({', '.join(c.name for c in CAPTION)}; "
             f"20 new tokens), {THREADS} threads, each row in a process of its own. Load average (1 min) before / after: "
             f"{result['load_before']:.2f} / {result['load_after']:.2f} (RSS does not depend on it; the times do). "
             "Generated from memory.json.", "",
             "RSS after load: resident set right after BlipRuntime / from_pretrained returns. Load peak: ru_maxrss at "
             "that moment (the most the load itself held). Then ru_maxrss after each case (the peak so far), and its "
             "ratio to transformers' at the end. First: load + the first caption (greedy). Tokens: every case's "
             "tokens equal ONNX Runtime's defaults' (ort-defaults) of the same bundle (fp32: also transformers').", "",
             "| contender | options | load | first | RSS after load | load peak | "
             + " | ".join(f"peak after {c.name}" for c in CAPTION) + " | peak / transformers | tokens |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(CAPTION) + "---:|---|"]
    tokens = lambda r: {k: v["tokens"] for k, v in r["cases"].items()}  # noqa: E731
    default_tokens = {r["contender"]: tokens(r) for r in rows if r.get("option") == BEFORE and "cases" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| ? | ? | failed: {r['error'][:200]} |" + " |" * (6 + len(CAPTION)))
            continue
        same = "–" if r["contender"] == "transformers" else (
            "same" if tokens(r) == default_tokens.get(r["contender"]) else "**differ**")
        if r["contender"] == "fp32" and ref:
            same += ", = transformers" if tokens(r) == tokens(ref) else ", **≠ transformers**"
        share = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref else "–"
        peaks = " | ".join(f"{r['cases'][c.name]['peak_mb']:.0f} MB" for c in CAPTION)
        lines.append(f"| {r['contender']} | {r['option']} | {r['load_seconds']:.1f} s | {r['first_result_seconds']:.1f} s | "
                     f"{r['rss_after_load_mb']:.0f} MB | {r['load_peak_mb']:.0f} MB | {peaks} | {share} | {same} |")
    for pair in result.get("paired", []):
        if "error" in pair:
            lines += ["", f"Paired timing failed: {pair['error'][:300]}"]
            continue
        step, total = pair["step_seconds"], pair["total_seconds"]
        ratio = [b / a for a, b in zip(step[BEFORE], step[pair["option"]])]
        lines += ["", f"Paired, {pair['kind']}: {BEFORE} and `{pair['option']}` loaded in one process, caption-greedy "
                  f"alternated for {pair['rounds']} rounds after a warm-up round. Decoder step median: {BEFORE} "
                  f"{_median(step[BEFORE]) * 1e3:.1f} ms, {pair['option']} {_median(step[pair['option']]) * 1e3:.1f} ms "
                  f"(per-round ratio median {_median(ratio):.2f}, range {min(ratio):.2f}–{max(ratio):.2f}); end to end "
                  f"{_median(total[BEFORE]) * 1e3:.0f} ms vs {_median(total[pair['option']]) * 1e3:.0f} ms."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
