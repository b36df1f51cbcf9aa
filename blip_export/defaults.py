"""The embedded default models: small BLIP and BLIP-2 checkpoints trained on easy-VQA, shipped as package data.

Each is a Hugging Face checkpoint folder under `blip_export/models/<name>/`; `blip-export NAME`
accepts the name in place of a folder, and `blip-export` with no model exports all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .families import FAMILIES

MODELS_DIR = Path(__file__).resolve().parent / "models"
SAMPLES_DIR = MODELS_DIR / "samples"
CALIBRATION_DIR = MODELS_DIR / "calibration"


def model_family(folder: Path) -> str:
    """The family of a checkpoint folder (a key of blip_export.families.FAMILIES), from its
    config.json's model_type."""
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{folder / 'config.json'}: model_type {model_type!r}, expected one of {sorted(FAMILIES)}")
    return model_type


def default_models(family: str | None = None) -> dict[str, Path]:
    """name -> checkpoint folder, for every shipped checkpoint (folders holding a config.json), or
    only those of `family` (a key of blip_export.families.FAMILIES, as model_family gives)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected None or one of {sorted(FAMILIES)}")
    if not MODELS_DIR.is_dir():
        return {}
    models = {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}
    return models if family is None else {k: p for k, p in models.items() if model_family(p) == family}


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


def calibration_texts() -> list[dict]:
    """One {"caption", "question"} per shipped calibration image (its easy-VQA caption and a question
    of it): int8 calibrates ITM / ITC on the images' own captions and VQA on their questions."""
    data = json.loads((CALIBRATION_DIR / "calibration.json").read_text(encoding="utf-8"))
    return list(data["texts"])
