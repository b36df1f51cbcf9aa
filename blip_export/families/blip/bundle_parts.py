"""What a BLIP bundle carries besides its graphs: the tasks of each architecture, the model dims,
the tokenizer (tokenizer.json, or one built from vocab.txt) and its settings, the image
preprocessing, generate()'s defaults and the special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from blip_runtime.families.blip.graphs import Dims
from blip_runtime.image import CLIP_MEAN, CLIP_STD, ImageSettings
from blip_runtime.processor_config import image_processor_config

from ...errors import CheckpointError
from ...files import copy_file
from .. import BundleParts
from .config import ARCHITECTURES, BlipConfig

TASKS_OF = ARCHITECTURES  # architecture -> its tasks


def model_dims(config: BlipConfig) -> Dims:
    itc = {"BlipForImageTextRetrieval": config.image_text_hidden_size, "BlipModel": config.projection_dim}
    return Dims(
        image_size=config.vision.image_size,
        num_image_tokens=config.vision.num_positions,
        vision_hidden=config.vision.hidden_size,
        text_hidden=config.text.hidden_size,
        num_layers=config.text.num_hidden_layers,
        num_heads=config.text.num_attention_heads,
        head_dim=config.text.head_dim,
        vocab_size=config.text.vocab_size,
        itc_dim=itc.get(config.architecture, 0),
    )


def image_settings(folder: Path, config: BlipConfig) -> tuple[ImageSettings, str]:
    """The checkpoint's image preprocessing and where it came from: "processor_config.json" (nested,
    as transformers 5's BlipProcessor.save_pretrained writes it), "preprocessor_config.json", or
    "defaults" (BLIP's processor defaults at the model's image size) when the folder has neither."""
    try:
        data, path = image_processor_config(folder)  # ValueError names the file
    except ValueError as e:
        raise CheckpointError(folder, str(e)) from None
    if data is None:
        size = config.vision.image_size
        return ImageSettings(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD), "defaults"
    try:
        settings = ImageSettings.from_preprocessor_config(data)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if settings.size != (config.vision.image_size, config.vision.image_size):
        raise CheckpointError(path, f"size {settings.size} differs from config.json image_size {config.vision.image_size}")
    return settings, path.name


def copy_tokenizer(folder: Path, dest: Path) -> None:
    """tokenizer.json, or one built from vocab.txt as BlipProcessor's BertTokenizerFast builds it."""
    if (folder / "tokenizer.json").is_file():
        copy_file(folder / "tokenizer.json", dest)
        return
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise CheckpointError(folder, "no tokenizer: expected tokenizer.json or vocab.txt")
    from tokenizers import AddedToken, BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    tok.add_special_tokens([AddedToken("[DEC]", special=True), AddedToken("[ENC]", special=True)])
    tok.save(str(dest))


def tokenizer_settings(folder: Path, max_positions: int) -> dict:
    """What tokenizer.json does not hold: the length limit and whether decode() cleans up spaces
    (transformers 5 defaults to False; 4.x BERT tokenizers to True)."""
    settings = {"model_max_length": max_positions, "clean_up_tokenization_spaces": False}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        limit = data.get("model_max_length")
        if isinstance(limit, int) and 0 < limit < max_positions:
            settings["model_max_length"] = limit
        if isinstance(data.get("clean_up_tokenization_spaces"), bool):
            settings["clean_up_tokenization_spaces"] = data["clean_up_tokenization_spaces"]
    return settings


def generation_defaults(folder: Path, config: BlipConfig) -> dict:
    """Defaults of generate(), from generation_config.json where present (transformers' defaults
    otherwise: max_length 20 counting the prompt, greedy)."""
    out = {"max_length": 20, "num_beams": 1, "min_length": 0}
    path = folder / "generation_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "length_penalty",
                    "repetition_penalty", "do_sample", "temperature", "top_k", "top_p", "early_stopping"):
            if data.get(key) is not None:
                out[key] = data[key]
    return out



def bundle_parts(folder: Path, config: BlipConfig, tokenizer_dest: Path) -> BundleParts:
    """Copy (or build) the tokenizer to `tokenizer_dest` and gather the manifest entries."""
    settings, image_source = image_settings(folder, config)
    notes = []
    if image_source == "defaults":
        notes.append(f"{folder}: no processor_config.json or preprocessor_config.json; using BLIP's image "
                     f"defaults ({settings.size[0]} px bicubic, CLIP mean/std); the manifest records it")
    copy_tokenizer(folder, tokenizer_dest)
    text = config.text
    special = {"bos_token_id": text.bos_token_id, "sep_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id}
    return BundleParts(
        architecture=config.architecture,
        meta={"family": "blip", "architecture": config.architecture, **model_dims(config).to_dict(), **special},
        tokenizer=tokenizer_settings(folder, text.max_position_embeddings),
        image={**settings.to_dict(), "source": image_source},
        generation=generation_defaults(folder, config),
        special_tokens=special,
        notes=notes,
    )
