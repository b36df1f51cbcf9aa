"""The embedded default models: small BLIP checkpoints trained on easy-VQA, shipped as package data.

Each is a Hugging Face checkpoint folder under `blip_export/models/<name>/`; `blip-export NAME`
accepts the name in place of a folder, and `blip-export` with no model exports all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
SAMPLES_DIR = MODELS_DIR / "samples"
CALIBRATION_DIR = MODELS_DIR / "calibration"


def default_models() -> dict[str, Path]:
    """name -> checkpoint folder, for every shipped checkpoint (folders holding a config.json)."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model(name_or_path: str) -> Path:
    """A shipped model's short name or a folder path -> the checkpoint folder."""
    models = default_models()
    if name_or_path in models and not Path(name_or_path).exists():
        return models[name_or_path]
    return Path(name_or_path)


def sample_images() -> list[dict]:
    """A few easy-VQA test-split images with a question and its answer each: for demos."""
    data = json.loads((SAMPLES_DIR / "samples.json").read_text(encoding="utf-8"))
    return [{**item, "path": SAMPLES_DIR / item["file"]} for item in data["images"]]


def calibration_images() -> list[Path]:
    """The shipped int8 calibration images (easy-VQA train split, never used for evaluation)."""
    data = json.loads((CALIBRATION_DIR / "calibration.json").read_text(encoding="utf-8"))
    return [CALIBRATION_DIR / f for f in data["images"]]
