"""What a BLIP-2 bundle carries besides its graphs: the tokenizer and its settings, the image
preprocessing, generate()'s defaults and the special tokens.

Which tokenizer: generation models (and Blip2Model) carry the language model's (OPT's byte-level BPE,
Flan-T5's Unigram), read by blip_runtime's Blip2TextProcessor; the retrieval model carries the
Q-Former's BERT WordPiece tokenizer (its texts never reach a language model). The manifest's
tokenizer entry says which in "kind" ("lm" or "qformer") and always holds Blip2TextSettings' fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip_runtime.families.blip2.processor import Blip2TextProcessor
from blip_runtime.families.blip2.text_settings import Blip2TextSettings
from blip_runtime.image import CLIP_MEAN, CLIP_STD, ImageSettings
from blip_runtime.processor_config import image_processor_config

from ...errors import CheckpointError
from ...files import copy_file
from .. import BundleParts
from .config import Blip2Config
from .export import dims_from_config

# generation_config.json keys that are generate()'s defaults (the runtime's GenerationOptions).
GENERATION_KEYS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "length_penalty",
                   "repetition_penalty", "do_sample", "temperature", "top_k", "top_p", "early_stopping")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def image_settings(folder: Path, config: Blip2Config) -> tuple[ImageSettings, str]:
    """The checkpoint's image preprocessing and the file it came from ("processor_config.json" as
    transformers 5's Blip2Processor writes it, "preprocessor_config.json"), or "defaults": BLIP-2's
    processor defaults (bicubic, CLIP mean/std) at the model's image size."""
    try:
        data, path = image_processor_config(folder)  # ValueError names the file
    except ValueError as e:
        raise CheckpointError(folder, str(e)) from None
    size = config.vision_config.image_size
    if data is None:
        return ImageSettings(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD), "defaults"
    try:
        settings = ImageSettings.from_preprocessor_config(data)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if settings.size != (size, size):
        raise CheckpointError(path, f"size {settings.size} differs from config.json vision_config.image_size {size}")
    return settings, path.name


def _lm_tokenizer(folder: Path, config: Blip2Config) -> dict:
    """Blip2TextSettings of the LM's tokenizer, checked by building the runtime's processor from the
    folder (tokenizer class against tokenizer.json's model, `<image>`'s id against image_token_index)."""
    try:
        Blip2TextProcessor.from_folder(folder, config.num_query_tokens, config.image_token_index)
        settings, _ = Blip2TextSettings.from_folder(folder, config.num_query_tokens, config.image_token_index)
    except ValueError as e:
        raise CheckpointError(folder, f"tokenizer: {e}") from None
    return {"kind": "lm", **settings.to_dict()}


def _qformer_tokenizer(folder: Path, config: Blip2Config) -> dict:
    """The retrieval model's BERT tokenizer: WordPiece ids below the Q-Former's vocabulary."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = type(tok.model).__name__
    if model != "WordPiece":
        raise CheckpointError(folder / "tokenizer.json", f"a {model} tokenizer; a {config.architecture} reads "
                              "text with the Q-Former's BERT (WordPiece) tokenizer")
    image = tok.token_to_id("<image>")  # the processor's, stripped before the Q-Former sees the text
    vocab = tok.get_vocab(with_added_tokens=True)
    top = max(i for t, i in vocab.items() if i != image)
    limit = config.qformer_config.vocab_size
    if top >= limit:
        raise CheckpointError(folder / "tokenizer.json", f"token ids up to {top}; the Q-Former's vocabulary "
                              f"(qformer_config.vocab_size) is {limit}")
    try:
        settings, _ = Blip2TextSettings.from_folder(folder, config.num_query_tokens, config.image_token_index)
    except ValueError as e:
        raise CheckpointError(folder, f"tokenizer: {e}") from None
    max_length = config.qformer_config.max_position_embeddings
    path = folder / "tokenizer_config.json"
    limit = _read_json(path).get("model_max_length") if path.is_file() else None
    if isinstance(limit, int) and 0 < limit < max_length:
        max_length = limit
    return {"kind": "qformer", **settings.to_dict(), "model_max_length": max_length}


def _generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def generation_defaults(generation_config: dict) -> dict:
    """generate()'s defaults: generation_config.json's, over greedy. Only the lengths the file sets are
    written: without them transformers 5 generates 20 new tokens (within the LM's positions), which
    the runtime applies; a max_length of 20 written here would count the prompt and the image tokens."""
    out = {"num_beams": 1}
    out.update({k: generation_config[k] for k in GENERATION_KEYS if generation_config.get(k) is not None})
    return out


def _first_id(value, where: str, name: str) -> int | None:
    """A token id of generation_config.json / config.json: an int, or the first of a list."""
    if isinstance(value, list) and value:
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(where, f"{name}={value!r}: expected a token id (an int >= 0)")
    return value


def special_tokens(folder: Path, config: Blip2Config, generation_config: dict) -> dict:
    """The ids generation and tokenization need. generate() reads eos/bos/pad/decoder_start from
    generation_config.json first (OPT's public checkpoints end captions at 50118, "\\n"), then the LM's
    config; image_token_id is the graphs' (image_token_index, or V for the legacy convention). Ids a
    model has none of (T5's bos) are left out."""
    dims = dims_from_config(config)
    if not dims.lm:  # retrieval: BERT's pad (what the Q-Former's embeddings treat as padding)
        out = {"pad_token_id": config.qformer_config.pad_token_id}
        if config.image_token_index is not None:
            out["image_token_id"] = config.image_token_index
        return out
    text, where = config.text_config, str(folder / "generation_config.json")
    names = ["bos_token_id", "eos_token_id", "pad_token_id"] + (["decoder_start_token_id"] if dims.lm == "t5" else [])
    out = {}
    for name in names:
        value = _first_id(generation_config.get(name), where, name)
        if value is None:
            value = _first_id(getattr(text, name, None), f"{folder / 'config.json'}: text_config", name)
        if value is not None:
            out[name] = value
    for name in ("eos_token_id", "pad_token_id"):
        if name not in out:
            raise CheckpointError(folder / "config.json", f"text_config has no {name}; generation needs one")
        if out[name] >= dims.vocab_size:
            raise CheckpointError(where, f"{name}={out[name]}: outside the LM's vocabulary ({dims.vocab_size})")
    out["image_token_id"] = dims.image_token_id
    return out


def bundle_parts(folder: Path, config: Blip2Config, tokenizer_dest: Path) -> BundleParts:
    """Copy the tokenizer to `tokenizer_dest` and gather the manifest entries."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(folder, "no tokenizer.json (save the checkpoint's Blip2Processor with it)")
    dims = dims_from_config(config)
    tokenizer = _lm_tokenizer(folder, config) if dims.lm else _qformer_tokenizer(folder, config)
    settings, image_source = image_settings(folder, config)
    notes = []
    if image_source == "defaults":
        notes.append(f"{folder}: no processor_config.json or preprocessor_config.json; using BLIP-2's image "
                     f"defaults ({settings.size[0]} px bicubic, CLIP mean/std); the manifest records it")
    generation_config = _generation_config(folder)
    special = special_tokens(folder, config, generation_config)
    copy_file(folder / "tokenizer.json", tokenizer_dest)
    return BundleParts(
        architecture=config.architecture,
        meta={"family": "blip-2", "architecture": config.architecture, **dims.to_dict(), **special},
        tokenizer=tokenizer,
        image={**settings.to_dict(), "source": image_source},
        generation=generation_defaults(generation_config) if dims.lm else {},
        special_tokens=special,
        notes=notes,
    )
