"""`save_checkpoint`: write a reference BLIP model as a Hugging Face checkpoint folder.

The folder is what transformers' `save_pretrained` plus `BlipProcessor.save_pretrained` would
write, so `BlipFor*.from_pretrained(folder)`, `BlipProcessor.from_pretrained(folder)` and our own
`load_model(folder)` all read it: `config.json`, `model.safetensors` (transformers' key names),
`generation_config.json` (generative models), `processor_config.json` (the image processor nested
under "image_processor", as transformers 5's `BlipProcessor.save_pretrained` writes it, with no
`preprocessor_config.json`) and, given a tokenizer, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and `vocab.txt`.
Nothing here imports transformers. The folder is written under a temporary name and renamed into
place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import BLIP_ARCHITECTURES, GENERATIVE, BlipConfig
from ...files import current_umask, mkdir_unique

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, what every BLIP checkpoint uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TASK_ARCHITECTURES = BLIP_ARCHITECTURES
_GENERATIVE = GENERATIVE
_SPECIAL_NAMES = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}


def config_dict(config: BlipConfig, architecture: str, tie_word_embeddings: bool) -> dict:
    """config.json as transformers 5 writes it for BLIP: nested text/vision configs with every field
    its BlipTextConfig / BlipVisionConfig has (dropouts zero, as BLIP's), the top-level sizes."""
    v, t = config.vision, config.text
    text = {
        "attention_probs_dropout_prob": 0.0,
        "bos_token_id": t.bos_token_id,
        "encoder_hidden_size": v.hidden_size,  # transformers forces it to the vision width
        "eos_token_id": t.eos_token_id,
        "hidden_act": t.hidden_act,
        "hidden_dropout_prob": 0.0,
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "is_decoder": t.is_decoder,
        "label_smoothing": 0.0,
        "layer_norm_eps": t.layer_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "model_type": "blip_text_model",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "pad_token_id": t.pad_token_id,
        "projection_dim": 768,  # unused by every BLIP class; transformers' default
        "sep_token_id": t.sep_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "vocab_size": t.vocab_size,
    }
    vision = {
        "attention_dropout": 0.0,
        "hidden_act": v.hidden_act,
        "hidden_size": v.hidden_size,
        "image_size": v.image_size,
        "initializer_range": 1e-10,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": v.layer_norm_eps,
        "model_type": "blip_vision_model",
        "num_attention_heads": v.num_attention_heads,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": v.patch_size,
        "projection_dim": v.projection_dim,
    }
    return {
        "architectures": [architecture],
        "dtype": "float32",
        "image_text_hidden_size": config.image_text_hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "label_smoothing": 0.0,
        "logit_scale_init_value": config.logit_scale_init_value,
        "model_type": "blip",
        "projection_dim": config.projection_dim,
        "text_config": text,
        "tie_word_embeddings": tie_word_embeddings,
        "vision_config": vision,
    }


def _is_tied(state: dict[str, torch.Tensor]) -> bool:
    """True when every LM head's decoder.weight equals its word embeddings (or there is no LM head)."""
    for key, weight in state.items():
        if key.endswith("cls.predictions.decoder.weight"):
            embed = state[key[: -len("cls.predictions.decoder.weight")] + "bert.embeddings.word_embeddings.weight"]
            if not torch.equal(weight, embed):
                return False
    return True


def checkpoint_state(model: nn.Module, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' keys. The LM head's bias is transformers' separate
    `cls.predictions.bias` (it ties `decoder.bias` to it on load); `decoder.weight` is left out when
    tied to the word embeddings, as save_pretrained does. Untied, transformers keeps both biases
    as separate parameters (its forward reads decoder.bias): both are written, equal."""
    out = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        if key.endswith("cls.predictions.decoder.bias"):
            out[key[: -len("decoder.bias")] + "bias"] = tensor
            if not tie_word_embeddings:
                out[key] = tensor.clone()
        elif key.endswith("cls.predictions.decoder.weight") and tie_word_embeddings:
            continue
        else:
            out[key] = tensor
    return out


def image_processor_dict(image_size: int, mean, std) -> dict:
    """BlipImageProcessor's settings as transformers 5 saves them: bicubic resize to a square, 1/255,
    normalize (tests/export/test_checkpoint.py compares them with BlipProcessor.save_pretrained's)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [float(x) for x in mean],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [float(x) for x in std],
        "resample": 3,  # PIL.Image.BICUBIC
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def processor_dict(image_size: int, mean, std) -> dict:
    """processor_config.json of BlipProcessor (transformers 5): the image processor nested."""
    return {"image_processor": image_processor_dict(image_size, mean, std), "processor_class": "BlipProcessor"}


def _tokenizer_files(tokenizer_dir: Path, config: BlipConfig, out: Path) -> None:
    """Copy tokenizer.json (and whichever of the transformers side files `tokenizer_dir` has), write
    the missing ones, and check the ids the model was built with against the tokenizer's."""
    from tokenizers import Tokenizer

    src = tokenizer_dir / "tokenizer.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: tokenizer_dir needs a tokenizer.json")
    tok = Tokenizer.from_file(str(src))
    t = config.text
    expected = {"[PAD]": t.pad_token_id, "[SEP]": t.sep_token_id, "[DEC]": t.bos_token_id}
    for token, want in expected.items():
        if tok.token_to_id(token) != want:
            raise ValueError(f"{src}: {token} has id {tok.token_to_id(token)}, the model's config says {want}")
    if tok.get_vocab_size(with_added_tokens=True) > t.vocab_size:
        raise ValueError(f"{src}: {tok.get_vocab_size()} ids do not fit text_config.vocab_size={t.vocab_size}")
    shutil.copyfile(src, out / "tokenizer.json")

    added = json.loads(src.read_text(encoding="utf-8")).get("added_tokens", [])
    files = {
        "tokenizer_config.json": lambda: {
            # transformers 5 builds BertTokenizer's pipeline around the vocabulary and keeps the
            # added tokens listed here: [DEC]/[ENC] come back with their ids.
            "added_tokens_decoder": {
                str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for a in added
            },
            "clean_up_tokenization_spaces": False,
            **_SPECIAL_NAMES,
            "do_lower_case": True,
            "model_max_length": t.max_position_embeddings,
            "processor_class": "BlipProcessor",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "BertTokenizer",
        },
        "special_tokens_map.json": lambda: dict(_SPECIAL_NAMES),
    }
    for name, make in files.items():
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
        else:
            (out / name).write_text(json.dumps(make(), indent=2) + "\n", encoding="utf-8")
    if (tokenizer_dir / "vocab.txt").is_file():
        shutil.copyfile(tokenizer_dir / "vocab.txt", out / "vocab.txt")
    else:  # the WordPiece vocabulary in id order, without the added tokens (as BERT's vocab.txt)
        vocab = tok.get_vocab(with_added_tokens=False)
        ordered = sorted(vocab, key=vocab.get)
        assert [vocab[w] for w in ordered] == list(range(len(ordered))), "WordPiece ids must be 0..n-1"
        (out / "vocab.txt").write_text("".join(w + "\n" for w in ordered), encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(
    model: nn.Module,
    config: BlipConfig,
    folder: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> Path:
    """Write `model` (a blip_export.families.blip.modeling BlipFor* / BlipModel built from `config`) to `folder`
    as a Hugging Face checkpoint, replacing what is there. Returns the folder.

    tokenizer_dir: a folder with `tokenizer.json` (side files optional) whose [PAD], [SEP] and
    [DEC] ids must be the config's pad, sep and bos ids; None writes no tokenizer.
    image_size: the processor's resize target (default: the vision config's image_size).
    mean, std: the processor's normalization (default CLIP's, as BLIP).
    Word embeddings count as tied when the LM head's weight equals them (then it is not stored).
    """
    from safetensors.torch import save_file

    architecture = type(model).__name__
    if architecture not in TASK_ARCHITECTURES:
        raise TypeError(f"expected one of {', '.join(TASK_ARCHITECTURES)} from blip_export.families.blip.modeling, got {architecture}")
    folder = Path(folder)
    state = model.state_dict()
    tie = _is_tied(state)
    tensors = checkpoint_state(model, tie)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdir_unique(folder.parent, f".{folder.name}.")
    try:
        _write_json(tmp / "config.json", config_dict(config, architecture, tie))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if architecture in _GENERATIVE:
            t = config.text
            _write_json(tmp / "generation_config.json", {
                "bos_token_id": t.bos_token_id, "eos_token_id": t.sep_token_id, "pad_token_id": t.pad_token_id,
                "use_cache": True,
            })
        _write_json(tmp / "processor_config.json", processor_dict(image_size or config.vision.image_size, mean, std))
        if tokenizer_dir is not None:
            _tokenizer_files(Path(tokenizer_dir), config, tmp)
        # safetensors makes its file private: a checkpoint is ordinary data, under the user's umask.
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~current_umask())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
