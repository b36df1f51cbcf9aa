"""The main job on the embedded default models: export every shipped easy-VQA checkpoint (BLIP's
three and BLIP-2's three) to ONNX, then caption, answer and retrieve on a few test-split images with
BLIP and BLIP-2 (OPT and Flan-T5-style) side by side, with timings.

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

# How the demo names each shipped model in its lines (another checkpoint is shown by its folder name).
LABELS = {"easyvqa-caption": "BLIP", "easyvqa-vqa": "BLIP", "easyvqa-itm": "BLIP",
          "easyvqa-blip2-opt": "BLIP-2 OPT", "easyvqa-blip2-t5": "BLIP-2 T5", "easyvqa-blip2-itm": "BLIP-2"}


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


def roles(runtimes: dict) -> tuple[list, list, list]:
    """(captioners, answerers, retrievers): [(label, runtime)] in the models' order. A BLIP-2 LM
    bundle ("generate") does both captions (no prompt) and VQA."""
    def having(*tasks):
        return [(LABELS.get(name, name), rt) for name, rt in runtimes.items() if set(tasks) & set(rt.tasks)]

    return having("caption", "generate"), having("vqa", "generate"), having("itc")


def show_captions(captioners, samples, images) -> list[str]:
    """Prints each model's caption per image; returns the first model's (the texts retrieval ranks)."""
    out, ms = [], []
    for _, rt in captioners:
        captions, seconds = timed(rt.caption, images)
        out.append([c.strip() for c in captions])
        ms.append(1000 * seconds / len(images))
    width = max(len(label) for label, _ in captioners)
    print(f"\ncaptions ({len(images)} images; ms/image: "
          + ", ".join(f"{label} {t:.1f}" for (label, _), t in zip(captioners, ms)) + "):")
    for i, s in enumerate(samples):
        for k, (label, _) in enumerate(captioners):
            print(f"  {s['file'] if k == 0 else '':<14} {label:<{width}}  {out[k][i]}")
    return out[0]


def show_answers(answerers, samples, images) -> None:
    questions = [s["question"] for s in samples]
    out, ms = [], []
    for _, rt in answerers:
        answers, seconds = timed(rt.answer, images, questions)
        out.append([a.strip() for a in answers])
        ms.append(1000 * seconds / len(images))
    print(f"\nVQA ({len(images)} questions; right and ms/question: "
          + ", ".join(f"{label} {sum(a == s['answer'] for a, s in zip(o, samples))}/{len(samples)} {t:.1f}"
                      for (label, _), o, t in zip(answerers, out, ms)) + "):")
    for i, s in enumerate(samples):
        said = " | ".join(f"{label} {o[i]}" for (label, _), o in zip(answerers, out))
        print(f"  {s['file']:<14} {s['question']:<34} -> {said}  (expected {s['answer']})")


def show_retrieval(label, rt, samples, images, texts) -> None:
    sim, seconds = timed(rt.retrieve, images, texts)
    match, itm_seconds = timed(rt.match, images, texts)
    print(f"\nretrieval, {label}: image -> best of {len(texts)} texts (ITC {1000 * seconds:.0f} ms, "
          f"ITM {1000 * itm_seconds / len(images):.1f} ms/pair):")
    for i, s in enumerate(samples):
        j = int(sim[i].argmax())
        print(f"  {s['file']:<14} -> {texts[j]!r:<40} similarity {sim[i, j]:.3f}, ITM p(match) {match[i]:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    from blip_runtime import BlipRuntime

    from .files import ExportError
    from .pipeline import export, resolve_precision

    models = {**default_models("blip"), **default_models("blip-2")}  # BLIP's lines first, then BLIP-2's
    if not models:
        print("demo: no shipped models found in blip_export/models", file=sys.stderr)
        return 1
    samples = sample_images()
    images = [s["path"] for s in samples]
    width = max(map(len, models))
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
            print(f"exported {name:<{width}} -> {report.bundle}  "
                  f"({seconds:.1f} s, worst graph error {versus} {worst:.1e})")
            runtimes[name] = BlipRuntime.load(report.bundle)
        captioners, answerers, retrievers = roles(runtimes)
        texts = show_captions(captioners, samples, images) if captioners else None
        if answerers:
            show_answers(answerers, samples, images)
        for label, rt in retrievers if texts else ():
            show_retrieval(label, rt, samples, images, texts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
