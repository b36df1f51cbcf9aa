"""Run every benchmark and write RESULTS.md, results.png and results.json:

    .venv/bin/python -m benchmarks.run

1. setup (cached in benchmarks/.cache): checkpoints and bundles (benchmarks.models);
2. machine limits: matmul rate and memory bandwidth (benchmarks.limits);
3. each available contender on each model's cases, one subprocess per (contender, model) so peak
   memory is its own (benchmarks.worker);
4. ort-fp32 and ort-int8-cpu alternating in one process on caption-greedy, for the int8-vs-fp32
   ratio on one and the same machine state (benchmarks.paired);
5. ONNX Runtime per-op profiles of the vision and decoder-step graphs (benchmarks.profile_ort);
6. the report (benchmarks.report).

Every step that measures runs in a fresh process, one at a time: the numbers are only worth
something on an otherwise idle machine, so other processes' CPU use is sampled throughout the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm import tqdm

from . import models, paired, report
from .cases import BLIP2, CASES, MODELS, WARMUP
from .contenders import BASELINE, CONTENDERS, THREADS

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lscpu = {}
    try:  # the CPU's model as lscpu names it (a VM may show only the vendor's family name there)
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        lscpu = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except OSError:
        pass
    field = lambda name: lscpu.get(name, "").strip() or None  # noqa: E731
    return {"cpu": cpu, "lscpu_model": field("Model name"), "cpu_family": field("CPU family"),
            "cpu_model": field("Model"), "hypervisor": field("Hypervisor vendor"), "cores": os.cpu_count(),
            "ram_gib": psutil.virtual_memory().total / 2**30, "os": platform.platform(), "threads_used": THREADS}


def versions() -> dict:
    """Library versions, and the commit of this checkout (+dirty when blip_export/blip_runtime differ from it)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD")
    out = {"blip-trt": commit + ("+dirty" if git("status", "--porcelain", "blip_export", "blip_runtime") else ""),
           "python": platform.python_version()}
    for name in ("torch", "transformers", "onnxruntime", "numpy", "onnx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class LoadWatch(threading.Thread):
    """Samples, every few seconds while the benchmark runs, the processes outside this benchmark
    that use a fifth of a core or more: numbers taken under someone else's load are wrong.
    Kernel threads (children of kthreadd, pid 2) are kept apart in `kernel`: they work for whoever
    causes them, and in a quiet run that is the benchmark itself (kswapd0 reclaiming page cache
    while the multi-GB BLIP-2 checkpoints and bundles load took up to 43 % of a core); the report
    names them without calling the run loaded."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.busy, self.kernel, self.done = every, {}, {}, threading.Event()
        self.loadavg = {"before": list(os.getloadavg())}

    def run(self) -> None:
        import psutil

        me, seen = psutil.Process(), {}
        while not self.done.is_set():
            ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    pct = seen.setdefault(proc.pid, proc).cpu_percent(None)  # since the last sample
                except psutil.Error:
                    continue
                if pct >= 20 and proc.pid not in ours:
                    try:
                        kernel = proc.pid == 2 or proc.ppid() == 2
                        name = proc.name()
                    except psutil.Error:
                        continue
                    table = self.kernel if kernel else self.busy
                    entry = table.setdefault(proc.pid, {"pid": proc.pid, "cpu_percent": 0.0,
                                                        "cmd": name if kernel else " ".join(proc.info["cmdline"] or [])[:120]})
                    entry["cpu_percent"] = max(entry["cpu_percent"], pct)
            self.done.wait(self.every)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"loadavg": {**self.loadavg, "after": list(os.getloadavg())}, "busy": list(self.busy.values()),
                "kernel": list(self.kernel.values())}


def module(name: str, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=log.open("w"))


def run_json(name: str, args: list[str], out: Path, log: Path) -> dict:
    proc = module(name, *args, "--out", str(out), log=log)
    proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"benchmarks.{name} failed (exit {proc.returncode}); see {log}")
    return json.loads(out.read_text())


def run_worker(contender: str, model: str, args, bar: tqdm, log: Path) -> dict:
    extra = ["--scale", args.scale] + (["--repeats", str(args.repeats)] if args.repeats else [])
    if args.cases:
        extra += ["--cases", args.cases]
    proc = module("worker", contender, model, *extra, log=log)
    result = None
    for line in proc.stdout:
        event = json.loads(line)
        if "tick" in event:
            warm = " (warm-up)" if event["warmup"] else ""
            bar.set_postfix_str(f"{contender} {event['tick']}{warm} {event['seconds']:.2f}s")
            bar.update(1)
        else:
            result = event["result"]
    proc.wait()
    if proc.returncode or result is None:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{contender} on {model} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run all benchmarks; write RESULTS.md, results.png, results.json.")
    p.add_argument("--scale", choices=("base", "tiny"), default="base", help="tiny: seconds-long smoke run")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated names")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--repeats", type=int, help="timed runs per case (default: each case's own count)")
    p.add_argument("--no-fusions", action="store_true", help="skip the ORT transformer-optimizer what-if")
    p.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md, results.png, results.json")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoints and bundles")
    p.add_argument("--allow-loaded", action="store_true",
                   help="write to --out even when other processes used the CPU (default: benchmarks/.cache/loaded-run)")
    args = p.parse_args(argv)
    start = time.time()
    watch = LoadWatch()
    watch.start()
    logs = models.CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": args.scale,
               "machine": machine(), "versions": versions(),
               "cases": [c.__dict__ for c in CASES], "warmup": WARMUP, "baseline": BASELINE}

    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(wanted) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s) {sorted(unknown)}; expected some of {sorted(CONTENDERS)}")
    kinds = [k for name in wanted for k in CONTENDERS[name]().needs]
    chosen = set(args.cases.split(",")) if args.cases else None
    # build only what the cases run, and the caption model always: the limits section and the profiles are about it
    needed = {"caption"} | {c.model for c in CASES if chosen is None or c.name in chosen}
    results["setup_notes"] = models.build(args.scale, kinds, args.rebuild,
                                          say=lambda m: print(f"setup: {m}", file=sys.stderr), only=needed)
    jobs, skipped = [], {}
    for name in wanted:
        contender = CONTENDERS[name]()
        for model in MODELS:
            if not any(c.model == model and (chosen is None or c.name in chosen) for c in CASES):
                continue
            note = contender.unavailable(args.scale, model)
            if note:
                skipped.setdefault(name, {})[model] = note
            else:
                jobs.append((name, model))
    results["skipped"] = skipped
    supported = lambda name, case: not getattr(CONTENDERS[name](), "supports", lambda c: None)(case)  # noqa: E731
    ticks = sum(WARMUP + (args.repeats or c.repeats) for name, model in jobs for c in CASES
                if c.model == model and (chosen is None or c.name in chosen) and supported(name, c))
    with tqdm(total=ticks + 2, desc="benchmarks", unit="run", file=sys.stderr) as bar:
        bar.set_postfix_str("machine limits")
        quick = ["--quick"] if args.scale == "tiny" else []
        results["limits"] = run_json("limits", quick, logs / "limits.json", logs / "limits.log")
        bar.update(1)
        results["workers"], results["failures"] = [], {}
        for name, model in jobs:
            try:
                results["workers"].append(run_worker(name, model, args, bar, logs / f"{name}-{model}.log"))
            except RuntimeError as e:
                results["failures"][f"{name}/{model}"] = str(e)
                bar.write(f"FAILED: {e}")
        def run_paired(key: str, what: str, rounds: int, extra: list[str]) -> None:
            """benchmarks.paired into results[key]; a failure is recorded, the run goes on."""
            bar.set_postfix_str(what)
            argv = ["--scale", args.scale, "--rounds", "2" if args.scale == "tiny" else str(rounds), *extra]
            try:
                results[key] = run_json("paired", argv, logs / f"{key}.json", logs / f"{key}.log")
            except RuntimeError as e:
                results["failures"][key] = str(e)
                bar.write(f"FAILED: {e}")

        greedy = chosen is None or "caption-greedy" in chosen
        ran = lambda c: c in wanted and (c, "caption") in jobs  # noqa: E731
        if greedy and ran("ort-fp32") and ran("ort-int8-cpu"):
            run_paired("paired", "paired int8 vs fp32", paired.ROUNDS, [])
        versus = [c for c in ("ort-fp32", "ort-int8") if ran(c)]
        if greedy and versus and ran("transformers"):
            run_paired("paired_transformers", "paired against transformers", paired.ROUNDS_PROCESSES,
                       ["--processes", "--contenders", ",".join(["transformers", *versus])])
        bar.set_postfix_str("ORT profiles")
        profile_args = ["--scale", args.scale] + ([] if args.no_fusions else ["--fusions"])
        results["profile"] = run_json("profile_ort", profile_args, logs / "profile.json", logs / "profile.log")
        bar.update(1)
    results["model"] = report.model_facts(args.scale)
    if any(w["model"] in BLIP2 for w in results["workers"]):
        from .blip2_cases import facts

        results["blip2_model"] = facts(args.scale, sorted({w["info"].get("kind") for w in results["workers"]
                                                           if w["model"] in BLIP2 and w["info"].get("kind")}))
    results["load"] = watch.stop()
    if results["load"]["busy"]:
        print(f"WARNING: other processes used the CPU during the run: {results['load']['busy']}; "
              "numbers taken under load are wrong", file=sys.stderr)
    results["wall_seconds"] = time.time() - start
    if results["load"]["busy"] and args.out.resolve() == HERE and not args.allow_loaded:
        args.out = models.CACHE / "loaded-run"  # a loaded machine's numbers never replace the idle run's
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"the machine was loaded: writing to {args.out} instead of {HERE} (--allow-loaded overrides)",
              file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, args.out)
    print(f"wrote {args.out / 'RESULTS.md'}, results.png, results.json in {results['wall_seconds'] / 60:.1f} min",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
