"""Reference PyTorch modules that load Hugging Face BLIP checkpoints key for key."""

from .blip import (
    MODEL_CLASSES,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipModel,
)
from .text import BlipTextLMHeadModel, BlipTextModel
from .vision import BlipVisionModel

__all__ = [
    "MODEL_CLASSES",
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForQuestionAnswering",
    "BlipModel",
    "BlipTextLMHeadModel",
    "BlipTextModel",
    "BlipVisionModel",
]
