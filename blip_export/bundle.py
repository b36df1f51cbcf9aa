"""Export a checkpoint folder into an engine bundle (manifest.json, graphs, tokenizer.json).

Family-neutral: the family of the checkpoint (blip_export.families, by config.json's model_type)
gives its tasks, dims, graph table, wrappers, trace and verification sizes and the bundle's other
contents; this module stages the bundle, exports and verifies every graph and writes the manifest.

The bundle is built in a staging folder beside the destination and moved into place only when
complete, so an interrupted export never leaves half a bundle; a destination that is not a bundle
(or empty) is refused, never replaced (files.check_output).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from blip_runtime.graphs import GraphSpec, Limits, axes_to_dict
from blip_runtime.manifest import FORMAT_VERSION

from .config import read_config
from .families import ExportFamily, family
from .files import ExportError, check_output, graph_record, install, save_proto, sha256, staging
from .loading import load_model
from .modeling.common import ort_attention as ort_attention_export
from .onnx_export import compare, export_graph, reference_outputs
from .weight_use import last_uses, release

FP32_TOLERANCE = 1e-4  # relative error of each graph against the reference module


@dataclass
class ExportReport:
    bundle: Path
    tasks: list[str]
    errors: dict[str, dict] = field(default_factory=dict)  # graph -> {"max_abs", "rel"} vs the reference module
    seconds: float = 0.0
    accuracy: dict | None = None  # reduced precision: errors vs the fp32 bundle (as in the manifest)
    notes: list[str] = field(default_factory=list)  # what the user should know (image settings defaulted, ...)
    precision: str = "fp32"  # the form the bundle holds (pipeline.PRECISIONS' canonical names)
    target: str = "onnx"

    def to_dict(self) -> dict:
        """JSON-ready, for `blip-export --json`."""
        return {"bundle": str(self.bundle), "tasks": list(self.tasks), "precision": self.precision,
                "target": self.target, "errors": self.errors, "accuracy": self.accuracy, "notes": list(self.notes),
                "seconds": round(self.seconds, 3)}


def select_tasks(fam: ExportFamily, config, requested: list[str] | None) -> list[str]:
    available = fam.tasks(config)
    if not requested:
        return list(available)
    wrong = [t for t in requested if t not in available]
    if wrong:
        raise ExportError(
            f"--tasks {','.join(wrong)}: a {config.architecture} checkpoint supports {','.join(available)}"
        )
    return list(requested)


def folder_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(sha256(path).encode())
    return h.hexdigest()


def add_metadata(path: Path, meta: dict) -> None:
    """Model dimensions and special token ids into the ONNX file, so a graph describes itself. Only the
    graph file is rewritten: weights stored beside it stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    save_proto(model, path)


def check_onnx(path: Path) -> None:
    """The ONNX checker with shape inference, given the PATH: it then reads external data itself
    (a loaded model over 2 GB cannot be handed to it)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def verify(wrapper, spec: GraphSpec, feeds_list: list[dict], path: Path) -> dict:
    """ONNX Runtime against the reference wrapper at several dynamic sizes: the worst errors."""
    import onnxruntime as ort

    # no arena and no prepacked copies: a checked graph's weights are held once, and freed after
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in spec.outputs]
    worst = {"max_abs": 0.0, "rel": 0.0}
    for feeds in feeds_list:
        ours = dict(zip(names, session.run(names, feeds)))
        max_abs, rel = compare(ours, reference_outputs(wrapper, spec, feeds))
        worst = {"max_abs": max(worst["max_abs"], max_abs), "rel": max(worst["rel"], rel)}
    return worst


def default_output(folder: Path, precision: str) -> Path:
    """engines/<model>-<precision> under the working folder: never inside the installed package."""
    return Path.cwd() / "engines" / f"{Path(folder).resolve().name}-{precision}"


def export_bundle(
    checkpoint: str | Path,
    output: str | Path | None = None,
    tasks: list[str] | None = None,
    precision: str = "fp32",
    limits: Limits = Limits(),
    progress=None,
    overwrite: bool = True,
    ort_attention: bool = False,
) -> ExportReport:
    """Export `checkpoint` to an ONNX bundle at `output`. `progress(msg)` is called per stage.
    ort_attention: attention as ONNX Runtime's MultiHeadAttention operator (modeling.common.ort_attention;
    the family's graph table then has that operator's layouts): faster on ONNX Runtime, not
    buildable by TensorRT; the manifest's "attention_op" says so."""
    import onnx
    import onnxruntime
    import torch

    start = time.time()
    say = progress or (lambda msg: None)
    folder = Path(checkpoint)
    if precision != "fp32":
        raise ExportError(f"--precision {precision}: only fp32 is available in this version")
    dest = check_output(output if output else default_output(folder, precision), overwrite)  # before any work
    if folder.is_dir():  # a family that cannot export stops before its weights load
        first = read_config(folder)
        family(first.family).check_exportable(first)
    model, config = load_model(folder)
    fam = family(config.family)
    chosen = select_tasks(fam, config, tasks)
    dims = fam.dims(config)
    graphs = fam.graphs(dims, set(chosen), ort_attention)
    with staging(dest) as tmp:
        parts = fam.bundle_parts(folder, config, tmp / "tokenizer.json")
        for note in parts.notes:
            say(note)
        report = ExportReport(bundle=dest, tasks=chosen, notes=parts.notes)
        entries = {}
        wrappers = {name: fam.wrapper(model, spec, chosen) for name, spec in graphs.items()}
        # which weights each graph reads, so that each is freed after its last graph (weight_use)
        freeing = last_uses(model, {
            name: (lambda w=wrappers[name], s=spec: reference_outputs(w, s, fam.feeds(s, dims, fam.verify_sizes(s, dims)[0])))
            for name, spec in graphs.items()})
        for name, spec in graphs.items():
            path = tmp / f"{name}.onnx"
            wrapper = wrappers[name]
            say(f"exporting {name}")
            with ort_attention_export() if ort_attention else nullcontext():
                export_graph(wrapper, spec, fam.feeds(spec, dims, fam.trace_sizes(spec, dims)), path)
            add_metadata(path, {**parts.meta, "graph": name})
            check_onnx(path)
            say(f"verifying {name}")
            checks = [fam.feeds(spec, dims, at, seed=i) for i, at in enumerate(fam.verify_sizes(spec, dims))]
            err = verify(wrapper, spec, checks, path)
            report.errors[name] = err
            if not err["rel"] < FP32_TOLERANCE:
                raise ExportError(
                    f"{name}: ONNX Runtime differs from the reference module by relative error {err['rel']:.2e} "
                    f"(max abs {err['max_abs']:.2e}), above {FP32_TOLERANCE:.0e}"
                )
            entries[name] = {**graph_record(path), "io": spec.to_dict(), "verification": err}
            freed = release(model, freeing[name])
            if freed >= 1 << 28:
                say(f"freed {freed / 2**30:.1f} GiB of weights no later graph reads")
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": fam.name,
            "architecture": parts.architecture,
            "tasks": chosen,
            "precision": precision,
            "target": "onnx",
            "dims": dims.to_dict(),
            "limits": limits.__dict__,
            "axes": axes_to_dict(fam.axes(dims, limits)),
            "graphs": entries,
            **({"attention_op": "com.microsoft.MultiHeadAttention"} if ort_attention else {}),
            "tokenizer": {"file": "tokenizer.json", "sha256": sha256(tmp / "tokenizer.json"), **parts.tokenizer},
            "image": parts.image,
            "generation": parts.generation,
            "special_tokens": parts.special_tokens,
            "build": {
                "blip_trt": _version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
                "source": str(folder.resolve()),
                "source_sha256": folder_checksum(folder),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        say(f"moving the bundle into {dest}")  # the last report: a pending interrupt stops here (blip-export)
        install(tmp, dest, overwrite)
    report.seconds = time.time() - start
    return report


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("blip-trt")
    except Exception:
        return "unknown"
