"""A Triton model repository over bundles: one Python-backend model per (bundle, task).

    repo/
      easyvqa-caption_caption/
        config.pbtxt          # Python backend, dynamic batching, BYTES / FP32 tensors
        1/model.py            # blip_serve/triton_model.py: BlipRuntime over 1/bundle
        1/bundle/...          # the bundle (hard links where the file system allows, else copies)

Tensors (batch first; each request row is one image or text):

| task | inputs | outputs |
| --- | --- | --- |
| caption | IMAGE BYTES [1] (encoded PNG/JPEG), PROMPT BYTES [1] (optional), OPTIONS BYTES [1] (optional JSON) | TEXT BYTES [1] |
| answer | IMAGE, QUESTION BYTES [1], OPTIONS (optional) | TEXT BYTES [1] |
| match | IMAGE, TEXT BYTES [1] | SCORE FP32 [1] |
| image_features | IMAGE | FEATURES FP32 [-1] |
| text_features | TEXT | FEATURES FP32 [-1] |

The Python backend's interpreter must import `blip_runtime` and `blip_serve` (pip install this
package into the Python the Triton server's Python backend runs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .inputs import NEEDS, bundle_tasks

TEMPLATE = Path(__file__).resolve().parent / "triton_model.py"
_IMAGE = ("IMAGE", "TYPE_STRING", "[ 1 ]", False)
_OPTIONS = ("OPTIONS", "TYPE_STRING", "[ 1 ]", True)
# task -> (inputs (name, type, dims, optional), outputs (name, type, dims))
TENSORS = {
    "caption": ([_IMAGE, ("PROMPT", "TYPE_STRING", "[ 1 ]", True), _OPTIONS], [("TEXT", "TYPE_STRING", "[ 1 ]")]),
    "answer": ([_IMAGE, ("QUESTION", "TYPE_STRING", "[ 1 ]", False), _OPTIONS], [("TEXT", "TYPE_STRING", "[ 1 ]")]),
    "match": ([_IMAGE, ("TEXT", "TYPE_STRING", "[ 1 ]", False)], [("SCORE", "TYPE_FP32", "[ 1 ]")]),
    "image_features": ([_IMAGE], [("FEATURES", "TYPE_FP32", "[ -1 ]")]),
    "text_features": ([("TEXT", "TYPE_STRING", "[ 1 ]", False)], [("FEATURES", "TYPE_FP32", "[ -1 ]")]),
}


def config_pbtxt(name: str, task: str, max_batch: int, max_wait_ms: float, instances: int) -> str:
    inputs, outputs = TENSORS[task]
    ins = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}'
                     for n, t, d, o in inputs)
    outs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in outputs)
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_wait_ms * 1000)} }}\n"
        f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
        f'parameters {{ key: "task" value: {{ string_value: "{task}" }} }}\n'
    )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_triton_repo(repo: str | Path, bundles: list[str | Path], max_batch: int = 8, max_wait_ms: float = 10.0,
                      instances: int = 1) -> dict[str, Path]:
    """Write one model per task of each bundle into `repo`; returns model name -> model folder.
    Existing models of the same names are replaced; other folders in `repo` are left alone."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: expected >= 1")
    repo = Path(repo)
    written = {}
    for bundle in map(Path, bundles):
        tasks = bundle_tasks(bundle)
        routes = [t for t, need in NEEDS.items() if need in tasks]
        if not routes:
            raise ValueError(f"{bundle}: tasks {tasks} give no Triton model (expected some of {sorted(set(NEEDS.values()))})")
        for task in routes:
            name = f"{bundle.name}_{task}"
            folder = repo / name
            staged = repo / f".{name}.tmp"  # written aside, renamed into place: never half a model
            shutil.rmtree(staged, ignore_errors=True)
            (staged / "1").mkdir(parents=True)
            (staged / "config.pbtxt").write_text(config_pbtxt(name, task, max_batch, max_wait_ms, instances))
            shutil.copy2(TEMPLATE, staged / "1" / "model.py")
            shutil.copytree(bundle, staged / "1" / "bundle", copy_function=_link_or_copy)
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
            written[name] = folder
    return written
