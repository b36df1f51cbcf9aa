"""`blip-export MODEL_DIR --target onnx`: a checkpoint folder to an engine bundle.

Exit codes: 0 done; 1 export failed (one-line reason); 2 bad command line. With --json, stdout
carries one JSON object, on success and on failure alike (the exit codes stay the same).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from blip_runtime.graphs import Limits

from .defaults import default_models, resolve_model
from .families import known_tasks
from .pipeline import PRECISIONS

TASKS = known_tasks()  # of every family (blip_export.families)


class UsageError(Exception):
    """A bad command line (exit code 2); the message is argparse's."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting, so --json can report it as JSON
        raise UsageError(message)


def version() -> str:
    """The installed package's version (no torch import: --version answers at once)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("blip-trt")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="blip-export",
        description="Export a Hugging Face BLIP checkpoint folder to ONNX graphs (an engine bundle).",
    )
    names = ", ".join(default_models()) or "none installed"
    p.add_argument(
        "model",
        nargs="?",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json, processor_config.json or "
        f"preprocessor_config.json), or the short name of a shipped model ({names}); omitted: export every "
        "shipped model, one bundle each under --output",
    )
    p.add_argument("--target", choices=("onnx", "trt"), default="onnx", help="onnx: ONNX Runtime bundle (default)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp16: fp16 graph with fp32 islands; int8: the fastest int8 form for the target (int8-cpu for "
        "--target onnx, int8-qdq for --target trt); int8-cpu: ONNX Runtime's CPU form (dynamic int8 MatMul); "
        "int8-qdq: symmetric Q/DQ, calibrated (what TensorRT takes; in an ONNX bundle, for ONNX Runtime's "
        "TensorRT or CUDA providers: slower than fp32 on a CPU); int4: --target onnx, the decoding loop's step "
        "graph with 4-bit weights (MatMulNBits), the other graphs int8-cpu",
    )
    p.add_argument("--calib-images", type=Path,
                   help="folder of images to calibrate int8-qdq on (default: the calibration set shipped with the package)")
    p.add_argument("--quantize-all", action="store_true",
                   help="int8 forms: quantize every layer, skipping the measured search that keeps the layers "
                   "which lose too much accuracy in fp32 (for speed measurements; the manifest still reports the error)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, reused between builds")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all the checkpoint has)")
    p.add_argument("--output", "-o", type=Path,
                   help="bundle folder: new, empty, or a bundle to replace; a folder holding anything else is "
                   "refused (default: ./engines/<model>-<precision>); with no model: the parent folder of the bundles")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-text-len", type=int, default=Limits.max_text_len)
    p.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens)
    p.add_argument("--num-beams", type=int, default=Limits.num_beams)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (bundles written, tasks, errors, accuracy; or the error)")
    p.add_argument("--version", action="version", version=f"blip-export {version()}")
    return p


def _check(args) -> str | None:
    """What the parser cannot check itself, as one line, or None."""
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        wrong = [t for t in tasks if t not in TASKS]
        if wrong or not tasks:
            return f"--tasks {args.tasks}: expected some of {','.join(TASKS)}, comma-separated"
    for name in ("max_batch", "max_text_len", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.quantize_all and not args.precision.startswith("int"):
        return f"--quantize-all applies to --precision int8, int8-cpu, int8-qdq or int4, not {args.precision}"
    return None


def _progress(quiet: bool):
    """A progress callback and its closer: a one-line tqdm status on a terminal; plain lines when
    stderr is a file or a pipe (tqdm would write `\\r`-joined repeats on one line there)."""
    if quiet:
        return (lambda msg: None), (lambda: None), (lambda: None)
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", file=sys.stderr)

        def say(msg: str) -> None:
            bar.set_description_str(f"blip-export: {msg}")
            bar.update()

        return say, bar.clear, bar.close

    def plain(msg: str) -> None:
        print(f"blip-export: {msg}", file=sys.stderr, flush=True)

    return plain, (lambda: None), (lambda: None)


_SIGNALLED: list[int] = []  # signals _terminate received during this export


def _terminate(signum, frame):
    # SIGTERM and SIGINT take KeyboardInterrupt's path: every staging folder is removed on the way out.
    # Raised where Python ignores exceptions (a weakref callback, __del__: one fired inside an import
    # lock's callback, and the export ran to the end), the interrupt is lost; the record makes the next
    # progress report raise it again (_honour_signals).
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _honour_signals(say):
    """`say`, raising KeyboardInterrupt first if a signal arrived that was not acted on."""
    def checked(msg: str) -> None:
        if _SIGNALLED:
            raise KeyboardInterrupt
        say(msg)
    return checked


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    done: list[dict] = []

    def fail(message: str, code: int) -> int:
        if as_json:
            print(json.dumps({"ok": False, "error": message, "exit_code": code, "bundles": done}))
        else:
            print(f"blip-export: {message}", file=sys.stderr)
        return code

    try:
        args = parser().parse_args(argv)
    except UsageError as e:
        if not as_json:
            parser().print_usage(sys.stderr)
        return fail(str(e), 2)
    problem = _check(args)
    if problem:
        return fail(problem, 2)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    limits = Limits(args.max_batch, args.max_text_len, args.max_new_tokens, args.num_beams)

    from .errors import CheckpointError
    from .files import ExportError, check_output
    from .pipeline import export, output_for, resolve_precision

    try:
        form = resolve_precision(args.precision, args.target)
        if args.model is None:
            suffix = f"-{form}" + ("-trt" if args.target == "trt" else "")
            jobs = [(path, args.output / f"{name}{suffix}" if args.output else output_for(path, form, args.target))
                    for name, path in default_models().items()]
            if not jobs:
                return fail("no shipped models in this installation; give a checkpoint folder", 1)
        else:
            folder = resolve_model(args.model)
            jobs = [(folder, args.output or output_for(folder, form, args.target))]
        jobs = [(folder, check_output(output)) for folder, output in jobs]  # every destination before any work
    except ExportError as e:
        return fail(str(e), 1)

    _SIGNALLED.clear()
    try:
        previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (main() called from a worker thread): leave the signals alone
        previous = {}
    say, clear, close = _progress(args.quiet or as_json)
    say = _honour_signals(say)
    try:
        for folder, output in jobs:
            try:
                report = export(folder, output, tasks=tasks, precision=args.precision, target=args.target,
                                limits=limits, calib_images=args.calib_images, timing_cache=args.timing_cache,
                                quantize_all=args.quantize_all, progress=say)
            except (CheckpointError, ExportError) as e:
                close()
                return fail(str(e), 1)
            except KeyboardInterrupt:
                close()
                return fail(f"interrupted; {output} was not written", 1)
            clear()
            done.append(report.to_dict())
            if as_json:
                continue
            for note in report.notes:
                print(f"blip-export: note: {note}", file=sys.stderr)
            if not args.quiet:
                for graph, err in report.errors.items():
                    print(f"  {graph:<14} max abs error {err['max_abs']:.2e}  relative {err['rel']:.2e}  "
                          "(ONNX Runtime fp32 vs reference)")
                for graph, err in ((report.accuracy or {}).get("graphs") or {}).items():
                    print(f"  {graph:<14} max abs error {err['max_abs']:.2e}  relative {err['rel']:.2e}  "
                          f"({report.precision} vs fp32)")
                for task, value in ((report.accuracy or {}).get("end_to_end") or {}).items():
                    print(f"  end to end {task}: {value}")
            print(f"{report.bundle}  {report.precision}  tasks: {','.join(report.tasks)}  ({report.seconds:.1f} s)")
    finally:
        close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if as_json:
        print(json.dumps({"ok": True, "version": version(), "bundles": done}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
