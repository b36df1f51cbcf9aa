"""BLIP configuration as frozen dataclasses, read from a Hugging Face `config.json`.

Field names follow the checkpoint's `config.json` so a reader can hold the two side by side.
Defaults are those of transformers' `BlipVisionConfig` / `BlipTextConfig` / `BlipConfig`, which is
what a `config.json` that omits a field means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import _subconfig
from ...errors import CheckpointError

# BLIP's one table of architectures, by config.json's `architectures` entry: the tasks a checkpoint
# of each is exported for (the first is the default set's order). Every other list derives from it.
ARCHITECTURES = {
    "BlipForConditionalGeneration": ("caption",),
    "BlipForQuestionAnswering": ("vqa",),
    "BlipForImageTextRetrieval": ("itm", "itc"),
    "BlipModel": ("itc",),
}
BLIP_ARCHITECTURES = tuple(ARCHITECTURES)
GENERATIVE = tuple(a for a, tasks in ARCHITECTURES.items() if {"caption", "vqa"} & set(tasks))  # text decoders


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5  # vision uses 1e-5, text 1e-12: do not share one eps

    @property
    def num_positions(self) -> int:
        """Image tokens including the class token: (image_size / patch_size)^2 + 1."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524  # 30522 BERT tokens + [DEC] (bos) + [ENC]
    hidden_size: int = 768
    encoder_hidden_size: int = 768  # always the vision width; BlipConfig overwrites it
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    bos_token_id: int = 30522  # [DEC]: BLIP decoding starts here, not at [CLS]
    eos_token_id: int = 2
    pad_token_id: int = 0
    sep_token_id: int = 102  # [SEP]: what BLIP decoding actually stops at
    is_decoder: bool = True  # layers carry cross-attention weights
    tie_word_embeddings: bool = True  # LM head weight = word embeddings when absent from the file

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class BlipConfig:
    architecture: str
    vision: VisionConfig
    text: TextConfig
    projection_dim: int = 512  # BlipModel's visual/text projections (get_*_features)
    image_text_hidden_size: int = 256  # retrieval model's vision_proj / text_proj (ITC)
    logit_scale_init_value: float = 2.6592
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> str:
        return "blip"


def config_from_dict(data: dict, source: str = "config.json") -> BlipConfig:
    """Build a BlipConfig from the parsed `config.json` of a BLIP checkpoint.

    Raises CheckpointError naming `source` for another model type or a malformed entry.
    """
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if model_type != "blip":
        raise CheckpointError(
            source,
            f"model_type={model_type!r} (architectures {archs}): not a BLIP checkpoint; "
            f"expected model_type 'blip' with one of {', '.join(BLIP_ARCHITECTURES)} "
            f"(or 'blip-2' for BLIP-2, which read_config routes)",
        )
    known = [a for a in archs if a in BLIP_ARCHITECTURES]
    if not known:
        raise CheckpointError(
            source,
            f"architectures={archs}: expected one of {', '.join(BLIP_ARCHITECTURES)}",
        )
    vision = _subconfig(VisionConfig, data.get("vision_config"), f"{source}: vision_config")
    text = _subconfig(TextConfig, data.get("text_config"), f"{source}: text_config")
    # transformers' BlipConfig forces the text cross-attention width to the vision width.
    text = TextConfig(**{**text.__dict__, "encoder_hidden_size": vision.hidden_size})
    top = {}
    for name in ("projection_dim", "image_text_hidden_size"):
        if name in data:
            if not isinstance(data[name], int) or isinstance(data[name], bool):
                raise CheckpointError(source, f"{name}={data[name]!r}: expected int")
            top[name] = data[name]
    if "logit_scale_init_value" in data:
        top["logit_scale_init_value"] = float(data["logit_scale_init_value"])
    return BlipConfig(architecture=known[0], vision=vision, text=text, raw=data, **top)
