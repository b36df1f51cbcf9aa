"""blip_export: BLIP reference modules, checkpoint loading, ONNX export (needs torch)."""

from .config import BlipConfig, TextConfig, VisionConfig, read_config
from .errors import CheckpointError
from .loading import load_model

__all__ = ["BlipConfig", "CheckpointError", "TextConfig", "VisionConfig", "load_model", "read_config"]
