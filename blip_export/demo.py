"""The main job on the embedded default model: export every shipped easy-VQA checkpoint to ONNX,
then caption, answer and retrieve on a few test-split images, with timings.

    python -m blip_export.demo [--precision fp32 int8 ...] [--output engines]

Bundles go to ./engines under the working folder by default (never into the installed package);
"int8" is the form that runs fastest here, ONNX Runtime's CPU form (pipeline.resolve_precision).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .defaults import default_models, sample_images
from .pipeline import PRECISIONS


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip_export.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=PRECISIONS,
                   help="bundles to build and run (int8: ONNX Runtime's CPU form, int8-cpu)")
    p.add_argument("--output", type=Path, default=Path("engines"),
                   help="parent folder of the bundles (default: ./engines)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    from blip_runtime import BlipRuntime

    from .files import ExportError
    from .pipeline import export, resolve_precision

    models = default_models()
    if not models:
        print("demo: no shipped models found in blip_export/models", file=sys.stderr)
        return 1
    samples = sample_images()
    images = [s["path"] for s in samples]
    for precision in args.precision:
        form = resolve_precision(precision)
        print(f"== {precision} ==" if form == precision else f"== {precision} ({form}) ==")
        runtimes = {}
        for name, folder in models.items():
            try:
                report, seconds = timed(export, folder, args.output / f"{name}-{form}", precision=precision)
            except ExportError as e:
                print(f"demo: {name}: {e}", file=sys.stderr)
                return 1
            errors = (report.accuracy or {}).get("graphs") or report.errors
            worst = max(e["rel"] for e in errors.values())
            versus = "vs fp32" if report.accuracy else "vs PyTorch"
            print(f"exported {name:<16} -> {report.bundle}  ({seconds:.1f} s, worst graph error {versus} {worst:.1e})")
            runtimes[name] = BlipRuntime.load(report.bundle)
        for rt in runtimes.values():
            if "caption" in rt.tasks:
                captions, seconds = timed(rt.caption, images)
                print(f"\ncaptions ({len(images)} images, {1000 * seconds / len(images):.1f} ms/image):")
                for s, c in zip(samples, captions):
                    print(f"  {s['file']:<14} {c}")
            if "vqa" in rt.tasks:
                answers, seconds = timed(rt.answer, images, [s["question"] for s in samples])
                right = sum(a == s["answer"] for a, s in zip(answers, samples))
                print(f"\nVQA ({right}/{len(samples)} right, {1000 * seconds / len(images):.1f} ms/question):")
                for s, a in zip(samples, answers):
                    print(f"  {s['file']:<14} {s['question']:<34} -> {a:<10} (expected {s['answer']})")
        retrieval = next((rt for rt in runtimes.values() if "itc" in rt.tasks), None)
        captioner = next((rt for rt in runtimes.values() if "caption" in rt.tasks), None)
        if retrieval is not None and captioner is not None:
            texts = captioner.caption(images)
            sim, seconds = timed(retrieval.retrieve, images, texts)
            match, itm_seconds = timed(retrieval.match, images, texts)
            print(f"\nretrieval: image -> best of {len(texts)} texts (ITC {1000 * seconds:.0f} ms, "
                  f"ITM {1000 * itm_seconds / len(images):.1f} ms/pair):")
            for i, s in enumerate(samples):
                j = int(sim[i].argmax())
                print(f"  {s['file']:<14} -> {texts[j]!r:<40} similarity {sim[i, j]:.3f}, ITM p(match) {match[i]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
