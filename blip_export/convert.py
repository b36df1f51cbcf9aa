"""Convert an fp32 bundle folder into an fp16, int8 (Q/DQ, for TensorRT) or int8-cpu (ONNX Runtime
dynamic quantization) bundle folder, with the measured accuracy in its manifest.

The new bundle has the same I/O table (so the same runtime feeds), its precision, the new graphs'
checksums, each graph's precision description (what stays fp32 and why) and an "accuracy" entry:
every graph's error against the fp32 graph on feeds recorded from held-out images, and the
end-to-end agreement of the two bundles on those images (identical captions / answers, ITM and ITC
differences). Like export_bundle it is written to a temporary folder beside `dst` and renamed into
place when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest

from .bundle import ExportError, _replace, sha256
from .calibration import calibration_feeds, compare_runtimes
from .precision import graph_errors, ort_session, run_all, to_fp16
from .quantize import HOLDOUT_FRACTION, INT8_BOUND, to_int8, to_int8_cpu

PRECISIONS = ("fp16", "int8", "int8-cpu")


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Stand-in held-out images when none are given (fp16 needs no calibration): smooth gradients
    with noise and a bright square, uint8 HxWx3, so the preprocessing and every graph see varied input."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 255, 3) + rng.normal(0, 20, (size, size, 3))
        a, b = rng.integers(0, size // 2, 2)
        base[a : a + size // 3, b : b + size // 3] = rng.uniform(0, 255, 3)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def _split(images, texts, holdout_images, holdout_texts):
    images = list(images or [])
    if holdout_images is not None:
        return images, texts, list(holdout_images), holdout_texts
    if not images:
        return [], None, [], None
    n = max(1, int(round(len(images) * HOLDOUT_FRACTION)))
    texts = list(texts) if texts else None
    return images[:-n], texts[:-n] if texts else None, images[-n:], texts[-n:] if texts else None


def convert_bundle(
    fp32_bundle: str | Path,
    dst: str | Path,
    precision: str,
    calib_images: list | None = None,
    calib_texts: Sequence[str] | None = None,
    holdout_images: list | None = None,
    holdout_texts: Sequence[str] | None = None,
    bound: float = INT8_BOUND,
    method: str = "minmax",
    progress=None,
) -> dict:
    """Write the `precision` form of the fp32 bundle at `fp32_bundle` to `dst`; returns its manifest.

    calib_images (paths, PIL images or uint8 HxWx3 arrays) with optional calib_texts (one caption
    or question per image): int8 is calibrated on them. Held-out images measure the accuracy: given,
    or for int8 the last quarter of calib_images; fp16 and int8-cpu calibrate nothing and measure on
    all the images given (synthetic ones when none are: synthetic_images).
    bound: the largest relative error an int8 graph may have on held-out feeds before layer groups
    are kept in fp32 (quantize.search_exclusions); method: int8 calibration (minmax, percentile, entropy).
    """
    say = progress or (lambda msg: None)
    src, dst = Path(fp32_bundle), Path(dst)
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: expected one of fp32, {', '.join(PRECISIONS)}")
    manifest = load_manifest(src)
    if manifest.data.get("precision", "fp32") != "fp32":
        raise ExportError(f"{src}: a {manifest.data['precision']} bundle; convert from the fp32 bundle")
    if precision != "int8" and holdout_images is None:  # nothing to calibrate: every image measures
        holdout_images, holdout_texts = calib_images or synthetic_images(4, manifest.dims.image_size), calib_texts
        calib_images, calib_texts = [], None
    calib_images, calib_texts, holdout_images, holdout_texts = _split(
        calib_images, calib_texts, holdout_images, holdout_texts)
    if precision == "int8" and not calib_images:
        raise ExportError("int8 needs calibration images (at least 2 when no held-out images are given: "
                          "a quarter is held out to measure the accuracy)")
    reference = BlipRuntime.load(src)
    say(f"recording fp32 feeds on {len(holdout_images)} held-out image(s)")
    held = calibration_feeds(reference, holdout_images, holdout_texts)
    calib = {}
    if precision == "int8":
        say(f"recording fp32 feeds on {len(calib_images)} calibration image(s)")
        calib = calibration_feeds(reference, calib_images, calib_texts)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        data = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        graphs, accuracy = {}, {}
        for name, entry in data["graphs"].items():
            source, target = src / entry["file"], tmp / entry["file"]
            say(f"{precision}: {name}")
            if name not in held:
                raise ExportError(f"{name}: the held-out run never fed this graph")
            if precision == "fp16":
                info = to_fp16(source, target, name)
            elif precision == "int8":
                info = to_int8(source, target, name, calib[name], held[name], bound=bound, method=method, progress=say)
            else:
                info = to_int8_cpu(source, target, name, held[name], bound=bound, progress=say)
            accuracy[name] = graph_errors(run_all(ort_session(target), held[name]), run_all(ort_session(source), held[name]))
            say(f"{name}: max abs {accuracy[name]['max_abs']:.3e}, relative {accuracy[name]['rel']:.3e}")
            graphs[name] = {**entry, "sha256": sha256(target), "precision": info}
        for item in src.iterdir():  # tokenizer and anything else the bundle carries
            if item.is_file() and item.suffix != ".onnx" and item.name != "manifest.json":
                shutil.copy(item, tmp / item.name)
        import onnxruntime

        data.update(precision=precision, graphs=graphs)
        data["build"] = {**data.get("build", {}), "onnxruntime": onnxruntime.__version__,
                         "converted_from": {"bundle": str(src.resolve()), "manifest_sha256": sha256(src / "manifest.json")},
                         "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data["accuracy"] = {
            "reference": "the fp32 bundle, on feeds recorded from held-out images",
            "held_out": {"images": len(holdout_images), "feeds": {g: len(f) for g, f in held.items()}},
            "graphs": accuracy,
        }
        _write(tmp, data)
        say("end-to-end comparison on held-out images")
        data["accuracy"]["end_to_end"] = compare_runtimes(reference, BlipRuntime.load(tmp), holdout_images, holdout_texts)
        _write(tmp, data)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data


def _write(folder: Path, data: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
