"""blip_export: BLIP reference modules, checkpoint loading, ONNX export, precision conversion and
TensorRT engine builds.

torch is imported only by what needs it (`load_model`, the exporter), so that engines can be built
from an existing ONNX bundle (blip_export.trt_build) on a device without torch.
"""

from .config import read_config
from .families.blip.config import BlipConfig, TextConfig, VisionConfig
from .errors import CheckpointError

__all__ = ["Blip2Config", "BlipConfig", "CheckpointError", "TextConfig", "VisionConfig", "load_model", "read_config"]


def __getattr__(name):
    if name == "load_model":
        from .loading import load_model

        return load_model
    if name == "Blip2Config":
        from .families.blip2.config import Blip2Config

        return Blip2Config
    raise AttributeError(f"module 'blip_export' has no attribute {name!r}")
