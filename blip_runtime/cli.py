"""`blip-run BUNDLE TASK ...`: captions, VQA answers, image-text match scores and ITC features
from an engine bundle written by `blip-export`.

    blip-run BUNDLE caption IMAGE... [--prompt P] [--num-beams N] [--max-new-tokens N]
                                     [--num-return-sequences N] ...
    blip-run BUNDLE vqa IMAGE... --question Q            (one for all images, or one per image)
    blip-run BUNDLE itm IMAGE... --text T                (one for all images, or one per image)
    blip-run BUNDLE embed [--image IMAGE]... [--text T]...

Global flags (before or after the task): --json, --threads N, --providers cpu|cuda|trt,
--backend onnxruntime|openvino|auto, --batch-size N; and --version. Human output is one
`path: result` line per image (per sequence with --num-return-sequences), then the time taken;
--json prints one object: the bundle, task, generation options given, `results` (a list of
objects with the inputs and the results: "caption" or "answer", or with --num-return-sequences
N > 1 "captions" / "answers", a list of N, best first), `seconds` (inference) and `load_seconds`.

Exit codes: 0 done; 1 a bad bundle, image or input (one line `blip-run: <reason>` on stderr);
2 bad command line. With --json a failure also prints one object on stdout:
{"error": "<reason>", "exit_code": 1 or 2}. Only numpy, pillow, tokenizers and onnxruntime (and
openvino for --backend openvino / auto) are used, imported after the command line is parsed so
that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Each choice keeps CPU as the last resort for nodes the accelerated provider does not take;
# TensorRT goes through CUDA first, as ONNX Runtime's TensorRT provider expects.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
BACKENDS = ("onnxruntime", "openvino", "auto")  # BlipRuntime.load(backend=...), imported lazily there
TASK_OF = {"caption": "caption", "vqa": "vqa", "itm": "itm", "embed": "itc"}  # command -> bundle task
SAMPLING = ("temperature", "top_k", "top_p", "seed")  # only mean something with --sample


class InputError(ValueError):
    """A bad bundle, image or input: reported as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, plus the JSON error object on stdout when --json is on the command line (the
    subcommand parsers are of this class too: add_subparsers makes them of the parent's type)."""

    json_errors = False  # set by main for the run

    def error(self, message: str):
        if _Parser.json_errors:
            print(_dumps({"error": f"{self.prog}: {message}", "exit_code": 2}))
        super().error(message)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("blip-trt")
    except Exception:  # running from a source tree that was never installed
        return "unknown"


def _number(kind, ok, expected: str):
    """An argparse type: `kind(text)` that satisfies `ok`; argparse names the flag in its error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


POSITIVE = _number(int, lambda v: v >= 1, "at least 1")
COUNT = _number(int, lambda v: v >= 0, ">= 0")
FACTOR = _number(float, lambda v: 0 < v < math.inf, "> 0")


def parser() -> argparse.ArgumentParser:
    # Global flags live on a parent parser shared by every subcommand with SUPPRESS defaults, so
    # they may come before or after the task without the subparser resetting them.
    def add_global(p: argparse.ArgumentParser, suppress: bool) -> None:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p.add_argument("--json", action="store_true", default=d(False), help="machine output: one JSON object")
        p.add_argument("--threads", type=POSITIVE, default=d(None), metavar="N", help="intra-op threads (ONNX Runtime's, OpenVINO's)")
        p.add_argument("--providers", choices=sorted(PROVIDERS), default=d("cpu"),
                       help="execution provider, with CPU fallback (default: cpu)")
        p.add_argument("--backend", choices=BACKENDS, default=d("onnxruntime"),
                       help="onnxruntime (default); openvino: every graph on OpenVINO's CPU plugin; auto: "
                            "OpenVINO for an fp32 bundle's image graphs, ONNX Runtime for the decoding loop")
        p.add_argument("--batch-size", type=POSITIVE, default=d(None), metavar="N",
                       help="images per run (default: the bundle's max batch); results do not depend on it")

    common = _Parser(add_help=False)
    add_global(common, suppress=True)

    gen = _Parser(add_help=False)
    g = gen.add_argument_group("generation (default: the checkpoint's generation config)")
    g.add_argument("--num-beams", metavar="N", type=POSITIVE, help="beam search with N beams (1: greedy)")
    g.add_argument("--max-new-tokens", metavar="N", type=POSITIVE)
    g.add_argument("--min-new-tokens", metavar="N", type=COUNT)
    g.add_argument("--repetition-penalty", metavar="F", type=FACTOR, help="> 1 discourages repeated tokens")
    g.add_argument("--length-penalty", metavar="F", type=_number(float, math.isfinite, "finite"),
                   help="beam score = sum log p / length ** F")
    g.add_argument("--sample", dest="do_sample", action="store_const", const=True, help="sample instead of argmax")
    g.add_argument("--temperature", metavar="F", type=FACTOR)
    g.add_argument("--top-k", metavar="K", type=COUNT, help="0 disables")
    g.add_argument("--top-p", metavar="P", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1]"))
    g.add_argument("--seed", metavar="S", type=COUNT, help="same seed, same samples")
    g.add_argument("--num-return-sequences", metavar="N", type=POSITIVE,
                   help="N results per image, best first (at most --num-beams; any N with --sample)")

    p = _Parser(
        prog="blip-run",
        description="Run a BLIP engine bundle (written by blip-export) on images and texts.",
        epilog="exit codes: 0 done, 1 bad bundle/image/input, 2 bad command line",
    )
    add_global(p, suppress=False)
    p.add_argument("--version", action="version", version=f"blip-run {_version()}")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (manifest.json, *.onnx, tokenizer.json)")
    sub = p.add_subparsers(dest="command", required=True, metavar="TASK")

    c = sub.add_parser("caption", parents=[common, gen], help="caption images")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--prompt", action="append",
                   help="text the caption continues (and includes); once for all images or once per image")

    v = sub.add_parser("vqa", parents=[common, gen], help="answer a question about each image")
    v.add_argument("images", nargs="+", metavar="IMAGE")
    v.add_argument("--question", "-q", action="append", required=True,
                   help="once for all images, or once per image in order")

    m = sub.add_parser("itm", parents=[common], help="probability that each image matches its text")
    m.add_argument("images", nargs="+", metavar="IMAGE")
    m.add_argument("--text", "-t", action="append", required=True,
                   help="once for all images, or once per image in order")

    e = sub.add_parser("embed", parents=[common], help="ITC features; image x text similarity when both are given")
    e.add_argument("--image", "-i", dest="images", action="append", default=[], metavar="IMAGE")
    e.add_argument("--text", "-t", dest="texts", action="append", default=[], metavar="TEXT")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say alone; exits 2 through `p.error`."""
    if args.command == "embed" and not (args.images or args.texts):
        p.error("embed: give at least one --image or --text")
    per_image = {"caption": "prompt", "vqa": "question", "itm": "text"}.get(args.command)
    given = getattr(args, per_image, None) if per_image else None
    if given is not None and len(given) not in (1, len(args.images)):
        p.error(f"{args.command}: {len(given)} --{per_image} for {len(args.images)} image(s); "
                "give one for all images or one per image")
    if args.command in ("caption", "vqa") and not args.do_sample:
        wrong = [f"--{n.replace('_', '-')}" for n in SAMPLING if getattr(args, n) is not None]
        if wrong:
            p.error(f"{', '.join(wrong)}: only with --sample")


def _generation(args: argparse.Namespace) -> dict:
    """The generation options given on the command line; the bundle's defaults fill the rest."""
    names = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
             "do_sample", *SAMPLING, "num_return_sequences")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _check_texts(args: argparse.Namespace) -> None:
    """Texts from argv that were not valid UTF-8 reach Python as lone surrogates (byte 0xff becomes
    U+DCFF): name the flag instead of failing in the tokenizer."""
    from .text import check_text

    for flag, values in (("--prompt", getattr(args, "prompt", None)), ("--question", getattr(args, "question", None)),
                         ("--text", getattr(args, "text", None) or getattr(args, "texts", None))):
        for i, value in enumerate(values or []):
            check_text(value, flag if len(values) == 1 else f"{flag} #{i + 1}")


def _check_images(paths: list[str]) -> None:
    """Fail before the bundle loads if an image cannot be opened (the header only; the runtime
    decodes it and reports a broken body the same way)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: cannot read image: {e}") from None


def _spread(values: list[str] | None, n: int) -> list[str] | None:
    if values is None:
        return None
    return values * n if len(values) == 1 else values


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, start + size)


def _plural(key: str, out: list) -> str:
    """One string per image goes under `key`; a list per image (several sequences) under `key`s."""
    return key + "s" if out and isinstance(out[0], list) else key


def _run(rt, args, size: int) -> dict:
    """Run the task; returns {"results": [...], and "similarity" for embed}."""
    images = args.images
    opts = _generation(args) if args.command in ("caption", "vqa") else {}
    if args.command == "caption":
        prompts = _spread(args.prompt, len(images))
        out = []
        for s in _batches(len(images), size):
            out += rt.caption(images[s], prompt=prompts[s] if prompts else None, **opts)
        key = _plural("caption", out)
        return {"results": [{"image": im, **({"prompt": prompts[i]} if prompts else {}), key: c}
                            for i, (im, c) in enumerate(zip(images, out))]}
    if args.command == "vqa":
        questions = _spread(args.question, len(images))
        out = []
        for s in _batches(len(images), size):
            out += rt.answer(images[s], questions[s], **opts)
        key = _plural("answer", out)
        return {"results": [{"image": im, "question": q, key: a} for im, q, a in zip(images, questions, out)]}
    if args.command == "itm":
        texts = _spread(args.text, len(images))
        probs = []
        for s in _batches(len(images), size):
            probs += [float(x) for x in rt.match(images[s], texts[s])]
        return {"results": [{"image": im, "text": t, "probability": p} for im, t, p in zip(images, texts, probs)]}
    # embed
    import numpy as np

    img = [rt.image_features(images[s]) for s in _batches(len(images), size)]
    txt = [rt.text_features(args.texts[s]) for s in _batches(len(args.texts), size)]
    img = np.concatenate(img) if img else None
    txt = np.concatenate(txt) if txt else None
    results = [{"image": im, "features": f} for im, f in zip(images, img if img is not None else [])]
    results += [{"text": t, "features": f} for t, f in zip(args.texts, txt if txt is not None else [])]
    out = {"results": results}
    if img is not None and txt is not None:
        out["similarity"] = rt.similarity(img, txt)
    return out


def _print_human(args, out: dict, seconds: float, load_seconds: float) -> None:
    results = out["results"]
    if args.command == "caption":
        for r in results:
            for tag, c in _numbered(r, "caption"):
                print(f"{r['image']}{tag}: {c}")
    elif args.command == "vqa":
        for r in results:
            for tag, a in _numbered(r, "answer"):
                print(f"{r['image']}{tag}: {r['question']} -> {a}")
    elif args.command == "itm":
        for r in results:
            print(f"{r['image']}: {r['probability']:.4f}  {json.dumps(r['text'], ensure_ascii=False)}")
    elif "similarity" in out:
        images = [r["image"] for r in results if "image" in r]
        texts = [r["text"] for r in results if "text" in r]
        # Rows: images; columns: texts, headed by their number (the texts are listed below).
        width = max(len(p) for p in images)
        print(" " * width + "".join(f"  {'text ' + str(j + 1):>9}" for j in range(len(texts))))
        for path, row in zip(images, out["similarity"]):
            print(f"{path:<{width}}" + "".join(f"  {x:>9.4f}" for x in row))
        for j, t in enumerate(texts):
            print(f"text {j + 1}: {json.dumps(t, ensure_ascii=False)}")
    else:
        import numpy as np

        for r in results:
            name = r["image"] if "image" in r else json.dumps(r["text"], ensure_ascii=False)
            f = r["features"]
            print(f"{name}: {f.shape[0]} features, norm {float(np.linalg.norm(f)):.4f}")
    n = len(args.images) if args.images else len(args.texts)
    print(f"({args.command}, {n} input(s): {seconds:.2f} s; bundle loaded in {load_seconds:.2f} s)")


def _numbered(result: dict, key: str):
    """(tag, text) per sequence: ("", text) for one, (" [1]", best), (" [2]", ...) for several."""
    if key in result:
        return [("", result[key])]
    return [(f" [{i + 1}]", t) for i, t in enumerate(result[key + "s"])]


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()  # float32 values become the Python floats that represent them exactly
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = "--json" in argv
    try:
        p = parser()
        args = p.parse_args(argv)
        _check_args(p, args)
    finally:
        _Parser.json_errors = False
    try:
        _check_texts(args)
        _check_images(args.images)
        bundle = Path(args.bundle)
        if not bundle.is_dir():
            raise InputError(f"{bundle}: no such bundle folder")
        from .runtime import BlipRuntime  # numpy, tokenizers, onnxruntime: only now

        start = time.perf_counter()
        try:
            # --providers cpu is the default: only a device provider conflicts with OpenVINO
            providers = None if args.backend == "openvino" and args.providers == "cpu" else PROVIDERS[args.providers]
            rt = BlipRuntime.load(bundle, providers=providers, threads=args.threads, backend=args.backend)
        except ImportError as e:
            raise InputError(f"{e}; install onnxruntime (or onnxruntime-gpu for --providers cuda/trt)") from None
        except ValueError:  # BundleError: its message already says what is wrong
            raise
        except Exception as e:
            # ONNX Runtime's own errors (a corrupt or foreign graph file) derive from Exception
            # only; anything else is a bug and keeps its traceback.
            if not (isinstance(e, OSError) or type(e).__module__.startswith("onnxruntime")):
                raise
            raise InputError(f"{bundle}: ONNX Runtime cannot load the bundle: {e}") from None
        load_seconds = time.perf_counter() - start
        task = getattr(rt, "COMMAND_TASKS", TASK_OF)[args.command]  # a family may name its tasks otherwise
        if task not in rt.tasks:
            raise InputError(f"{bundle}: this bundle has no {task!r} task (it has {', '.join(rt.tasks)}); "
                             f"export a checkpoint that does {task}")
        size = args.batch_size or int(rt.manifest.data.get("limits", {}).get("max_batch", 8))
        start = time.perf_counter()
        out = _run(rt, args, size)
        seconds = time.perf_counter() - start
    except ValueError as e:  # InputError, BundleError and the runtime's input checks
        return _fail(args, " ".join(str(e).split()))  # one line, always
    except KeyboardInterrupt:
        return _fail(args, "interrupted")
    if args.json:
        doc = {"bundle": str(bundle), "task": args.command}
        if args.command in ("caption", "vqa"):
            doc["options"] = _generation(args)
        doc.update(_jsonable(out))
        doc["seconds"] = seconds
        doc["load_seconds"] = load_seconds
        print(_dumps(doc))
    else:
        _print_human(args, out, seconds, load_seconds)
    return 0


def _dumps(doc: dict) -> str:
    """JSON text; file names that are not UTF-8 (lone surrogates in Python) as \\u escapes, so that
    the output stays valid UTF-8 and json.loads gives back the same str."""
    text = json.dumps(doc, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc)
    return text


def _fail(args: argparse.Namespace, reason: str) -> int:
    """One line on stderr; with --json also one object on stdout. Exit code 1."""
    print(f"blip-run: {reason}", file=sys.stderr)
    if args.json:
        print(_dumps({"bundle": args.bundle, "task": args.command, "error": f"blip-run: {reason}", "exit_code": 1}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
