"""BLIP-2 configuration as frozen dataclasses, read from a Hugging Face `config.json`.

Field names follow the checkpoint's `config.json` (`vision_config`, `qformer_config`, `text_config`,
`num_query_tokens`, ...). Defaults are those of transformers' `Blip2VisionConfig` /
`Blip2QFormerConfig` / `Blip2Config`, which is what a `config.json` that omits a field means.
The language model's config (OPT or Flan-T5) comes from `lm_config.text_config_from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...config import _subconfig
from ...errors import CheckpointError
from .lm_config import OptConfig, T5Config, text_config_from_dict

# Architectures we know, by the `architectures` entry of config.json.
BLIP2_ARCHITECTURES = (
    "Blip2ForConditionalGeneration",
    "Blip2Model",
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
)
# Architectures that hold the language model (the others are vision + Q-Former only).
WITH_LANGUAGE_MODEL = ("Blip2ForConditionalGeneration", "Blip2Model")
LANGUAGE_MODELS = ("opt", "t5")


@dataclass(frozen=True)
class Blip2VisionConfig:
    """ViT-g/14 (EVA-CLIP) by default: 39 pre-LN layers, 1408 wide, 257 tokens at 224 px."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224  # the -coco fine-tunes of OPT use 364 (677 tokens)
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6  # not BLIP's 1e-5
    qkv_bias: bool = True  # q and v carry a bias, k never does (EVA's convention)

    @property
    def num_positions(self) -> int:
        """Image tokens including the class token: (image_size / patch_size)^2 + 1."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class Blip2QFormerConfig:
    """BERT-base sized; every `cross_attention_frequency`-th layer (from 0) cross-attends to the image."""

    vocab_size: int = 30522  # BERT's; the retrieval models add no [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # always the vision width: Blip2Config overwrites it
    # Text feed-forward (`intermediate`/`output`) in every layer: only the retrieval / text models
    # have it. Older config.json files call it `qformer_text_input`.
    use_qformer_text_input: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


@dataclass(frozen=True)
class Blip2Config:
    architecture: str
    vision_config: Blip2VisionConfig
    qformer_config: Blip2QFormerConfig
    text_config: OptConfig | T5Config | None  # None: an architecture without LM whose text_config we cannot read
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # ITC projections of the retrieval / projection models
    # The `<image>` token id in input_ids that the projected queries replace. None: the legacy
    # convention (checkpoints saved before the processor expanded image tokens): the queries are
    # put in front of the text embeddings, with attention-mask ones.
    image_token_index: int | None = None
    architectures: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> str:
        return "blip-2"

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.text_config is not None and self.text_config.is_encoder_decoder)

    @property
    def num_image_tokens(self) -> int:
        """Vision tokens the Q-Former cross-attends to (257 at 224 px, 677 at 364 px)."""
        return self.vision_config.num_positions


def _int(data: dict, name: str, where: str, default, minimum: int | None = None, optional: bool = False):
    if name not in data or data[name] is None:
        if optional:
            return None
        return default
    value = data[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(where, f"{name}={value!r}: expected int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise CheckpointError(where, f"{name}={value!r}: expected an int >= {minimum}")
    return value


def _vision(data, where: str) -> Blip2VisionConfig:
    cfg = _subconfig(Blip2VisionConfig, data, where)
    if cfg.image_size % cfg.patch_size:
        raise CheckpointError(where, f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
    return cfg


def _qformer(data, where: str, encoder_hidden_size: int) -> Blip2QFormerConfig:
    if isinstance(data, dict) and "use_qformer_text_input" not in data and "qformer_text_input" in data:
        data = {**data, "use_qformer_text_input": data["qformer_text_input"]}
    cfg = _subconfig(Blip2QFormerConfig, data, where)
    if cfg.cross_attention_frequency < 1:
        raise CheckpointError(where, f"cross_attention_frequency={cfg.cross_attention_frequency}: expected >= 1")
    # transformers' Blip2Config forces the cross-attention width to the vision width.
    return replace(cfg, encoder_hidden_size=encoder_hidden_size)


def config_from_dict(data: dict, source: str = "config.json") -> Blip2Config:
    """Build a Blip2Config from the parsed `config.json` of a BLIP-2 checkpoint.

    Raises CheckpointError naming `source` (and the sub-config and key) for another model type, an
    unsupported language model or a malformed entry.
    """
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if model_type != "blip-2":
        raise CheckpointError(
            source,
            f"model_type={model_type!r} (architectures {archs}): not a BLIP-2 checkpoint; "
            f"expected model_type 'blip-2' with one of {', '.join(BLIP2_ARCHITECTURES)}",
        )
    if not isinstance(archs, list):
        raise CheckpointError(source, f"architectures={archs!r}: expected a list of names")
    known = [a for a in archs if a in BLIP2_ARCHITECTURES]
    if not known:
        raise CheckpointError(source, f"architectures={archs}: expected one of {', '.join(BLIP2_ARCHITECTURES)}")
    vision = _vision(data.get("vision_config"), f"{source}: vision_config")
    qformer = _qformer(data.get("qformer_config"), f"{source}: qformer_config", vision.hidden_size)

    text_data = data.get("text_config")
    if text_data is None:
        text_data = {"model_type": "opt"}  # transformers' default language model
    elif isinstance(text_data, dict) and "model_type" not in text_data:
        text_data = {**text_data, "model_type": "opt"}
    where = f"{source}: text_config"
    if known[0] in WITH_LANGUAGE_MODEL:
        text = text_config_from_dict(text_data, where)
    else:
        # The retrieval / projection models never run the language model: an LM we do not
        # implement does not stop them from loading.
        lm = text_data.get("model_type") if isinstance(text_data, dict) else None
        text = text_config_from_dict(text_data, where) if lm in LANGUAGE_MODELS else None

    top = dict(
        num_query_tokens=_int(data, "num_query_tokens", source, 32, minimum=1),
        image_text_hidden_size=_int(data, "image_text_hidden_size", source, 256, minimum=1),
        image_token_index=_int(data, "image_token_index", source, None, minimum=0, optional=True),
    )
    if top["image_token_index"] is None and isinstance(data.get("image_token_id"), int):
        top["image_token_index"] = data["image_token_id"]  # transformers' attribute_map alias
    if text is not None and top["image_token_index"] is not None and top["image_token_index"] >= text.vocab_size:
        raise CheckpointError(
            source, f"image_token_index={top['image_token_index']}: outside the language model's "
                    f"vocabulary (text_config.vocab_size={text.vocab_size})")
    return Blip2Config(architecture=known[0], vision_config=vision, qformer_config=qformer, text_config=text,
                       architectures=tuple(archs), raw=data, **top)
