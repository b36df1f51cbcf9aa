"""Start-up of a bundle: what verification costs per GB, next to session creation and the first result.

Per bundle kind, in this process: verify_files("full") (every file hashed), verify_files("stamp")
right after (every file's stamp matches: only stats), the OrtSession's creation, and the first
caption (greedy, 20 new tokens). The stamp folder is a temporary one, so the full check is a real
first check. Prints one JSON line per bundle, then a Markdown table.

    python -m benchmarks.startup [--scale base] [--kinds fp32,int8-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from . import models
from .cases import CASES, images
from .contenders import THREADS

CASE = next(c for c in CASES if c.name == "caption-greedy")


def measure(scale: str, kind: str) -> dict:
    from blip_runtime import BlipRuntime
    from blip_runtime.manifest import load_manifest
    from blip_runtime.session import OrtSession

    folder = models.bundle(scale, CASE.model, kind)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9
    clock = time.perf_counter
    t0 = clock()
    manifest = load_manifest(folder)
    t1 = clock()
    manifest.verify_files("full")
    t2 = clock()
    manifest.verify_files("stamp")
    t3 = clock()
    rt = BlipRuntime(manifest, OrtSession(manifest, threads=THREADS))
    t4 = clock()
    rt.caption_tokens(images(1, seed=1), **CASE.generation)
    t5 = clock()
    return {"kind": kind, "gb": size, "manifest_s": t1 - t0, "verify_full_s": t2 - t1, "verify_stamp_s": t3 - t2,
            "sessions_s": t4 - t3, "first_caption_s": t5 - t4, "load_avg": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| bundle | size | verify full | per GB | verify stamp | sessions | first caption | load → first result (stamp) | (full) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = r["manifest_s"] + r["sessions_s"] + r["first_caption_s"]
        lines.append(f"| {r['kind']} | {r['gb']:.2f} GB | {r['verify_full_s']:.2f} s | {r['verify_full_s'] / r['gb']:.2f} s | "
                     f"{r['verify_stamp_s'] * 1e3:.2f} ms | {r['sessions_s']:.2f} s | {r['first_caption_s']:.2f} s | "
                     f"{base + r['verify_stamp_s']:.2f} s | {base + r['verify_full_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="base", choices=("base", "tiny"))
    p.add_argument("--kinds", default="fp32,int8-cpu")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as stamps:
        os.environ["BLIP_TRT_STAMPS"] = stamps
        for kind in args.kinds.split(","):
            rows.append(measure(args.scale, kind))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
