"""CPU latency of one BLIP graph per precision form, on ONNX Runtime with a fixed thread count.

Why: `int8` (symmetric int8 Q/DQ) is the form TensorRT needs, but on x86 CPUs ONNX Runtime runs
s8s8 Q/DQ MatMuls through slower kernels than its u8s8 dynamic quantization; this measures whether
`int8-cpu` is worth offering. It times the vision graph (one image) and one decoder step (one row,
one new token after `--past` cached tokens, 577 image tokens of cross-attention at BLIP-base size),
the two graphs that dominate a caption's cost.

    python -m benchmarks.precision_latency [--bundle benchmarks/.cache/base/caption/bundle-fp32]
        [--threads 2] [--runs 20] [--out /tmp/precision-latency]

Graphs are converted without the exclusion search (every MatMul/Gemm/Conv quantized), so the
numbers are the cost of full int8; calibration uses two synthetic images (ranges do not change
speed, and the error column is on those same images: an indication, not an accuracy measure).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from blip_runtime.graphs import ROLE_GEMV
from blip_runtime.manifest import load_manifest


def timings_ms(sessions: dict, feeds: dict, runs: int) -> dict[str, tuple[float, float]]:
    """{form: (median, min) ms}. Forms run in interleaved rounds, so load from other processes on
    a shared machine falls on all of them alike; the minimum is the least disturbed run."""
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(2):
            s.run(names[k], feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(names[k], feeds)
            times[k].append(time.perf_counter() - t)
    return {k: (1000 * float(np.median(v)), 1000 * float(np.min(v))) for k, v in times.items()}


def main() -> None:
    from blip_export.calibration import calibration_feeds
    from blip_export.measure import graph_errors, ort_session, run_all
    from blip_export.precision import synthetic_images, to_fp16
    from blip_export.quantize import to_int8, to_int8_cpu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=str(Path(__file__).parent / ".cache/base/caption/bundle-fp32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--past", type=int, default=10)
    p.add_argument("--out", default="/tmp/precision-latency")
    args = p.parse_args()
    manifest = load_manifest(args.bundle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_feeds(args.bundle, synthetic_images(2, manifest.dims.image_size), batch_size=1,
                              tasks=["caption"], max_new_tokens=args.past + 2, min_new_tokens=args.past + 2)
    # Timed on recorded feeds (a real image; the decoder step after `past` generated tokens), so the
    # error column means something too.
    steps = [f for f in calib["decoder_step"] if f["past_key.0"].shape[2] == args.past and f["input_ids"].shape[1] == 1]
    rows = []
    for graph, feeds in {"vision": calib["vision"][0], "decoder_step": steps[0]}.items():
        src = manifest.graph_path(graph)
        forms = {"fp32": src}
        for name, make in {
            "fp16": lambda d: to_fp16(src, d, graph),
            "int8 (QDQ s8s8)": lambda d: to_int8(src, d, graph, calib[graph], calib[graph][-1:], bound=1e9),
            "int8-cpu (dynamic u8s8)": lambda d: to_int8_cpu(src, d, graph, calib[graph][-1:], bound=1e9,
                                                             gemv=manifest.graphs[graph].has(ROLE_GEMV)),
        }.items():
            dst = out / f"{graph}-{name.split()[0]}.onnx"
            if not dst.is_file():
                make(dst)
            forms[name] = dst
        ref = run_all(ort_session(src, args.threads), [feeds])
        sessions = {name: ort_session(path, args.threads) for name, path in forms.items()}
        times = timings_ms(sessions, feeds, args.runs)
        for name, path in forms.items():
            err = graph_errors(run_all(sessions[name], [feeds]), ref)
            rows.append((graph, name, *times[name], err["rel"], path.stat().st_size / 2**20))
            print(f"{graph:13s} {name:24s} median {rows[-1][2]:8.1f} ms, min {rows[-1][3]:8.1f} ms, "
                  f"rel err {rows[-1][4]:.2e}, {rows[-1][5]:6.1f} MiB", flush=True)
        del sessions
    print("\n| graph | form | median ms | min ms | relative error | file MiB |\n|---|---|---|---|---|---|")
    for graph, name, med, low, rel, mib in rows:
        print(f"| {graph} | {name} | {med:.1f} | {low:.1f} | {rel:.2e} | {mib:.0f} |")

if __name__ == "__main__":
    main()
