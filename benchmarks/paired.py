"""Paired timing of one case for two or more contenders, run alternately, round after round: bundle
contenders loaded in one process (default: ort-fp32 and ort-int8-cpu on caption-greedy), or, with
--processes, any contenders (transformers among them) each in a worker process of its own.

Why: on a shared machine the speed drifts by ±10% over minutes, and the per-contender worker
processes of benchmarks.run measure minutes apart, on different machines as far as that drift goes.
Runs that alternate see the same machine, so the median of the per-round ratios is the robust
measure of how much faster one contender is than another (the int8-vs-fp32 target in one process;
the speed-ups over transformers with --processes). Each contender keeps its own sessions, as in a
worker; only the decoder-step pools spin (blip_runtime/session.py), and a round's runs never overlap.

    python -m benchmarks.paired [--scale tiny] [--rounds 25] [--case caption-greedy]
                                [--contenders ort-fp32,ort-int8-cpu] [--processes] [--out paired.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .cases import CASES, images
from .contenders import CONTENDERS

# 25 rounds (about 45 s at BLIP-base size): single rounds range from 2.0x to 3.0x on this machine, and
# with 15 the median of the ratio moved by about 0.05 between full runs.
ROUNDS = 25
# Against transformers (2-3 s a caption), each in its own process: 15 rounds take about a minute.
ROUNDS_PROCESSES = 15
SETTLE = 0.05  # seconds between runs, for the last run's spinning threads to go idle
ROOT = Path(__file__).resolve().parent.parent


def alternate(runs: dict, rounds: int, settle: float = 0.0) -> tuple[dict, dict]:
    """Run each of `runs` ({name: () -> what it produced}) once per round, in order, after a warm-up round;
    `settle` seconds of sleep after each run let the last one's spinning threads go idle."""
    times: dict[str, list[float]] = {n: [] for n in runs}
    outputs = {}
    for i in range(rounds + 1):  # round 0 warms every contender up
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            if i:
                times[name].append(time.perf_counter() - start)
            time.sleep(settle)
    return times, outputs


def summarize(case, scale: str, rounds: int, times: dict, outputs: dict, **extra) -> dict:
    names = list(times)
    first = names[0]
    ratios = {f"{first}/{n}": [a / b for a, b in zip(times[first], times[n])] for n in names[1:]}
    return {
        "case": case.name, "scale": scale, "rounds": rounds, "order": names, **extra,
        "seconds": {n: {"median": float(np.median(t)), "min": float(min(t)), "max": float(max(t))}
                    for n, t in times.items()},
        "ratios": {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "per_round": v}
                   for k, v in ratios.items()},
        "lengths": outputs,
    }


def find_case(case_name: str):
    return next(c for c in CASES if c.name == case_name)


def check_available(c, name: str, scale: str, case) -> None:
    note = c.unavailable(scale, case.model)
    if note:
        raise ValueError(f"{name}: {note}")


def paired(scale: str, case_name: str, names: list[str], rounds: int) -> dict:
    case = find_case(case_name)
    contenders = {}
    for name in names:
        c = CONTENDERS[name]()
        if not hasattr(c, "kind"):
            raise ValueError(f"{name}: only bundle contenders run paired in one process "
                             "(transformers needs its own: --processes)")
        check_available(c, name, scale, case)
        c.load(scale, case.model)
        contenders[name] = c
    imgs = images(case.batch, seed=1)

    def runner(c):
        return lambda: [len(r) for r in out] if isinstance(out := c.run(case, imgs), list) else None

    times, outputs = alternate({n: runner(c) for n, c in contenders.items()}, rounds)
    return summarize(case, scale, rounds, times, outputs, processes=False)


class Worker:
    """A `benchmarks.worker --serve` process: loaded once, one timed run per `run()`."""

    def __init__(self, name: str, scale: str, case, log: Path | None):
        self.name = name
        self.log = log.open("w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", name, case.model, "--scale", scale, "--cases", case.name,
             "--serve"], cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.seconds: list[float] = []
        try:
            self.info = self.read()["ready"]
        except BaseException:
            self.close()
            raise

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise ValueError(f"{self.name}: its worker exited (code {self.proc.returncode}) before answering")
        return json.loads(line)

    def run(self) -> list[int]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        event = self.read()
        self.seconds.append(event["seconds"])
        return event["output"]["first"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def paired_processes(scale: str, case_name: str, names: list[str], rounds: int, logs: Path | None = None,
                     settle: float = SETTLE) -> dict:
    """Like paired(), but each contender in a `benchmarks.worker --serve` process of its own (so that
    transformers can take part and every process holds only its own memory and libraries). The
    workers load one after another; only the one whose turn it is runs, the others wait on stdin.
    Times are the workers' own (perf_counter around `run`), not the pipe's round trip."""
    case = find_case(case_name)
    for name in names:
        check_available(CONTENDERS[name](), name, scale, case)
    workers: dict[str, Worker] = {}
    try:
        for name in names:
            workers[name] = Worker(name, scale, case, logs / f"paired-worker-{name}.log" if logs else None)
        _, outputs = alternate({n: w.run for n, w in workers.items()}, rounds, settle)
        times = {n: w.seconds[1:] for n, w in workers.items()}  # the worker's own clock; round 0 is the warm-up
    finally:
        for w in workers.values():
            w.close()
    lengths = {n: [len(t)] for n, t in outputs.items()}  # one row: [DEC] + the new tokens
    return summarize(case, scale, rounds, times, lengths, processes=True, tokens=outputs,
                     forms={n: w.info.get("form") for n, w in workers.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("base", "tiny"), default="base")
    p.add_argument("--case", default="caption-greedy", choices=[c.name for c in CASES])
    p.add_argument("--contenders", default="ort-fp32,ort-int8-cpu", help="comma-separated; ratios are first / each other")
    p.add_argument("--rounds", type=int, help=f"default {ROUNDS}, or {ROUNDS_PROCESSES} with --processes")
    p.add_argument("--processes", action="store_true",
                   help="each contender in a worker process of its own (transformers can take part)")
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    rounds = args.rounds if args.rounds is not None else ROUNDS_PROCESSES if args.processes else ROUNDS
    if len(names) < 2 or unknown or rounds < 1:
        p.error(f"--contenders: two or more of {sorted(CONTENDERS)} (unknown: {unknown}); --rounds >= 1")
    try:
        if args.processes:
            logs = args.out.parent if args.out else None
            result = paired_processes(args.scale, args.case, names, rounds, logs)
        else:
            result = paired(args.scale, args.case, names, rounds)
    except ValueError as e:
        print(f"benchmarks.paired: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
