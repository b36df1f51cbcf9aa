"""The whole `blip-export` job: fp32 ONNX graphs, then the precision, then TensorRT engines.

Each stage writes a complete bundle; intermediate bundles live in a staging folder beside the
output and the final one is moved into place, so a failure at any stage leaves nothing behind.

Precisions. "int8" asks for the fastest int8 form where the bundle runs: ONNX Runtime's CPU form
(dynamic int8 MatMul and ONNX Runtime's attention operator: "int8-cpu") for --target onnx, symmetric
Q/DQ ("int8-qdq", the only int8 TensorRT builds) for --target trt. The Q/DQ form in an ONNX bundle,
for ONNX Runtime's TensorRT or CUDA providers, is asked for by name: --precision int8-qdq. On a CPU,
ONNX Runtime runs Q/DQ graphs slower than fp32 (it dequantizes around every MatMul). The manifest's
"precision" is always the form ("int8-cpu" or "int8-qdq"), never the bare "int8".

"int4" (--target onnx only): the graphs that run in the decoding loop one row at a time (the
decoder or LM step: ROLE_GEMV) with 4-bit weights (ONNX Runtime's MatMulNBits, weight_only.py), the
others in int8-cpu's form; it converts from the same fp32 bundle as int8-cpu.
"""

from __future__ import annotations

import time
from pathlib import Path

from blip_runtime.graphs import Limits
from blip_runtime.image import load_image

from .bundle import ExportReport, default_output, export_bundle
from .config import read_config
from .defaults import calibration_images, calibration_texts
from .families import family
from .files import ExportError, check_output, staging

FORMS = ("fp32", "fp16", "int8-cpu", "int8-qdq", "int4")  # what a bundle holds (its manifest's "precision")
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "int8-qdq", "int4")  # what may be asked for
TARGETS = ("onnx", "trt")
# Forms that run on ONNX Runtime only: TensorRT cannot build them, and they are converted from fp32
# graphs that use ONNX Runtime's own operators (export_bundle(ort_attention=True)).
ORT_ONLY = frozenset({"int8-cpu", "int4"})
HELD_OUT_IMAGES = 8  # of the shipped calibration set, for the forms that calibrate nothing
CALIBRATED = frozenset({"int8-qdq"})  # forms with static activation scales from calibration images


def resolve_precision(precision: str, target: str = "onnx") -> str:
    """The form of `precision` for `target`: "int8" -> "int8-cpu" (onnx) or "int8-qdq" (trt); the
    others are forms already. ExportError for an unknown name or a form `target` cannot run."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise ExportError(f"--target {target}: expected onnx or trt")
    if precision == "int8":
        return "int8-qdq" if target == "trt" else "int8-cpu"
    if target == "trt" and precision in ORT_ONLY:
        raise ExportError(f"--precision {precision} is ONNX Runtime's CPU form; TensorRT takes --precision int8 "
                          "(Q/DQ, also named int8-qdq)")
    return precision


def output_for(checkpoint: str | Path, precision: str, target: str = "onnx") -> Path:
    """The default bundle folder: ./engines/<model>-<form>[-trt] under the working folder."""
    form = resolve_precision(precision, target)
    return default_output(Path(checkpoint), form if target == "onnx" else f"{form}-trt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_images(folder: Path) -> list[Path]:
    """The images of `folder` (sorted), or ExportError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--calib-images {folder}: not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise ExportError(f"--calib-images {folder}: expected at least 2 images ({', '.join(IMAGE_SUFFIXES)})")
    for path in images:
        try:
            load_image(path)
        except ValueError as e:
            raise ExportError(f"--calib-images: {e}") from None
    return images


def export(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    tasks: list[str] | None = None,
    precision: str = "fp32",
    target: str = "onnx",
    limits: Limits = Limits(),
    calib_images: str | Path | None = None,
    timing_cache: str | Path | None = None,
    quantize_all: bool = False,
    progress=None,
) -> ExportReport:
    """Export `checkpoint` to a bundle of `precision` for `target` ("onnx" or "trt") at `output`
    (default: output_for). precision: one of PRECISIONS; "int8" is resolved for the target
    (resolve_precision) and the report's and manifest's precision say which form was written.
    quantize_all: int8 forms quantize every layer instead of keeping the ones that lose too much in fp32."""
    start = time.time()
    form = resolve_precision(precision, target)
    ort_forms = True  # the family has ONNX Runtime attention forms to convert int8-cpu / int4 from
    if form != "fp32" and Path(checkpoint).is_dir():  # a form the family cannot convert to stops at once
        first = read_config(Path(checkpoint))
        family(first.family).check_precision(first, form)
        ort_forms = family(first.family).ort_attention_forms
    dest = check_output(output if output else output_for(checkpoint, precision, target))  # before any work
    build_engines = None
    if target == "trt":  # before any work: a machine without TensorRT or a GPU stops at once
        from .trt_build import build_engines, check_trt_available

        reason = check_trt_available()
        if reason:
            raise ExportError(f"--target trt: {reason}; use --target onnx")
    calib = find_images(Path(calib_images)) if calib_images else None
    calib_texts = None
    if form != "fp32" and calib is None:  # the shipped set, with each image's caption and question:
        # int8-qdq calibrates on it (a quarter held out); the other forms calibrate nothing and measure
        # their accuracy (and run their search) on HELD_OUT_IMAGES of it: real images, few enough that
        # the recorded feeds of a large model stay small
        calib, calib_texts = calibration_images(), calibration_texts()
        if form not in CALIBRATED:
            calib, calib_texts = calib[:HELD_OUT_IMAGES], calib_texts[:HELD_OUT_IMAGES]
    if form == "fp32" and target == "onnx":
        report = export_bundle(checkpoint, dest, tasks, form, limits, progress=progress)
        report.seconds = time.time() - start
        return report

    with staging(dest, "work") as work:
        report = export_bundle(checkpoint, work / "fp32", tasks, "fp32", limits, progress=progress,
                               ort_attention=form in ORT_ONLY and ort_forms)
        onnx_bundle = work / "fp32"
        if form != "fp32":
            from .precision import INT8_BOUND, convert_bundle

            onnx_bundle = dest if target == "onnx" else work / form
            data = convert_bundle(work / "fp32", onnx_bundle, form, calib_images=calib, calib_texts=calib_texts,
                                  bound=None if quantize_all else INT8_BOUND, progress=progress)
            report.accuracy = data.get("accuracy")
        if build_engines is not None:
            from .trt_build import TrtBuildError, default_timing_cache

            cache = Path(timing_cache) if timing_cache else default_timing_cache(dest.parent)
            try:
                build_engines(onnx_bundle, dest, limits, cache, progress=progress)
            except TrtBuildError as e:
                raise ExportError(str(e)) from None
    report.bundle, report.precision, report.target = dest, form, target
    report.seconds = time.time() - start
    return report
