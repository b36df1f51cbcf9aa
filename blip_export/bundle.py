"""Export a BLIP checkpoint folder into an engine bundle (manifest.json, graphs, tokenizer.json).

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

from blip_runtime.families.blip.graphs import Dims, axes, graphs as blip_graphs
from blip_runtime.graphs import GraphSpec, Limits, axes_to_dict, random_feeds
from blip_runtime.image import CLIP_MEAN, CLIP_STD, ImageSettings
from blip_runtime.manifest import FORMAT_VERSION
from blip_runtime.processor_config import image_processor_config

from .config import BlipConfig
from .errors import CheckpointError
from .files import ExportError, check_output, copy_file, install, sha256, staging
from .loading import load_model
from .modeling.common import ort_attention as ort_attention_export
from .onnx_export import compare, export_graph, reference_outputs, verify_sizes

TASKS_OF = {
    "BlipForConditionalGeneration": ("caption",),
    "BlipForQuestionAnswering": ("vqa",),
    "BlipForImageTextRetrieval": ("itm", "itc"),
    "BlipModel": ("itc",),
}
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


def model_dims(config: BlipConfig) -> Dims:
    itc = {"BlipForImageTextRetrieval": config.image_text_hidden_size, "BlipModel": config.projection_dim}
    return Dims(
        image_size=config.vision.image_size,
        num_image_tokens=config.vision.num_positions,
        vision_hidden=config.vision.hidden_size,
        text_hidden=config.text.hidden_size,
        num_layers=config.text.num_hidden_layers,
        num_heads=config.text.num_attention_heads,
        head_dim=config.text.head_dim,
        vocab_size=config.text.vocab_size,
        itc_dim=itc.get(config.architecture, 0),
    )


def select_tasks(config: BlipConfig, requested: list[str] | None) -> list[str]:
    available = TASKS_OF[config.architecture]
    if not requested:
        return list(available)
    wrong = [t for t in requested if t not in available]
    if wrong:
        raise ExportError(
            f"--tasks {','.join(wrong)}: a {config.architecture} checkpoint supports {','.join(available)}"
        )
    return list(requested)


def image_settings(folder: Path, config: BlipConfig) -> tuple[ImageSettings, str]:
    """The checkpoint's image preprocessing and where it came from: "processor_config.json" (nested,
    as transformers 5's BlipProcessor.save_pretrained writes it), "preprocessor_config.json", or
    "defaults" (BLIP's processor defaults at the model's image size) when the folder has neither."""
    try:
        data, path = image_processor_config(folder)  # ValueError names the file
    except ValueError as e:
        raise CheckpointError(folder, str(e)) from None
    if data is None:
        size = config.vision.image_size
        return ImageSettings(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD), "defaults"
    try:
        settings = ImageSettings.from_preprocessor_config(data)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if settings.size != (config.vision.image_size, config.vision.image_size):
        raise CheckpointError(path, f"size {settings.size} differs from config.json image_size {config.vision.image_size}")
    return settings, path.name


def copy_tokenizer(folder: Path, dest: Path) -> None:
    """tokenizer.json, or one built from vocab.txt as BlipProcessor's BertTokenizerFast builds it."""
    if (folder / "tokenizer.json").is_file():
        copy_file(folder / "tokenizer.json", dest)
        return
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise CheckpointError(folder, "no tokenizer: expected tokenizer.json or vocab.txt")
    from tokenizers import AddedToken, BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    tok.add_special_tokens([AddedToken("[DEC]", special=True), AddedToken("[ENC]", special=True)])
    tok.save(str(dest))


def tokenizer_settings(folder: Path, max_positions: int) -> dict:
    """What tokenizer.json does not hold: the length limit and whether decode() cleans up spaces
    (transformers 5 defaults to False; 4.x BERT tokenizers to True)."""
    settings = {"model_max_length": max_positions, "clean_up_tokenization_spaces": False}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        limit = data.get("model_max_length")
        if isinstance(limit, int) and 0 < limit < max_positions:
            settings["model_max_length"] = limit
        if isinstance(data.get("clean_up_tokenization_spaces"), bool):
            settings["clean_up_tokenization_spaces"] = data["clean_up_tokenization_spaces"]
    return settings


def generation_defaults(folder: Path, config: BlipConfig) -> dict:
    """Defaults of generate(), from generation_config.json where present (transformers' defaults
    otherwise: max_length 20 counting the prompt, greedy)."""
    out = {"max_length": 20, "num_beams": 1, "min_length": 0}
    path = folder / "generation_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "length_penalty",
                    "repetition_penalty", "do_sample", "temperature", "top_k", "top_p", "early_stopping"):
            if data.get(key) is not None:
                out[key] = data[key]
    return out


def folder_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(sha256(path).encode())
    return h.hexdigest()


def add_metadata(path: Path, meta: dict) -> None:
    """Model dimensions and special token ids into the ONNX file, so a graph describes itself."""
    import onnx

    model = onnx.load(str(path))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def check_onnx(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def verify(model, spec: GraphSpec, dims: Dims, path: Path, with_feat: bool) -> dict:
    """ONNX Runtime against the reference module at several dynamic sizes: the worst errors."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in spec.outputs]
    worst = {"max_abs": 0.0, "rel": 0.0}
    for i, sizes in enumerate(verify_sizes(spec, dims)):
        feeds = random_feeds(spec, sizes, seed=i)
        ours = dict(zip(names, session.run(names, feeds)))
        max_abs, rel = compare(ours, reference_outputs(model, spec, feeds, with_feat))
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
    ort_attention: attention as ONNX Runtime's MultiHeadAttention operator (the vision graph's, and
    the decoder step's self- and cross-attention: modeling.common.ort_attention), with the
    cross-attention keys in that operator's layout (blip_graphs(keys_transposed=False)): faster on
    ONNX Runtime, not buildable by TensorRT; the manifest's "attention_op" says so."""
    import onnx
    import onnxruntime
    import torch

    start = time.time()
    say = progress or (lambda msg: None)
    folder = Path(checkpoint)
    if precision != "fp32":
        raise ExportError(f"--precision {precision}: only fp32 is available in this version")
    dest = check_output(output if output else default_output(folder, precision), overwrite)  # before any work
    model, config = load_model(folder)
    chosen = select_tasks(config, tasks)
    dims = model_dims(config)
    settings, image_source = image_settings(folder, config)
    notes = []
    if image_source == "defaults":
        notes.append(f"{folder}: no processor_config.json or preprocessor_config.json; using BLIP's image "
                     f"defaults ({settings.size[0]} px bicubic, CLIP mean/std); the manifest records it")
        say(notes[-1])
    graphs = blip_graphs(dims, set(chosen), keys_transposed=not ort_attention)
    with staging(dest) as tmp:
        copy_tokenizer(folder, tmp / "tokenizer.json")
        with_feat = "itc" in chosen
        text = config.text
        meta = {"family": "blip", "architecture": config.architecture, **dims.to_dict(),
                "bos_token_id": text.bos_token_id, "sep_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id}
        report = ExportReport(bundle=dest, tasks=chosen, notes=notes)
        entries = {}
        for name, spec in graphs.items():
            path = tmp / f"{name}.onnx"
            say(f"exporting {name}")
            with ort_attention_export() if ort_attention else nullcontext():
                export_graph(model, spec, dims, path, with_feat=with_feat)
            add_metadata(path, {**meta, "graph": name})
            check_onnx(path)
            say(f"verifying {name}")
            err = verify(model, spec, dims, path, with_feat)
            report.errors[name] = err
            if not err["rel"] < FP32_TOLERANCE:
                raise ExportError(
                    f"{name}: ONNX Runtime differs from the reference module by relative error {err['rel']:.2e} "
                    f"(max abs {err['max_abs']:.2e}), above {FP32_TOLERANCE:.0e}"
                )
            entries[name] = {"file": path.name, "sha256": sha256(path), "io": spec.to_dict(), "verification": err}
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": "blip",
            "architecture": config.architecture,
            "tasks": chosen,
            "precision": precision,
            "target": "onnx",
            "dims": dims.to_dict(),
            "limits": limits.__dict__,
            "axes": axes_to_dict(axes(dims, limits)),
            "graphs": entries,
            **({"attention_op": "com.microsoft.MultiHeadAttention"} if ort_attention else {}),
            "tokenizer": {"file": "tokenizer.json", "sha256": sha256(tmp / "tokenizer.json"),
                          **tokenizer_settings(folder, text.max_position_embeddings)},
            "image": {**settings.to_dict(), "source": image_source},
            "generation": generation_defaults(folder, config),
            "special_tokens": {"bos_token_id": text.bos_token_id, "sep_token_id": text.sep_token_id,
                               "pad_token_id": text.pad_token_id},
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
        install(tmp, dest, overwrite)
    report.seconds = time.time() - start
    return report


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("blip-trt")
    except Exception:
        return "unknown"
