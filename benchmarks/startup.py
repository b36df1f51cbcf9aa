"""Start-up of a bundle: time from BlipRuntime.load to the first result, and what verification costs per GB.

Per bundle kind of BLIP-base captioning and of BLIP-2 at real size (ViT-g + Q-Former + OPT-1.3b dims,
benchmarks.blip2_cases; where its bundles are cached), each verify mode in a process of its own (a
fresh process, as a service starts): BlipRuntime.load(bundle, verify=...) and the first caption
(greedy, 20 new tokens); "full" hashes
every file, "stamp" (the default, run after "full" wrote the stamp) only stats them, False skips.
Then, in this process, Manifest.verify_files("full") and ("stamp") alone on each bundle, and the
SHA-256 rate: over bytes in memory (the CPU's bound), over a bundle file in the page cache, and over
a synthetic data file of BLIP-2 size (`--synthetic-gb`, default 5.6: the OPT-2.7b fp16 step graph's
external data that benchmarks/blip2_export_size.py writes) read warm and after dropping its pages
from the page cache (posix_fadvise DONTNEED on that file only), which is what a first load after a
reboot reads. The stamp folder is a temporary one, so every first check is a real one. Writes
RESULTS_startup.md (and startup.json) here.

    python -m benchmarks.startup [--scale base] [--kinds fp32,int8-cpu] [--blip2-kinds fp32,int8,int4] [--synthetic-gb 5.6]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import models
from .blip2_cases import MODEL as BLIP2  # real size at scale base
from .cases import CASES, images
from .contenders import THREADS

HERE = Path(__file__).resolve().parent
CASE = next(c for c in CASES if c.name == "caption-greedy")
MODEL_NAMES = {"caption": "BLIP-base", BLIP2: "BLIP-2 (OPT-1.3b dims)"}
MODES = ("full", "stamp", "off")  # in this order: "full" writes the stamp that "stamp" then finds


def bundle_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def first_result(scale: str, model: str, kind: str, mode: str) -> dict:
    """In this (fresh) process: BlipRuntime.load with verify=mode, then the first caption."""
    from blip_runtime import BlipRuntime

    verify = {"full": "full", "stamp": True, "off": False}[mode]
    folder = models.bundle(scale, model, kind)
    imgs = images(1, seed=1)
    t0 = time.perf_counter()
    rt = BlipRuntime.load(folder, threads=THREADS, verify=verify)
    t1 = time.perf_counter()
    rt.caption_tokens(imgs, **CASE.generation)
    t2 = time.perf_counter()
    return {"model": model, "kind": kind, "mode": mode, "load_s": t1 - t0, "first_caption_s": t2 - t1,
            "to_first_result_s": t2 - t0, "gb": bundle_gb(folder), "load_avg": os.getloadavg()[0]}


def verify_alone(scale: str, model: str, kind: str) -> dict:
    """verify_files("full") then ("stamp") on the bundle, timed in this process."""
    from blip_runtime.manifest import load_manifest

    manifest = load_manifest(models.bundle(scale, model, kind))
    t0 = time.perf_counter()
    manifest.verify_files("full")
    t1 = time.perf_counter()
    manifest.verify_files("stamp")
    t2 = time.perf_counter()
    return {"model": model, "kind": kind, "gb": bundle_gb(manifest.folder), "files": len(manifest.graphs) + 1,
            "full_s": t1 - t0, "stamp_s": t2 - t1}


def hash_rates(scale: str, kind: str, synthetic_gb: float) -> dict:
    """SHA-256 MB/s: in memory, a bundle file in the page cache, a synthetic BLIP-2-size file warm and cold."""
    from blip_runtime.manifest import Manifest, sha256

    block = os.urandom(1 << 22) * 64  # 256 MiB
    t0 = time.perf_counter()
    hashlib.sha256(block).hexdigest()
    rates = {"memory_mb_s": len(block) / 1e6 / (time.perf_counter() - t0)}
    del block
    biggest = max((p for p in models.bundle(scale, CASE.model, kind).iterdir() if p.suffix == ".onnx"),
                  key=lambda p: p.stat().st_size)
    sha256(biggest)  # in the page cache from here on
    t0 = time.perf_counter()
    sha256(biggest)
    rates["bundle_file"] = biggest.name
    rates["bundle_file_mb_s"] = biggest.stat().st_size / 1e6 / (time.perf_counter() - t0)
    if synthetic_gb <= 0:
        return rates
    with tempfile.TemporaryDirectory(dir=HERE / ".cache") as tmp:
        folder, chunk = Path(tmp), os.urandom(1 << 24)  # 16 MiB of random bytes, written over and over
        data, blocks = folder / "llm_step.onnx.data", int(synthetic_gb * 1e9) // len(chunk)
        digest = hashlib.sha256()
        with open(data, "wb") as f:
            for _ in range(blocks):
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        (folder / "tokenizer.json").write_text("{}")
        entries = {"graphs": {"llm_step": {"file": data.name, "sha256": digest.hexdigest()}},
                   "tokenizer": {"file": "tokenizer.json"}}
        manifest = Manifest(folder=folder, data=entries, graphs={}, dims=None)
        size = data.stat().st_size
        for state in ("warm", "cold"):
            if state == "cold":
                with open(data, "rb") as f:  # this file's pages only: nothing else leaves the page cache
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            manifest.verify_files("full")
            rates[f"synthetic_{state}_mb_s"] = size / 1e6 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        manifest.verify_files("stamp")
        rates["synthetic_stamp_s"] = time.perf_counter() - t0
        rates["synthetic_gb"] = size / 1e9
    return rates


def spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.startup", *args], capture_output=True, text=True,
                         cwd=HERE.parent, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(result: dict) -> str:
    """RESULTS_startup.md from startup.json's contents."""
    lines = ["# Start-up: BlipRuntime.load to the first result, and verification per GB", "",
             f"`python -m benchmarks.startup` on {result['when']}, scale `{result['scale']}`, {THREADS} threads, the "
             f"first caption greedy (20 new tokens). Load average (1 min) before / after: {result['load_before']:.2f} / "
             f"{result['load_after']:.2f}: the machine is shared, so times are this run's, not the bundles' best. "
             "Generated from startup.json.", "",
             "## Load to first result (each row a fresh process)", "",
             "verify full: every file hashed; stamp (the default; the stamp written by the full check before it): "
             "only each file's size, times and inode compared; off: verify=False.", "",
             "| model | bundle | size | verify | BlipRuntime.load | first caption | load → first result |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in result["first"]:
        if "error" in r:
            lines.append(f"| {r.get('model', '?')} | {r.get('kind', '?')} | | {r.get('mode', '?')} | failed: "
                         f"{r['error'][:200]} | | |")
            continue
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['kind']} | {r['gb']:.2f} GB | {r['mode']} | "
                     f"{r['load_s']:.2f} s | {r['first_caption_s']:.2f} s | {r['to_first_result_s']:.2f} s |")
    lines += ["", "## Verification alone", "",
              "| model | bundle | size | files | full | full per GB | stamp |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["verify"]:
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['kind']} | {r['gb']:.2f} GB | {r['files']} | "
                     f"{r['full_s']:.2f} s | {r['full_s'] / r['gb']:.2f} s | {r['stamp_s'] * 1e3:.2f} ms |")
    h = result["hash"]
    lines += ["", "## SHA-256 rate", "",
              f"- bytes in memory: {h['memory_mb_s']:.0f} MB/s (hashlib; the CPU's bound, one core)",
              f"- {h['bundle_file']} in the page cache (Manifest's sha256, 4 MiB reads): {h['bundle_file_mb_s']:.0f} MB/s"]
    if "synthetic_gb" in h:
        gb = h["synthetic_gb"]
        lines += [f"- a {gb:.2f} GB data file (the size of BLIP-2 OPT-2.7b's fp16 step graph data), verify_files(\"full\"): "
                  f"warm {h['synthetic_warm_mb_s']:.0f} MB/s ({gb * 1e3 / h['synthetic_warm_mb_s']:.1f} s), cold (its pages "
                  f"dropped first) {h['synthetic_cold_mb_s']:.0f} MB/s ({gb * 1e3 / h['synthetic_cold_mb_s']:.1f} s); "
                  f"verify_files(\"stamp\") {h['synthetic_stamp_s'] * 1e3:.2f} ms",
                  ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="base", choices=("base", "tiny"))
    p.add_argument("--kinds", default="fp32,int8-cpu")
    p.add_argument("--blip2-kinds", default="fp32,int8,int4", help="BLIP-2 real-size bundle kinds (where cached)")
    p.add_argument("--synthetic-gb", type=float, default=5.6, help="size of the synthetic data file; 0: none")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "KIND", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(first_result(args.scale, *args.child)))
        return 0
    load = os.getloadavg()[0]
    result = {"scale": args.scale, "load_before": load, "first": [], "verify": [],
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    bundles = [(CASE.model, k) for k in args.kinds.split(",") if k]
    bundles += [(BLIP2, k) for k in args.blip2_kinds.split(",")
                if k and (models.bundle(args.scale, BLIP2, k) / "manifest.json").is_file()]
    with tempfile.TemporaryDirectory() as stamps:
        os.environ["BLIP_TRT_STAMPS"] = stamps  # children inherit it
        for model, kind in bundles:
            for mode in MODES:
                result["first"].append({"model": model, "kind": kind, "mode": mode,
                                        **spawn(["--scale", args.scale, "--child", model, kind, mode])})
                print(json.dumps(result["first"][-1]), flush=True)
        with tempfile.TemporaryDirectory() as fresh:  # the parent's own checks start without a stamp
            os.environ["BLIP_TRT_STAMPS"] = fresh
            for model, kind in bundles:
                result["verify"].append(verify_alone(args.scale, model, kind))
                print(json.dumps(result["verify"][-1]), flush=True)
            result["hash"] = hash_rates(args.scale, args.kinds.split(",")[0], args.synthetic_gb)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result["hash"]), flush=True)
    (HERE / "startup.json").write_text(json.dumps(result, indent=1))
    (HERE / "RESULTS_startup.md").write_text(report(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
