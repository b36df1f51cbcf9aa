"""Compile an ONNX bundle into TensorRT engines: a bundle with target "trt".

Precision lives in the ONNX graphs (fp32, fp16 with fp32 islands, int8 as Q/DQ), so the build only
compiles: each graph becomes a STRONGLY TYPED network (TensorRT keeps every tensor's type as the
graph has it), with an optimization profile per graph from the I/O table (`profile_shapes`), one more
per call shape where the family asks (its runtime module's more_profiles: BLIP-2 OPT's prompt call
through its step graph), and a timing cache reused across graphs and builds. No FP16/INT8 builder flag and no calibrator are used:
TensorRT 11 removed them and always builds strongly typed networks; on TensorRT 10 the
NetworkDefinitionCreationFlag.STRONGLY_TYPED flag asks for the same (TensorRT 11 still accepts the
flag and ignores it; where a TensorRT no longer has it, networks are strongly typed anyway).

Builds use polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork).
tensorrt and polygraphy are imported only when building, so this module imports without them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from blip_runtime.families import family
from blip_runtime.graphs import Limits, axes_to_dict, profile_shapes
from blip_runtime.manifest import BundleError, load_manifest
from blip_runtime.trt_session import trt_unavailable_reason

from .files import ExportError, check_output, copy_file, install, sha256, staging


class TrtBuildError(RuntimeError):
    """An engine build that cannot go on; the message is one line for the CLI."""


def check_trt_available() -> str | None:
    """One line saying why TensorRT engines cannot be built here (no tensorrt, no polygraphy, no CUDA
    GPU), or None. `blip-export --target trt` checks this first and stops with it, writing nothing."""
    return trt_unavailable_reason()


def engine_loader(onnx_path: Path, profiles: list[dict], timing_cache: Path | None, *, strongly_typed: bool,
                  tf32: bool = False):
    """The polygraphy loader that compiles `onnx_path` to serialized engine bytes when called.

    profiles: the optimization profiles, each {input: (min, opt, max)}. The timing cache file is read
    before and merged back after the build (polygraphy locks it, so parallel builds may share it).
    tf32 stays off by default: an fp32 graph then computes in fp32, as ONNX Runtime does."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    # Only what TensorRT 11 kept is asked for: CreateConfig touches the BuilderFlags it removed (FP16,
    # INT8, BF16, FP8, OBEY/PREFER_PRECISION_CONSTRAINTS, DIRECT_IO), the INT8 calibrator, quantization
    # flags and algorithm selectors only when told to, and clearing TF32 tolerates a missing flag.
    built = []
    for shapes in profiles:
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        built.append(profile)
    cache = str(timing_cache) if timing_cache else None
    # From the path, never from bytes: the parser then reads weights stored beside the graph
    # (`<graph>.onnx.data`, graphs over 2 GB) relative to it.
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    existing = cache if cache and Path(cache).is_file() else None  # a first build starts an empty cache
    config = CreateConfig(profiles=built, load_timing_cache=existing, tf32=tf32)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)


def _compile(onnx_path: Path, profiles: list[dict], timing_cache: Path | None, tf32: bool) -> bytes:
    import tensorrt as trt
    from polygraphy.logger import G_LOGGER

    # Feature detection, not a version test: the flag exists in TensorRT 10 (needed) and 11 (ignored).
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        return bytes(engine_loader(onnx_path, profiles, timing_cache, strongly_typed=strongly_typed, tf32=tf32)())


def _build_info(timing_cache: Path | None, tf32: bool) -> dict:
    """What the engines are tied to (checked by the runtime before loading) and how they were built."""
    import polygraphy
    import tensorrt as trt

    from blip_runtime.device import device_info

    gpu, cc = device_info()
    return {"version": trt.__version__, "gpu": gpu, "compute_capability": list(cc),
            "polygraphy": polygraphy.__version__, "strongly_typed": True, "tf32": tf32,
            "timing_cache": str(Path(timing_cache).resolve()) if timing_cache else None}


def default_timing_cache(folder: Path) -> Path:
    """A timing cache file in `folder` named for this TensorRT version and GPU: timings are only
    valid for the GPU and TensorRT that measured them."""
    import tensorrt as trt

    from blip_runtime.device import device_info

    _, (major, minor) = device_info()
    return Path(folder) / f".trt-{trt.__version__}-sm{major}{minor}.timing-cache"


def build_engines(bundle_dir: Path, dst: Path, limits: Limits, timing_cache: Path | None = None, *,
                  tf32: bool = False, progress=None) -> dict:
    """Build `<graph>.engine` for every graph of the ONNX bundle `bundle_dir` and write a bundle with
    target "trt" at `dst` (tokenizer and settings copied, manifest with the TensorRT version, GPU and
    compute capability, each graph's profile). Written to a staging folder and moved into place (files.staging),
    so a failed build leaves nothing. Returns the new manifest. Raises TrtBuildError."""
    from . import trt_onnx_support
    import onnx

    say = progress or (lambda msg: None)
    reason = check_trt_available()
    if reason:
        raise TrtBuildError(f"--target trt: {reason}; use --target onnx")
    try:
        source = load_manifest(bundle_dir)
    except BundleError as e:
        raise TrtBuildError(str(e)) from None
    if source.data.get("target", "onnx") != "onnx":
        raise TrtBuildError(f"{bundle_dir}: target {source.data.get('target')!r}; engines are built from an ONNX bundle")
    for name in source.graphs:
        path = source.graph_path(name)
        found = trt_onnx_support.problems(onnx.load(str(path), load_external_data=False))
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise TrtBuildError(f"{path}: TensorRT's ONNX parser would refuse it: {found[0]}{more}")
    try:
        # limits the graphs cannot take (e.g. past OPT's position table) stop here, before any build
        axes = family(source.data["family"]).axes(source.dims, limits)
    except ValueError as e:
        raise TrtBuildError(f"{bundle_dir}: {e}") from None
    try:
        dst = check_output(dst)
    except ExportError as e:
        raise TrtBuildError(str(e)) from None
    with staging(dst) as tmp:
        copy_file(source.folder / source.data["tokenizer"]["file"], tmp / source.data["tokenizer"]["file"])
        info = _build_info(timing_cache, tf32)
        entries = {}
        # the first profile from the table's axes; a family may add one per call shape (BLIP-2 OPT's prompt)
        more = getattr(family(source.data["family"]), "more_profiles", lambda *_: [])
        for name, spec in source.graphs.items():
            profiles = [profile_shapes(spec, a) for a in (axes, *more(name, source.dims, limits))]
            shapes = profiles[0]
            say(f"building the {name} engine")
            start = time.time()
            engine = tmp / f"{name}.engine"
            try:
                engine.write_bytes(_compile(source.graph_path(name), profiles, timing_cache, tf32))
            except Exception as e:  # polygraphy reports parser and builder failures as its own exception
                detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise TrtBuildError(f"{name}: TensorRT could not build the engine: {detail}") from e
            entries[name] = {
                "file": engine.name, "sha256": sha256(engine), "io": spec.to_dict(),
                "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
                # every profile, in the engine's order (the runtime picks the first that holds a call)
                "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                "onnx_sha256": source.data["graphs"][name].get("sha256"),
                "build_seconds": round(time.time() - start, 2),
                # what the graph holds in each precision (fp32 islands, excluded int8 layers): the
                # engine computes in exactly those types, so the bundle keeps saying so
                **({"precision": source.data["graphs"][name]["precision"]}
                   if "precision" in source.data["graphs"][name] else {}),
            }
        manifest = {
            **source.data, "target": "trt", "limits": asdict(limits), "axes": axes_to_dict(axes), "graphs": entries,
            "build": {**source.data.get("build", {}), "tensorrt": {
                **info, "source_bundle": str(Path(bundle_dir).resolve()),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        say(f"moving the engines into {dst}")  # the last report: a pending interrupt stops here (blip-export)
        install(tmp, dst)
    return manifest


