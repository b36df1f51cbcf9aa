"""`load_model(path)`: the one public way to turn a checkpoint folder into a reference module."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import BlipConfig, read_config
from .errors import CheckpointError
from .modeling.blip import MODEL_CLASSES
from .weights import load_into


def load_model(path: str | Path) -> tuple[nn.Module, BlipConfig]:
    """Load the reference model for the architecture named in `path/config.json`.

    Returns (model in eval mode, fp32, on the CPU; its BlipConfig). Raises CheckpointError with a
    one-line message naming the file and key for any unusable folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a folder: expected a Hugging Face checkpoint folder with config.json")
    config = read_config(folder)
    model = MODEL_CLASSES[config.architecture](config)
    tie = bool(config.raw.get("tie_word_embeddings", config.text.tie_word_embeddings))
    load_into(model, folder, tie_word_embeddings=tie)
    return model.eval(), config
