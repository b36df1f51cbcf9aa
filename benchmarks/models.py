"""The checkpoints and bundles every contender runs, built once and cached under benchmarks/.cache.

A BLIP-base-size checkpoint per model (caption, VQA, image-text retrieval) is built by transformers
from its config with re-randomized weights (transformers' own init leaves the vision tower near zero),
saved with save_pretrained, and exported once to an fp32 bundle. The other bundle kinds are made from
it by `blip_export.precision.convert_bundle`: int8 (what `blip-export --precision int8` writes, asked for
by that name, so what a user gets is what is timed; its manifest says which form it resolved to),
int8-cpu and int8-qdq (the two int8 forms by name), fp16; TensorRT engines (trt-fp16, trt-int8) by `blip_export.trt_build.build_engines` from the ONNX bundle of that precision. A kind
that cannot be made here is skipped with the reason as a note. Delete benchmarks/.cache (or pass
--rebuild) after changing the exporter or the converters.

    python -m benchmarks.models [--scale tiny] [--kinds int8,int8-cpu,fp16] [--rebuild]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import traceback
from pathlib import Path

from .cases import ARCH, BLIP2, MODELS, images

CACHE = Path(__file__).resolve().parent / ".cache"
STD = 0.05  # weights ~N(0, 0.05): varied tokens; the values do not change the work done
# Bundle kinds made by convert_bundle, each named as blip-export's --precision takes it: "int8" as a user
# types it (the fastest form for an ONNX bundle: pipeline.resolve_precision), "int8-cpu" (ORT dynamic
# u8s8) and "int8-qdq" (symmetric Q/DQ, TensorRT's form) by name; int4: 4-bit MatMulNBits weights.
PRECISIONS = ("int8", "int8-cpu", "int8-qdq", "fp16", "int4")
# BLIP-2 at real size gets fp32 and the CPU's reduced forms only: fp16 runs slower than fp32 on ONNX
# Runtime's CPU kernels, and Q/DQ calibration of ViT-g would take hours here.
BLIP2_KINDS = ("fp32", "int8", "int4")
TRT_SOURCE = {"trt-fp16": "fp16", "trt-int8": "int8-qdq"}  # engine kind -> the ONNX bundle it is built from
OV_NATIVE = ("ov-native-fp32", "ov-native-int8", "ov-native-int4")  # OpenVINO IR of the caption model (openvino_native)
KINDS = ("fp32", *PRECISIONS, *TRT_SOURCE, *OV_NATIVE)
CALIB_TEXTS = ["a picture of a dog", "what color is the car?", "two people on a beach", "a red circle",
               "is there a cat?", "a man riding a horse", "how many birds are there?", "a bowl of fruit"]


def folder(scale: str, model: str) -> Path:
    return CACHE / scale / model


def bundle(scale: str, model: str, kind: str) -> Path:
    return folder(scale, model) / f"bundle-{kind}"


def hf_config(scale: str):
    from tests.oracle import BASE_TEXT, BASE_VISION, hf_config as make

    return make(BASE_VISION, BASE_TEXT) if scale == "base" else make()


def build(scale: str = "base", kinds=KINDS, rebuild: bool = False, say=print, only=MODELS) -> dict[str, str]:
    """Checkpoints and the bundles of `kinds` (fp32 always) for every model in `only`; returns
    {f"{model}/{kind}": note} for the kinds that could not be made."""
    notes = {}
    for i, model in enumerate(MODELS):
        if model not in only:
            continue
        ckpt = folder(scale, model) / "ckpt"
        if rebuild and folder(scale, model).exists():
            shutil.rmtree(folder(scale, model))
        if not (ckpt / "config.json").is_file():
            say(f"building {scale} {model} checkpoint")
            if model in BLIP2:  # written tensor by tensor: real size does not fit twice in memory
                from .blip2_cases import write_checkpoint

                write_checkpoint(scale, ckpt)
            else:
                from tests.oracle import make_full_checkpoint

                make_full_checkpoint(ARCH[model], ckpt, hf_config(scale), seed=10 + i, std=STD)
        if model in BLIP2 and "ckpt-bf16" in kinds and not (folder(scale, model) / "ckpt-bf16" / "config.json").is_file():
            from .blip2_cases import BF16_CKPT, write_checkpoint

            say(f"writing the {scale} {model} checkpoint in bf16")
            write_checkpoint(scale, folder(scale, model) / BF16_CKPT, dtype="bfloat16")
        kinds = [k for k in kinds if k != "ckpt-bf16"]  # not a bundle
        wanted = ["fp32"] + [TRT_SOURCE[k] for k in kinds if k in TRT_SOURCE] + list(kinds)
        for kind in dict.fromkeys(wanted):  # each once, sources before the engines built from them
            if (kind in OV_NATIVE and model != "caption") or (model in BLIP2 and kind not in BLIP2_KINDS):
                continue  # OpenVINO's own path is converted for captioning only; BLIP-2: BLIP2_KINDS
            if _current(bundle(scale, model, kind)):
                continue
            shutil.rmtree(bundle(scale, model, kind), ignore_errors=True)  # absent, or of an older format
            say(f"making the {scale} {model} {kind} bundle")
            try:
                note = make(scale, model, kind)
            except Exception as e:  # one kind that fails must not stop the others
                shutil.rmtree(bundle(scale, model, kind), ignore_errors=True)
                if kind == "fp32":
                    raise
                note = f"failed: {traceback.format_exception_only(type(e), e)[-1].strip()[:300]}"
            if note:
                notes[f"{model}/{kind}"] = note
    return notes


def _current(folder: Path) -> bool:
    """Whether `folder` holds a bundle of this version's format (an older one is made again), or
    OpenVINO's converted models (openvino_native.SETTINGS)."""
    import json

    from blip_runtime.manifest import FORMAT_VERSION

    from .openvino_native import SETTINGS

    if (folder / SETTINGS).is_file():
        return True
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def make(scale: str, model: str, kind: str) -> str | None:
    """Write one bundle; a note instead when this machine or this checkout cannot make it."""
    dst = bundle(scale, model, kind)
    if kind == "fp32":
        from blip_export.bundle import export_bundle

        export_bundle(folder(scale, model) / "ckpt", dst)
        return None
    if kind in OV_NATIVE:
        import importlib.util

        if not importlib.util.find_spec("nncf"):
            return "skipped: nncf is not installed (pip install nncf)"
        from .openvino_native import convert

        convert(folder(scale, model) / "ckpt", dst, kind.removeprefix("ov-native-"), images(len(CALIB_TEXTS), seed=100))
        return None
    if kind in TRT_SOURCE:
        src = bundle(scale, model, TRT_SOURCE[kind])
        if not (src / "manifest.json").is_file():
            return f"skipped: no {TRT_SOURCE[kind]} ONNX bundle to build the engines from"
        try:
            from blip_export.trt_build import build_engines, check_trt_available
        except ImportError as e:
            return f"skipped: blip_export.trt_build is not available ({e})"
        reason = check_trt_available()
        if reason:
            return f"skipped: {reason}"
        from blip_runtime.graphs import Limits

        build_engines(src, dst, Limits())
        return None
    try:
        from blip_export.precision import INT8_BOUND, convert_bundle
    except ImportError as e:
        return f"skipped: blip_export.precision.convert_bundle is not available ({e})"
    # int8 forms quantize every layer (blip-export --quantize-all): on re-randomized weights the
    # exclusion search keeps layers in fp32 that a trained model quantizes (on the easy-VQA default
    # model it keeps no layer group of any graph in fp32, see the README table), so the search would
    # measure the weights' randomness instead of the speed of the int8 graph. int4 likewise (its
    # search would keep random layer groups at 8 bits; at BLIP-2's real size each search trial
    # re-quantizes a 5.7 GB graph).
    bound = None if kind.startswith(("int8", "int4")) else INT8_BOUND
    # held-out images: they only feed the bundle's accuracy report here; BLIP-2 at real size takes 2
    # (each held-out request records a 14 GB fp32 runtime's every graph feed and runs both bundles)
    held = images(2 if model in BLIP2 else len(CALIB_TEXTS), seed=100)
    texts = CALIB_TEXTS[: len(held)]
    from blip_export.bundle import export_bundle
    from blip_export.config import read_config
    from blip_export.families import family
    from blip_export.pipeline import ORT_ONLY, resolve_precision

    source = bundle(scale, model, "fp32")
    ckpt = folder(scale, model) / "ckpt"
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        # as blip-export does: the ORT-only forms from graphs with ONNX Runtime's attention, where the family has them
        if resolve_precision(kind) in ORT_ONLY and family(read_config(ckpt).family).ort_attention_forms:
            source = Path(tmp) / "fp32-ort"
            export_bundle(ckpt, source, ort_attention=True)
        convert_bundle(source, dst, kind, held, texts, bound=bound)
    return None


def form(scale: str, model: str, kind: str) -> str:
    """The precision form a cached bundle holds (its manifest's "precision"; "int8" resolves to a form)."""
    import json

    return json.loads((bundle(scale, model, kind) / "manifest.json").read_text(encoding="utf-8"))["precision"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("base", "tiny"), default="base")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated bundle kinds: {', '.join(KINDS)}")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated checkpoints to build")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    for key, note in build(args.scale, args.kinds.split(","), args.rebuild, only=args.models.split(",")).items():
        print(f"{key}: {note}")
