"""The whole `blip-export` job: fp32 ONNX graphs, then the precision, then TensorRT engines.

Each stage writes a complete bundle; intermediate bundles live in a temporary folder beside the
output and the final one is renamed into place, so a failure at any stage leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from blip_runtime.graphs import Limits
from blip_runtime.image import load_image

from .bundle import ExportError, ExportReport, default_output, export_bundle
from .defaults import calibration_images

PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")
# Forms that run on ONNX Runtime only: TensorRT cannot build them, and they are converted from fp32
# graphs that use ONNX Runtime's own operators (export_bundle(ort_attention=True)).
ORT_ONLY = frozenset({"int8-cpu"})
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
    """Export `checkpoint` to a bundle of `precision` for `target` ("onnx" or "trt") at `output`.
    quantize_all: int8 forms quantize every layer instead of keeping the ones that lose too much in fp32."""
    start = time.time()
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if target not in ("onnx", "trt"):
        raise ExportError(f"--target {target}: expected onnx or trt")
    build_engines = None
    if target == "trt":  # before any work: a machine without TensorRT or a GPU stops at once
        from .trt_build import build_engines, check_trt_available

        reason = check_trt_available()
        if reason:
            raise ExportError(f"--target trt: {reason}; use --target onnx")
        if precision in ORT_ONLY:
            raise ExportError(f"--precision {precision} is ONNX Runtime's CPU form; TensorRT takes --precision int8 (Q/DQ)")
    calib = find_images(Path(calib_images)) if calib_images else None
    if precision == "int8" and calib is None:
        calib = calibration_images()
    dest = Path(output) if output else default_output(Path(checkpoint), precision if target == "onnx" else f"{precision}-trt")
    if precision == "fp32" and target == "onnx":
        return export_bundle(checkpoint, dest, tasks, precision, limits, progress=progress)

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.work.", dir=dest.parent))
    try:
        report = export_bundle(checkpoint, work / "fp32", tasks, "fp32", limits, progress=progress,
                               ort_attention=precision in ORT_ONLY)
        onnx_bundle = work / "fp32"
        if precision != "fp32":
            from .precision import INT8_BOUND, convert_bundle

            onnx_bundle = dest if target == "onnx" else work / precision
            data = convert_bundle(work / "fp32", onnx_bundle, precision, calib_images=calib,
                                  bound=None if quantize_all else INT8_BOUND, progress=progress)
            report.accuracy = data.get("accuracy")
        if build_engines is not None:
            from .trt_build import TrtBuildError, default_timing_cache

            cache = Path(timing_cache) if timing_cache else default_timing_cache(dest.parent)
            try:
                build_engines(onnx_bundle, dest, limits, cache, progress=progress)
            except TrtBuildError as e:
                raise ExportError(str(e)) from None
        report.bundle = dest
        report.seconds = time.time() - start
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
