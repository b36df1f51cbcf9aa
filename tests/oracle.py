"""Test helpers: transformers BLIP models built from configs with re-randomized weights, saved with
`save_pretrained` (the oracle every parity test compares against), and error reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, projection_dim=16)
TINY_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=97, sep_token_id=3,
                 pad_token_id=0, eos_token_id=2)
# BLIP-base: ViT-B/16 at 384 px (577 image tokens), BERT-base text with the 30524-token vocabulary.
BASE_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=384, patch_size=16)
BASE_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12)


def hf_config(vision=TINY_VISION, text=TINY_TEXT, **top):
    import transformers

    return transformers.BlipConfig(
        vision_config=dict(vision), text_config=dict(text), projection_dim=top.pop("projection_dim", 16),
        image_text_hidden_size=top.pop("image_text_hidden_size", 12), **top,
    )


@torch.no_grad()
def rerandomize(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Overwrite every parameter: transformers' own init leaves BLIP's vision near zero
    (initializer_range 1e-10), which would make any comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name or "layer_norm" in name and name.endswith("weight") or "post_layernorm.weight" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("logit_scale"):
            p.fill_(2.6592)
        else:
            p.copy_(std * torch.randn(p.shape, generator=g) * (5.0 if "embedding" in name else 1.0))
    return model


def make_checkpoint(arch: str, folder, config=None, seed: int = 0, std: float = 0.02, **save_kwargs):
    """Build transformers' `arch` from `config`, re-randomize, save_pretrained to `folder`.
    Returns the transformers model (eval mode, fp32)."""
    import transformers

    cls = getattr(transformers, arch)
    model = cls(config or hf_config()).eval()
    rerandomize(model, seed=seed, std=std)
    # transformers ties the LM head to the word embeddings: keep that tie after re-randomizing.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.save_pretrained(folder, **save_kwargs)
    return model


def errors(ours, theirs) -> tuple[float, float]:
    ours = ours.detach().float().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours, np.float32)
    theirs = theirs.detach().float().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, f"shape {ours.shape} != {theirs.shape}"
    max_abs = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    scale = float(np.abs(theirs).max()) if theirs.size else 0.0
    return max_abs, max_abs / max(scale, 1e-30)


def assert_close(ours, theirs, rel: float, what: str) -> None:
    """Relative error = max |ours - theirs| / max |theirs|; both numbers are printed."""
    max_abs, rel_err = errors(ours, theirs)
    print(f"{what}: max abs error {max_abs:.3e}, relative error {rel_err:.3e}")
    assert rel_err < rel, f"{what}: relative error {rel_err:.3e} >= {rel:.0e} (max abs error {max_abs:.3e})"


WORDS = ("a picture of the an photo cat dog two on with red blue green circle square triangle what is "
         "color shape there in small large left right top bottom and").split()


def blip_vocab(size: int) -> dict[str, int]:
    """A BLIP-shaped WordPiece vocabulary of `size` tokens: BERT specials, words, letters and
    word pieces (so any lowercase ASCII text tokenizes), filler, then [DEC] (bos) and [ENC] last.
    size 99: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; size 30524: BERT's ids 0/100/101/102/103."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    body = WORDS + [l for l in letters if l not in WORDS] + [f"##{l}" for l in letters] + list("0123456789.,?!'")
    tokens: list[str] = []
    if size >= 30000:
        tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + specials[1:]
    else:
        tokens = list(specials)
    tokens += [t for t in body if t not in tokens]
    tokens = tokens[: size - 2]
    tokens += [f"filler{i}" for i in range(size - 2 - len(tokens))]
    return {t: i for i, t in enumerate(tokens + ["[DEC]", "[ENC]"])}


def save_processor(folder, vocab_size: int, image_size: int, mean=None, std=None):
    """BlipProcessor (BERT tokenizer + BLIP image processor) saved by transformers' save_pretrained,
    as a checkpoint carries it (transformers 5: processor_config.json with the image processor
    nested, no preprocessor_config.json). mean, std: None keeps BlipImageProcessor's (CLIP's).
    Returns the processor."""
    import transformers

    tok = transformers.BertTokenizerFast(vocab=blip_vocab(vocab_size), bos_token="[DEC]",
                                         additional_special_tokens=["[ENC]"])
    extra = {k: list(v) for k, v in (("image_mean", mean), ("image_std", std)) if v is not None}
    image = transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size}, **extra)
    processor = transformers.BlipProcessor(image, tok)
    processor.save_pretrained(folder)
    return processor


def make_full_checkpoint(arch: str, folder, config=None, seed: int = 0, std: float = 0.02, image_mean=None,
                         image_std=None, image_size: int | None = None):
    """make_checkpoint plus the processor files, as a public checkpoint folder has them.
    image_mean, image_std, image_size: the processor's (default: BLIP's CLIP mean/std at the vision
    config's image size). image_size must match the vision config's for an export to accept it."""
    config = config or hf_config()
    model = make_checkpoint(arch, folder, config, seed=seed, std=std)
    save_processor(folder, config.text_config.vocab_size, image_size or config.vision_config.image_size,
                   mean=image_mean, std=image_std)
    return model


def shipped_model_loader(models: Path, names: dict[str, str], processor: str, hint: str):
    """A get(name) -> (transformers model in eval mode, our reference model, processor) over the shipped
    checkpoint folders models/<name> (names: folder -> transformers class), each built once. Loading
    asserts that the folder exists (else `hint` says how to make it), that transformers finds no
    missing, unexpected or mismatched keys, and that load_model reads the same architecture."""
    import transformers

    from blip_export import load_model

    made = {}

    def get(name):
        if name not in made:
            folder = models / name
            assert (folder / "config.json").is_file(), f"{folder} is missing: {hint}"
            theirs, info = getattr(transformers, names[name]).from_pretrained(folder, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            ours, config = load_model(folder)
            assert config.architecture == names[name]
            made[name] = (theirs.eval(), ours, getattr(transformers, processor).from_pretrained(folder))
        return made[name]

    return get
