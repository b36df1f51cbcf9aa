"""One contender on one model's cases, in a process of its own: its peak resident memory is then its
own (ru_maxrss), and an ORT process never has torch loaded. Prints one JSON line per timed or
warm-up run (progress for benchmarks.run) and a final {"result": ...} line.

With --serve it loads, prints {"ready": info}, and then runs its one case once for every line read
from stdin, printing {"seconds": ..., "output": ...} after each, until stdin closes: benchmarks.paired
drives such workers alternately, so that contenders in processes of their own (transformers among
them) are timed round by round on the same machine state.

    python -m benchmarks.worker ort-fp32 caption [--scale tiny] [--repeats 1] [--cases caption-greedy]
    python -m benchmarks.worker transformers caption --cases caption-greedy --serve
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from .cases import CASES, WARMUP, images
from .contenders import CONTENDERS


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def summary(output) -> dict:
    """What the run produced, to check that every contender did the same work."""
    if isinstance(output, list):  # token ids per row
        return {"rows": len(output), "lengths": sorted({len(r) for r in output}), "first": list(map(int, output[0]))}
    out = np.asarray(output, dtype=np.float64)
    return {"rows": int(out.shape[0]), "shape": list(out.shape), "first": np.round(out[0].ravel()[:8], 6).tolist()}


def bench(contender, case, repeats: int) -> dict:
    imgs = images(case.batch, seed=1)
    times, stages, produced = [], [], None
    for i in range(WARMUP + repeats):
        contender.clock.reset()
        start = time.perf_counter()
        output = contender.run(case, imgs)
        elapsed = time.perf_counter() - start
        emit(tick=case.name, warmup=i < WARMUP, seconds=round(elapsed, 4))
        if i >= WARMUP:
            times.append(elapsed)
            stages.append({"seconds": dict(contender.clock.seconds), "calls": dict(contender.clock.calls)})
            produced = produced or summary(output)
    return {"times": times, "stages": stages, "output": produced}


def serve(contender, case) -> None:
    """One run of `case` per line on stdin, timed; stops at end of input."""
    imgs = images(case.batch, seed=1)
    for _ in sys.stdin:
        start = time.perf_counter()
        output = contender.run(case, imgs)
        emit(seconds=time.perf_counter() - start, output=summary(output))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("contender", choices=sorted(CONTENDERS))
    p.add_argument("model")
    p.add_argument("--scale", default="base")
    p.add_argument("--repeats", type=int, help="timed runs per case (default: each case's own count)")
    p.add_argument("--cases", help="comma-separated case names (default: all of this model's)")
    p.add_argument("--serve", action="store_true", help="run the one case given by --cases once per stdin line")
    args = p.parse_args(argv)
    wanted = set(args.cases.split(",")) if args.cases else None
    contender = CONTENDERS[args.contender]()
    cases, unsupported = [], {}
    for c in CASES:
        if c.model == args.model and (wanted is None or c.name in wanted):
            note = contender.supports(c) if hasattr(contender, "supports") else None
            if note:
                unsupported[c.name] = note
            else:
                cases.append(c)
    if args.serve and (len(cases) != 1 or unsupported):
        p.error(f"--serve: --cases must name one case of {args.model} that {args.contender} runs "
                f"(got {[c.name for c in cases]}, unsupported {sorted(unsupported)})")
    start = time.perf_counter()
    info = contender.load(args.scale, args.model)
    if args.serve:
        emit(ready=info)
        serve(contender, cases[0])
        return 0
    load_s = time.perf_counter() - start
    import psutil

    rss_loaded = psutil.Process().memory_info().rss / 2**20
    results = {c.name: bench(contender, c, args.repeats or c.repeats) for c in cases}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    emit(result={"contender": args.contender, "model": args.model, "info": info, "load_seconds": load_s,
                 "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak, "torch_loaded": "torch" in sys.modules,
                 "cases": results, "unsupported": unsupported})
    return 0


if __name__ == "__main__":
    sys.exit(main())
