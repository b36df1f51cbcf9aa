"""Paired timing of one case for two or more bundle contenders: all loaded in one process and run
alternately, round after round (default: ort-fp32 and ort-int8-cpu on caption-greedy).

Why: on a shared machine the speed drifts by ±10% over minutes, and the per-contender worker
processes of benchmarks.run measure minutes apart, on different machines as far as that drift goes.
Runs that alternate see the same machine, so the median of the per-round ratios is the robust
measure of how much faster one bundle is than another (the int8-vs-fp32 target). Each contender
keeps its own sessions, as in a worker; only the decoder-step pools spin (blip_runtime/session.py),
and a round's runs never overlap.

    python -m benchmarks.paired [--scale tiny] [--rounds 25] [--case caption-greedy]
                                [--contenders ort-fp32,ort-int8-cpu] [--out paired.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .cases import CASES, images
from .contenders import CONTENDERS

# 25 rounds (about 45 s at BLIP-base size): single rounds range from 2.0x to 3.0x on this machine, and
# with 15 the median of the ratio moved by about 0.05 between full runs.
ROUNDS = 25


def paired(scale: str, case_name: str, names: list[str], rounds: int) -> dict:
    case = next(c for c in CASES if c.name == case_name)
    contenders = {}
    for name in names:
        c = CONTENDERS[name]()
        if not hasattr(c, "kind"):
            raise ValueError(f"{name}: only bundle contenders run paired (transformers needs its own process)")
        note = c.unavailable(scale, case.model)
        if note:
            raise ValueError(f"{name}: {note}")
        c.load(scale, case.model)
        contenders[name] = c
    imgs = images(case.batch, seed=1)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs = {}
    for i in range(rounds + 1):  # round 0 warms every contender up
        for name, c in contenders.items():
            start = time.perf_counter()
            out = c.run(case, imgs)
            if i:
                times[name].append(time.perf_counter() - start)
            outputs[name] = [len(r) for r in out] if isinstance(out, list) else None
    first = names[0]
    ratios = {f"{first}/{n}": [a / b for a, b in zip(times[first], times[n])] for n in names[1:]}
    return {
        "case": case.name, "scale": scale, "rounds": rounds, "order": names,
        "seconds": {n: {"median": float(np.median(t)), "min": float(min(t)), "max": float(max(t))}
                    for n, t in times.items()},
        "ratios": {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "per_round": v}
                   for k, v in ratios.items()},
        "lengths": outputs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("base", "tiny"), default="base")
    p.add_argument("--case", default="caption-greedy", choices=[c.name for c in CASES])
    p.add_argument("--contenders", default="ort-fp32,ort-int8-cpu", help="comma-separated; ratios are first / each other")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if len(names) < 2 or unknown or args.rounds < 1:
        p.error(f"--contenders: two or more of {sorted(CONTENDERS)} (unknown: {unknown}); --rounds >= 1")
    try:
        result = paired(args.scale, args.case, names, args.rounds)
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
