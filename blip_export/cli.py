"""`blip-export MODEL_DIR --target onnx`: a checkpoint folder to an engine bundle.

Exit codes: 0 done; 1 export failed (one-line reason); 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blip_runtime.graphs import Limits

from .defaults import default_models, resolve_model
from .pipeline import PRECISIONS

TASKS = ("caption", "vqa", "itm", "itc")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blip-export",
        description="Export a Hugging Face BLIP checkpoint folder to ONNX graphs (an engine bundle).",
    )
    names = ", ".join(default_models()) or "none installed"
    p.add_argument(
        "model",
        nargs="?",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json, preprocessor_config.json), or the "
        f"short name of a shipped model ({names}); omitted: export every shipped model, one bundle each under --output",
    )
    p.add_argument("--target", choices=("onnx", "trt"), default="onnx", help="onnx: ONNX Runtime bundle (default)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp16: fp16 graph with fp32 islands; int8: symmetric Q/DQ int8 (what TensorRT takes; calibrated); "
        "int8-cpu: ONNX Runtime's fastest CPU form (dynamic int8 MatMul)",
    )
    p.add_argument("--calib-images", type=Path,
                   help="folder of images to calibrate int8 on (default: the calibration set shipped with the package)")
    p.add_argument("--quantize-all", action="store_true",
                   help="int8 forms: quantize every layer, skipping the measured search that keeps the layers "
                   "which lose too much accuracy in fp32 (for speed measurements; the manifest still reports the error)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, reused between builds")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all the checkpoint has)")
    p.add_argument("--output", "-o", type=Path,
                   help="bundle folder (default: engines/<model>-<precision>); with no model: the parent folder of the bundles")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-text-len", type=int, default=Limits.max_text_len)
    p.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens)
    p.add_argument("--num-beams", type=int, default=Limits.num_beams)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if tasks:
        wrong = [t for t in tasks if t not in TASKS]
        if wrong:
            print(f"blip-export: --tasks {','.join(wrong)}: expected some of {','.join(TASKS)}", file=sys.stderr)
            return 2
    for name in ("max_batch", "max_text_len", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            print(f"blip-export: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.quantize_all and not args.precision.startswith("int8"):
        print(f"blip-export: --quantize-all applies to --precision int8 or int8-cpu, not {args.precision}", file=sys.stderr)
        return 2
    limits = Limits(args.max_batch, args.max_text_len, args.max_new_tokens, args.num_beams)

    from tqdm import tqdm

    from .bundle import ExportError
    from .errors import CheckpointError
    from .pipeline import export

    bar = tqdm(total=None, disable=args.quiet, bar_format="{desc} [{elapsed}]", file=sys.stderr)

    def progress(msg: str) -> None:
        bar.set_description_str(f"blip-export: {msg}")
        bar.update()

    if args.model is None:
        suffix = f"-{args.precision}" + ("-trt" if args.target == "trt" else "")
        jobs = [(path, args.output / f"{name}{suffix}" if args.output else None)
                for name, path in default_models().items()]
        if not jobs:
            print("blip-export: no shipped models in this installation; give a checkpoint folder", file=sys.stderr)
            return 1
    else:
        jobs = [(resolve_model(args.model), args.output)]
    for folder, output in jobs:
        try:
            report = export(folder, output, tasks=tasks, precision=args.precision, target=args.target, limits=limits,
                            calib_images=args.calib_images, timing_cache=args.timing_cache,
                            quantize_all=args.quantize_all, progress=progress)
        except (CheckpointError, ExportError) as e:
            bar.close()
            print(f"blip-export: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            print("blip-export: interrupted; nothing was written", file=sys.stderr)
            return 1
        bar.clear()
        if not args.quiet:
            for graph, err in report.errors.items():
                print(f"  {graph:<14} max abs error {err['max_abs']:.2e}  relative {err['rel']:.2e}  (ONNX Runtime fp32 vs reference)")
            for graph, err in ((report.accuracy or {}).get("graphs") or {}).items():
                print(f"  {graph:<14} max abs error {err['max_abs']:.2e}  relative {err['rel']:.2e}  ({args.precision} vs fp32)")
            for task, value in ((report.accuracy or {}).get("end_to_end") or {}).items():
                print(f"  end to end {task}: {value}")
        print(f"{report.bundle}  tasks: {','.join(report.tasks)}  ({report.seconds:.1f} s)")
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
