"""Resident memory of a running bundle against transformers, per ONNX Runtime memory option.

Every (contender, option) runs in a process of its own (RSS and ru_maxrss are then its own):
load the caption model, run the benchmark's caption cases once each (greedy, 3 beams, batch 8; 20 new
tokens), and report the RSS after load, the peak during load (ru_maxrss right after it), the peak
after each case and the time from load to the first caption. An option is a set of OrtSession
arguments: ONNX Runtime memory options, rows per run of the once-per-request graphs, trimming the C
heap; "+external-data" runs a copy of the bundle whose weights are ONNX external data (what an
exporter that writes them so would give: ONNX Runtime maps them from disk). `--paired` then loads
`--before` and the chosen option in one process and alternates runs of `--case`, timing each stage,
so that an option that saves memory is seen not to slow a stage. Writes RESULTS_memory.md (and
memory.json) here.

    python -m benchmarks.memory [--scale base] [--kinds fp32,int8-cpu] [--options ort-defaults,runtime,...]
                                [--paired runtime --before no-arena --case caption-batch8]
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
# name -> OrtSession arguments; "runtime" is what OrtSession does by default, "ort-defaults" ONNX
# Runtime's own behaviour (its options, whole batches, no trimming), the others one change at a time.
WHOLE = {"rows_per_run": None, "trim": False}
NO_ARENA = {"enable_cpu_mem_arena": False}
OPTIONS = {
    "runtime": {},
    "ort-defaults": {"memory": {}, **WHOLE},  # arena on, prepacking on
    "no-arena": {"memory": NO_ARENA, **WHOLE},  # the runtime's choice before rows and trimming
    "no-arena+rows": {"memory": NO_ARENA, "rows_per_run": 1, "trim": False},
    "no-arena+trim": {"memory": NO_ARENA, "rows_per_run": None, "trim": True},
    "runtime+rows2": {"rows_per_run": 2},
    "runtime+no-prepack": {"memory": {**NO_ARENA, "session.disable_prepacking": "1"}, "loop_input_arena": True},
    "env-arena": {"memory": {"session.use_env_allocators": "1"}, **WHOLE},  # one arena for all sessions
    "runtime+external-data": {},
    "ort-defaults+external-data": {"memory": {}, **WHOLE},
}
EXTERNAL = "+external-data"


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
        rt = load_runtime(scale, contender, option)
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


def _status() -> dict[str, int]:
    """VmRSS, VmHWM (peak since the last reset_peak), RssAnon, RssFile of this process, MB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


def attribute(scale: str, kind: str, option: str) -> dict:
    """Where the memory goes: RSS (anonymous / file-backed) after each graph's session is made, and per
    case and graph the most one run added over the RSS before it (VmHWM reset before each run). Resets
    of VmHWM spoil ru_maxrss, so this runs in a process of its own, apart from child()."""
    import onnxruntime as ort

    from .cases import images

    events = []
    made = ort.InferenceSession

    class Measured(made):
        def __init__(self, path, *a, **k):
            _reset_peak()
            super().__init__(path, *a, **k)
            events.append({"what": f"session {Path(path).name}", **_status()})

    ort.InferenceSession = Measured
    try:
        rt = load_runtime(scale, kind, option)
    finally:
        ort.InferenceSession = made
    events.append({"what": "loaded", **_status()})
    run, peaks = rt.session.run, {}

    def measured(graph, feeds, keep=()):
        _reset_peak()
        before = _status()["VmRSS"]
        out = run(graph, feeds, keep)
        after = _status()
        key = (case_name[0], graph)
        grown = peaks.setdefault(key, [0, 0, 0])
        grown[0] = max(grown[0], after["VmHWM"] - before)  # the most one run held above its start
        grown[1] += after["VmRSS"] - before  # what stayed resident, summed over the runs
        grown[2] = after["VmHWM"]
        return out

    rt.session.run = measured
    case_name = [""]
    for case in CAPTION:
        case_name[0] = case.name
        rt.caption_tokens(images(case.batch, seed=1), **case.generation)
        events.append({"what": f"after {case.name}", **_status()})
    return {"kind": kind, "option": option, "events": events,
            "runs": [{"case": c, "graph": g, "run_peak_mb": v[0], "kept_mb": v[1], "peak_mb": v[2]}
                     for (c, g), v in peaks.items()]}


def load_runtime(scale: str, kind: str, option: str):
    from blip_runtime import BlipRuntime
    from blip_runtime.manifest import load_manifest
    from blip_runtime.session import OrtSession

    if option == "env-arena":  # the process-wide arena the sessions then share (ONNX Runtime's env)
        import onnxruntime as ort

        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))
    folder = models.bundle(scale, CASE.model, kind)
    if option.endswith(EXTERNAL):
        folder = external_copy(folder)
    manifest = load_manifest(folder)
    return BlipRuntime(manifest, OrtSession(manifest, threads=THREADS, **OPTIONS[option]))


def external_copy(folder: Path) -> Path:
    """A copy of the bundle beside it whose graphs keep their weights as ONNX external data (one
    file per graph, graph.onnx.data), made once. The manifest is copied as it is: OrtSession finds the
    data by the graph's own references and nothing here verifies checksums."""
    import shutil

    import onnx

    out = folder.with_name(folder.name + "-external")
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".onnx":
            model = onnx.load(str(f))
            onnx.save_model(model, str(tmp / f.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f.name + ".data", size_threshold=1024)
            del model
        elif f.is_file():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


BEFORE = "ort-defaults"  # what the token check compares with
STAGES = ("vision", "cross_kv", "decoder_step")


def paired(scale: str, kind: str, before: str, option: str, case_name: str, rounds: int) -> dict:
    """Per-stage and end-to-end times of `before` and `option` on one case, alternated in one process."""
    from .cases import images
    from .contenders import StageClock

    case = next(c for c in CASES if c.name == case_name)
    imgs = images(case.batch, seed=1)
    runtimes = {name: load_runtime(scale, kind, name) for name in (before, option)}
    clocks = {}
    for name, rt in runtimes.items():
        clocks[name] = clock = StageClock()
        run = rt.session.run
        rt.session.run = lambda graph, *a, _run=run, _clock=clock, **k: _clock.wrap(graph, _run)(graph, *a, **k)
    stages = {n: {s: [] for s in STAGES} for n in runtimes}
    total = {n: [] for n in runtimes}
    for i in range(rounds + 1):
        for name, rt in runtimes.items():
            clocks[name].reset()
            start = time.perf_counter()
            rt.caption_tokens(imgs, **case.generation)
            if i:  # the first round warms up
                total[name].append(time.perf_counter() - start)
                for s in STAGES:  # decoder_step: per step; the others: per request
                    per = clocks[name].calls[s] if s == "decoder_step" else 1
                    stages[name][s].append(clocks[name].seconds[s] / per)
    return {"kind": kind, "before": before, "option": option, "case": case_name, "rounds": rounds,
            "stage_seconds": stages, "total_seconds": total}


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
    p.add_argument("--paired", default="", help="option to time against --before in one process")
    p.add_argument("--before", default="no-arena")
    p.add_argument("--case", default="caption-batch8", choices=[c.name for c in CAPTION])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", nargs=2, metavar=("CONTENDER", "OPTION"), help=argparse.SUPPRESS)
    p.add_argument("--pair-child", nargs=2, metavar=("KIND", "OPTION"), help=argparse.SUPPRESS)
    p.add_argument("--attribute", default="", help="options to attribute per graph (each kind, own process)")
    p.add_argument("--attr-child", nargs=2, metavar=("KIND", "OPTION"), help=argparse.SUPPRESS)
    p.add_argument("--prepare-child", metavar="KIND", help=argparse.SUPPRESS)
    p.add_argument("--add", action="store_true", help="add these rows to memory.json's (no transformers row)")
    p.add_argument("--report-only", action="store_true", help="rewrite RESULTS_memory.md from memory.json")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.scale, *args.child)))
        return 0
    if args.pair_child:
        print(json.dumps(paired(args.scale, args.pair_child[0], args.before, args.pair_child[1], args.case,
                                args.rounds)))
        return 0
    if args.prepare_child:  # its own process: converting a graph holds it in memory twice
        external_copy(models.bundle(args.scale, CASE.model, args.prepare_child))
        print(json.dumps({}))
        return 0
    if args.attr_child:
        print(json.dumps(attribute(args.scale, *args.attr_child)))
        return 0
    if args.report_only:
        result = json.loads((HERE / "memory.json").read_text())
        (HERE / "RESULTS_memory.md").write_text(report(result), encoding="utf-8")
        return 0
    load = os.getloadavg()[0]
    for kind in args.kinds.split(",") if EXTERNAL in args.options else ():
        spawn(["--scale", args.scale, "--prepare-child", kind])
    old = json.loads((HERE / "memory.json").read_text()) if args.add else None
    rows = old["rows"] if old else [spawn(["--scale", args.scale, "--child", "transformers", "-"])]
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "cases"}), flush=True)
    for kind in args.kinds.split(","):
        for option in filter(None, args.options.split(",")):
            rows.append(spawn(["--scale", args.scale, "--child", kind, option]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "cases"}), flush=True)
    pairs = []
    for kind in args.kinds.split(",") if args.paired else ():
        pairs.append(spawn(["--scale", args.scale, "--rounds", str(args.rounds), "--before", args.before,
                            "--case", args.case, "--pair-child", kind, args.paired]))
        print(json.dumps(pairs[-1]), flush=True)
    attributed = []
    for kind in args.kinds.split(",") if args.attribute else ():
        for option in args.attribute.split(","):
            attributed.append(spawn(["--scale", args.scale, "--attr-child", kind, option]))
    result = {"scale": args.scale, "load_before": load, "load_after": os.getloadavg()[0], "rows": rows,
              "paired": pairs, "attributed": attributed, "machine": platform.platform()}
    if old:  # keep the first run's header numbers, paired timings and attributions too
        result.update(load_before=old["load_before"], load_after=old["load_after"],
                      paired=old.get("paired", []) + pairs, attributed=old.get("attributed", []) + attributed)
    (HERE / "memory.json").write_text(json.dumps(result, indent=1))
    (HERE / "RESULTS_memory.md").write_text(report(result), encoding="utf-8")
    return 0


# What the measurements below show (RESULTS_memory.md prints it after the table; numbers from the
# 2026-12-01 base run, the attribution tables at the end hold the per-step figures).
FINDINGS = """## What the memory is, and what changed

- **Weights.** fp32: 991 MB of graph files, 1035 MB resident after load, 992 MB of it anonymous: ONNX Runtime
  parses each inline graph file into heap memory and keeps its own copy of every initializer (MatMul weights
  prepacked into buffers of their own). The parsed copies are freed but glibc kept them resident, scattered
  between live blocks: 1165 MB before the trim that OrtSession does after load, 1035 MB after. The load's
  peak (1285 MB, decoder_step's session) is its parsed file and its initializers at once.
- **Batch-8 activations.** Row by row (OrtSession rows_per_run=1, outputs allocated once and written in place
  by IOBinding) vision rises at most 72 MB over the resident set and cross_kv 311-325 MB, which are the cross
  K/V themselves (42.5 MB per request, kept for the whole decode): the floor while the decoder step takes fp32
  cross K/V. Before cross_kv had one matmul per K/V projection, its fused product [8, 577, 24 x 768] was alive
  with the 24 transposed outputs: run whole, cross_kv rose 650 MB, row by row 393 MB.
- **The decoding loop** adds at most a few MB per step: the past K/V are the step graph's own outputs fed back
  (the cache grows inside the graph, no numpy concatenation), beams are reordered inside the graph (beam_idx), and
  the cross K/V are gathered once, at the expansion to beams. Nothing to change in decoding.py or the BLIP runtime.
- **Arenas.** ONNX Runtime's CPU arena keeps every block a batch-8 run grew it to (ort-defaults 1956 MB against
  1629 MB without it, fp32; 2628 against 2083 MB with the fused cross_kv); one arena shared by all sessions
  (env-arena: session.use_env_allocators with an arena registered in the environment) still keeps the largest
  run's blocks. Off, except for the row-by-row graphs whose outputs all feed the decoding loop (cross_kv;
  session.feeds_loop_only): their outputs live through the loop anyway, and without an arena each request
  faulted them in afresh. Alternated in one process (loaded machine), int8-cpu cross_kv took 14 ms per caption
  with the arena against 25 ms without (fp32 52 against 65 ms), and 38 ms as a fused matmul without it.
- **Freed memory that stays resident.** Without an arena, freed activations go back to glibc, which keeps most of
  them; OrtSession trims the heap (malloc_trim, 1.4 ms a call here) after each run of more than one row of a graph
  outside the decoding loop (session.TRIM_AFTER_ROWS). Rows and trim together give the table's `runtime` row; trim
  alone does less (no-arena+trim), rows alone come close (no-arena+rows: fp32 1540 against 1483 MB, int8-cpu 842
  against 841 MB). Single-row runs are not trimmed: their freed blocks are what the next request reuses, and a
  page given back costs ~3 us to fault in again on this VM (0.8 ms per MB). Trimming after those as well made
  each request fault its working set in afresh (a single-row vision run keeps 127 MB fp32, 91 MB int8-cpu):
  BLIP-base int8-cpu caption 414 ms against 381 ms without those trims (the two policies in processes of their
  own, alternated, 15 rounds; fp32 1.04x), at the same peak.
- **Prepacking** costs nothing resident once the heap is trimmed (fp32 runtime+no-prepack: 1481 MB against 1483)
  and int8-cpu's decoder step needs it (first caption 5.2 s without it against 1.3 s; peak 939 against 841 MB):
  on, as before.
- **External data.** ONNX Runtime 1.32 maps a graph's external data file instead of reading it into the heap: the
  `+external-data` rows (the same graphs rewritten with their weights beside them) are lower after load and at the
  peak (fp32 by 89 and 85 MB, int8-cpu by 87 and 85 MB: 756 MB = 0.38 x), and the weights it does not copy
  (embeddings, LayerNorms, biases) are page-cache pages that processes running the same bundle share. That is a
  change of the exporter's layout (it writes external data only for graphs over 2 GB today), not made here.
- **int8-cpu tokens.** fp32 row-by-row outputs are bit-identical to whole batches, so its tokens are equal. int8-cpu
  quantizes activations with one scale per run: whole, an image's vision output depends on the other images of its
  batch; row by row it is the image's own, exactly as alone (tests/runtime/test_session_memory.py), which changes
  some of the 8 batch-8 captions (greedy and beam3 are equal). Its decoder step still groups the rows of a batch,
  so neither form's batch-8 captions all equal the images' alone.
- **Speed** is measured where it is paired: the cross_kv figures above, and RESULTS.md's stage tables (full runs).
- **Targets.** Peak of the three caption cases: fp32 1483 MB = 0.74 x transformers' 2014 MB (target <= 1);
  int8-cpu 841 MB = 0.42 x (target <= 0.5), with prepacking on. transformers' peak moves between runs (1812 MB
  in the run before this one, 1853 MB in the latest full run, where ours were 1467 and 854 MB = 0.79 x and 0.46 x).
"""


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
    lines += ["", FINDINGS.strip()]
    if result.get("paired"):
        lines += ["", "## Speed of the chosen options (paired)"]
    for pair in result.get("paired", []):
        if "error" in pair:
            lines += ["", f"Paired timing failed: {pair['error'][:300]}"]
            continue
        a, b = pair["before"], pair["option"]
        st, total = pair["stage_seconds"], pair["total_seconds"]
        parts = []
        for stage in STAGES:
            ratio = [y / x for x, y in zip(st[a][stage], st[b][stage]) if x]
            unit = "per step" if stage == "decoder_step" else "per request"
            parts.append(f"{stage} ({unit}) {_median(st[a][stage]) * 1e3:.1f} vs {_median(st[b][stage]) * 1e3:.1f} ms "
                         f"(ratio median {_median(ratio):.2f}, {min(ratio):.2f}–{max(ratio):.2f})")
        ratio = [y / x for x, y in zip(total[a], total[b])]
        lines += ["", f"Paired, {pair['kind']}, {pair['case']}: `{a}` and `{b}` loaded in one process, alternated for "
                  f"{pair['rounds']} rounds after a warm-up round; medians `{a}` vs `{b}`: " + "; ".join(parts)
                  + f"; end to end {_median(total[a]):.2f} vs {_median(total[b]):.2f} s (ratio median "
                  f"{_median(ratio):.2f}, {min(ratio):.2f}–{max(ratio):.2f})."]
    for att in result.get("attributed", []):
        if "error" in att:
            lines += ["", f"Attribution failed: {att['error'][:300]}"]
            continue
        lines += ["", f"### Where the memory goes: {att['kind']}, `{att['option']}`", "",
                  "RSS (MB) after each step; anonymous memory is the process's own, file-backed is mapped files "
                  "(libraries; weights only when they are external data).", "",
                  "| after | RSS | anonymous | file-backed | peak since the step before |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {e['what']} | {e['VmRSS']} | {e['RssAnon']} | {e['RssFile']} | {e['VmHWM']} |" for e in att["events"]]
        lines += ["", "Per case and graph: the most one run rose above the RSS before it, what stayed resident "
                  "(summed over its runs), and the process's peak in its last run.", "",
                  "| case | graph | one run's rise | kept | peak |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['graph']} | {r['run_peak_mb']} MB | {r['kept_mb']} MB | {r['peak_mb']} MB |"
                  for r in att["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
