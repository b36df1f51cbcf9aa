"""BLIP configuration as frozen dataclasses, read from a Hugging Face `config.json`.

Field names follow the checkpoint's `config.json` so a reader can hold the two side by side.
Defaults are those of transformers' `BlipVisionConfig` / `BlipTextConfig` / `BlipConfig`, which is
what a `config.json` that omits a field means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import CheckpointError

# Architectures we know, by the `architectures` entry of config.json.
BLIP_ARCHITECTURES = (
    "BlipForConditionalGeneration",
    "BlipForQuestionAnswering",
    "BlipForImageTextRetrieval",
    "BlipModel",
)


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


_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu")


def _subconfig(cls, data: dict, where: str):
    """Build `cls` from the keys of `data` it knows; checkpoint keys it does not know are ignored
    (dropout rates, initializer ranges, transformers bookkeeping). Wrong types are rejected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CheckpointError(where, f"expected a JSON object, got {type(data).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value = data[f.name]
        want = type(f.default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if f.name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(where, f"{f.name}={value!r}: only square sizes are supported")
            value = value[0]
        if f.name == "eos_token_id" and isinstance(value, list):
            value = value[0]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise CheckpointError(
                where, f"{f.name}={value!r}: expected {want.__name__}, got {type(value).__name__}"
            )
        kwargs[f.name] = value
    config = cls(**kwargs)
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(
            where,
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}",
        )
    if config.hidden_act not in _ACTIVATIONS:
        raise CheckpointError(where, f"hidden_act={config.hidden_act!r}: expected one of {_ACTIVATIONS}")
    return config


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


def read_config(folder: str | Path):
    """Read and parse `folder/config.json`: a BlipConfig, or for model_type "blip-2" a Blip2Config
    (blip_export.families.blip2.config)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(path, "missing: a Hugging Face checkpoint folder needs a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object at the top level")
    if data.get("model_type") == "blip-2":
        from .families.blip2.config import config_from_dict as blip2_config_from_dict

        return blip2_config_from_dict(data, str(path))
    return config_from_dict(data, str(path))
