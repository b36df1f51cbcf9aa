"""Configurations of BLIP-2's language models (OPT, Flan-T5) as frozen dataclasses.

Field names are those of the `text_config` object in a BLIP-2 `config.json` (transformers' `OPTConfig` /
`T5Config` written out); a missing key (or a null) means transformers' default, which is each field's
default here. Keys we do not use (dropout rates, init ranges, task_specific_params, bookkeeping) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...errors import CheckpointError

# Activations the reference modules implement (blip_export.modeling.common.activation).
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu")


@dataclass(frozen=True)
class OptConfig:
    vocab_size: int = 50272  # BLIP-2 checkpoints say 50304: 50265 tokens + image token, padded to 64
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048  # the position table has 2 more rows: OPT's offset of 2
    do_layer_norm_before: bool = True  # False only for opt-350m (post-norm, no final layer norm)
    _remove_final_layer_norm: bool = False  # True: checkpoints fine-tuned before transformers 4.20.1
    word_embed_proj_dim: int | None = None  # None = hidden_size; opt-350m: 512 with project_in/out
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    bos_token_id: int = 2
    eos_token_id: int = 2  # BLIP-2 sets 50118 ("\n"): its captions end at the first newline
    pad_token_id: int = 1
    tie_word_embeddings: bool = True  # lm_head.weight = model.decoder.embed_tokens.weight

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        """transformers builds model.decoder.final_layer_norm only for pre-norm models."""
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def has_projections(self) -> bool:
        """project_in / project_out exist when the embeddings are narrower than the decoder."""
        return self.word_embed_proj_dim != self.hidden_size


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # 32100 SentencePiece tokens + 28 unused rows (BLIP-2 puts its image token at 32100)
    d_model: int = 512
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) | "gated-gelu" (v1.1, Flan-T5) | "gated-<act>"
    # Derived from feed_forward_proj unless config.json names them: transformers lets the explicit keys win,
    # and BLIP-2's Flan-T5 configs say dense_act_fn "gelu" (exact erf) next to "gated-gelu" (which alone
    # would mean "gelu_new", the tanh form).
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    # As written in config.json: True scales the decoder output by d_model**-0.5 before lm_head (T5 v1.0,
    # whose head is the shared embedding); Flan-T5 says False (own lm_head.weight, no rescale).
    tie_word_embeddings: bool = True
    # transformers 5 writes the rescale switch under its own name (and tie_word_embeddings always true);
    # when present it wins over tie_word_embeddings. None: not in the file (4.x-era config.json).
    scale_decoder_outputs_flag: bool | None = None
    decoder_start_token_id: int = 0  # the pad token starts every T5 decoder
    bos_token_id: int | None = None  # T5 has none; BLIP-2's configs say 1
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self):
        act_info = self.feed_forward_proj.split("-")
        if len(act_info) > 2 or len(act_info) == 2 and act_info[0] != "gated":
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected '<act>' or 'gated-<act>'")
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.dense_act_fn is None:
            act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act_info[-1]
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", act_info[0] == "gated")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def is_encoder_decoder(self) -> bool:
        return True

    @property
    def inner_dim(self) -> int:
        """Width of q/k/v: num_heads * d_kv."""
        return self.num_heads * self.d_kv

    @property
    def scale_decoder_outputs(self) -> bool:
        """transformers' T5: rescale by d_model**-0.5 when config.json says scale_decoder_outputs true
        (transformers 5), or, in files without that key, does not say tie_word_embeddings false."""
        if self.scale_decoder_outputs_flag is not None:
            return self.scale_decoder_outputs_flag
        return self.tie_word_embeddings


# Fields that may hold None (meaning: derive from other fields) and what a non-null value must be.
_OPTIONAL = {"word_embed_proj_dim": int, "num_decoder_layers": int, "dense_act_fn": str,
             "is_gated_act": bool, "bos_token_id": int, "scale_decoder_outputs_flag": bool}
# Dataclass field -> config.json key, where the key is not a valid field name here (a property has it).
_KEYS = {"scale_decoder_outputs_flag": "scale_decoder_outputs"}


def _expected(f) -> type:
    return _OPTIONAL.get(f.name) or type(f.default)


def _build(cls, d: dict, where: str):
    kwargs = {}
    for f in fields(cls):
        value = d.get(_KEYS.get(f.name, f.name))
        if value is None:
            continue
        want = _expected(f)
        if f.name == "eos_token_id" and isinstance(value, list) and len(value) == 1:
            value = value[0]  # transformers allows a list; BLIP-2's LMs stop at one token
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise CheckpointError(where, f"{f.name}={value!r}: expected {want.__name__}, got {type(value).__name__}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise CheckpointError(where, str(e)) from None


def _check_act(where: str, key: str, act: str) -> None:
    if act not in ACTIVATIONS:
        raise CheckpointError(where, f"{key}={act!r}: unsupported activation; expected one of {', '.join(ACTIVATIONS)}")


def text_config_from_dict(d: dict, where: str) -> OptConfig | T5Config:
    """The language model's config from a BLIP-2 `text_config` dict; `where` names it in errors
    (e.g. "model/config.json: text_config"). Raises CheckpointError (a ValueError), one line."""
    if not isinstance(d, dict):
        raise CheckpointError(where, f"text_config: expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt == "opt":
        config = _build(OptConfig, d, where)
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(where, f"hidden_size={config.hidden_size} is not a multiple of "
                                         f"num_attention_heads={config.num_attention_heads}")
        _check_act(where, "activation_function", config.activation_function)
        return config
    if mt == "t5":
        config = _build(T5Config, d, where)
        _check_act(where, "dense_act_fn", config.dense_act_fn)
        return config
    raise CheckpointError(where, f"text_config model_type {mt!r}: unsupported language model; supported: opt, t5")
