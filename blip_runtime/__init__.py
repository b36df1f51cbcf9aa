"""blip_runtime: run exported BLIP engine bundles with numpy, pillow, tokenizers and ONNX Runtime.

Never imports torch: it runs on devices where torch is not installed.
"""

from .generated import Generated
from .options import GenerationOptions
from .manifest import BundleError
from .runtime import BlipRuntime

__all__ = ["BlipRuntime", "BundleError", "GenerationOptions", "Generated"]
