"""save_checkpoint: our reference models written as Hugging Face checkpoints that transformers
(from_pretrained, BlipProcessor) and our own load_model read back with identical outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from blip_export import load_model
from blip_export.families.blip.checkpoint import CLIP_MEAN, CLIP_STD, save_checkpoint
from blip_export.families.blip.config import config_from_dict
from blip_export.families.blip.modeling import MODEL_CLASSES
from oracle import TINY_TEXT, TINY_VISION, assert_close, rerandomize

REL = 1e-5
ARCHS = ["BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel"]
BOS, SEP = TINY_TEXT["bos_token_id"], TINY_TEXT["sep_token_id"]  # 97, 3: the tiny tokenizer's [DEC], [SEP]
WORDS = ["a", "red", "blue", "circle", "square", "what", "color", "is", "the", "shape", "?", "."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT-style WordPiece tokenizer.json whose ids fit TINY_TEXT: [PAD]=0 .. [MASK]=4, pieces,
    then [DEC]=97 and [ENC]=98 added after the vocabulary, as in BLIP."""
    import string

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [c for c in string.ascii_lowercase if c not in WORDS]
    pieces += ["##" + c for c in string.ascii_lowercase]
    pieces += [f"[unused{i}]" for i in range(BOS - len(pieces))]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"])
    assert tok.token_to_id("[DEC]") == BOS
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def build(arch: str, seed: int, tie: bool = True):
    """Our reference `arch` from a config dict as transformers writes it, re-randomized."""
    cfg = config_from_dict({"model_type": "blip", "architectures": [arch], "vision_config": TINY_VISION,
                            "text_config": dict(TINY_TEXT, eos_token_id=SEP), "projection_dim": 16,
                            "image_text_hidden_size": 12})
    model = rerandomize(MODEL_CLASSES[arch](cfg), seed=seed).eval()
    if tie and hasattr(model, "text_decoder"):
        head = model.text_decoder.cls.predictions
        head.decoder.weight = model.text_decoder.bert.embeddings.word_embeddings.weight
    return model, cfg


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(5, BOS, (2, 6), generator=g)
    ids[:, 0] = 2  # [CLS]
    return pixels, ids


def load_transformers(arch, folder, capfd):
    import transformers

    model, info = getattr(transformers, arch).from_pretrained(folder, output_loading_info=True)
    printed = capfd.readouterr().err
    print(f"{arch} loading info: {info}")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"transformers {kind}: {sorted(info[kind])}"
    assert "LOAD REPORT" not in printed and "corrupted" not in printed, printed
    return model.eval()


@torch.no_grad()
def compare(arch, ours, loaded, theirs):
    """Outputs of the model we saved, the one load_model read back and transformers' one."""
    pixels, ids = inputs()
    if arch == "BlipForConditionalGeneration":
        dec = ids.clone()
        dec[:, 0] = BOS
        ref = theirs(pixel_values=pixels, input_ids=dec).logits
        for name, m in (("saved", ours), ("load_model", loaded)):
            assert_close(m(pixels, dec), ref, REL, f"{arch} caption logits ({name} vs transformers)")
    elif arch == "BlipForQuestionAnswering":
        answer = torch.tensor([[BOS, 7, 8, SEP]] * 2)
        img = theirs.vision_model(pixel_values=pixels).last_hidden_state
        q = theirs.text_encoder(input_ids=ids, encoder_hidden_states=img).last_hidden_state
        ref = theirs.text_decoder(input_ids=answer, encoder_hidden_states=q).logits
        for name, m in (("saved", ours), ("load_model", loaded)):
            assert_close(m(pixels, ids, answer), ref, REL, f"{arch} answer logits ({name} vs transformers)")
    elif arch == "BlipForImageTextRetrieval":
        itm = theirs(input_ids=ids, pixel_values=pixels, use_itm_head=True).itm_score
        itc = theirs(input_ids=ids, pixel_values=pixels, use_itm_head=False).itm_score
        for name, m in (("saved", ours), ("load_model", loaded)):
            assert_close(m(pixels, ids, use_itm_head=True), itm, REL, f"{arch} ITM logits ({name})")
            assert_close(m(pixels, ids, use_itm_head=False), itc, REL, f"{arch} ITC similarity ({name})")
    else:
        ref = theirs.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref)
        for name, m in (("saved", ours), ("load_model", loaded)):
            assert_close(m.get_image_features(pixels), ref, REL, f"{arch} image features ({name})")


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_checkpoint_loads_in_transformers_and_ours(arch, tmp_path, tokenizer_dir, capfd):
    ours, cfg = build(arch, seed=ARCHS.index(arch) + 1)
    folder = save_checkpoint(ours, cfg, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir, image_size=32)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blip" and config["architectures"] == [arch]
    assert config["text_config"]["bos_token_id"] == BOS and config["text_config"]["sep_token_id"] == SEP
    assert (folder / "generation_config.json").is_file() == (arch in ARCHS[:2])
    theirs = load_transformers(arch, folder, capfd)
    loaded, loaded_cfg = load_model(folder)
    assert loaded_cfg.vision == cfg.vision and loaded_cfg.text == cfg.text
    compare(arch, ours, loaded, theirs)


def test_untied_lm_head(tmp_path, tokenizer_dir, capfd):
    arch = "BlipForConditionalGeneration"
    ours, cfg = build(arch, seed=9, tie=False)
    folder = save_checkpoint(ours, cfg, tmp_path / "untied", image_size=32)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    theirs = load_transformers(arch, folder, capfd)
    head = theirs.text_decoder.cls.predictions
    assert head.decoder.weight.data_ptr() != theirs.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    compare(arch, ours, load_model(folder)[0], theirs)


def test_processor_loads_with_our_tokenizer_and_image_settings(tmp_path, tokenizer_dir):
    import numpy as np
    import transformers
    from PIL import Image
    from tokenizers import Tokenizer

    ours, cfg = build("BlipForQuestionAnswering", seed=4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's: the processor must read ours
    folder = save_checkpoint(ours, cfg, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir, image_size=32,
                             mean=mean, std=std)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "processor_config.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "preprocessor_config.json").exists(), "transformers 5 writes only processor_config.json"
    proc = transformers.BlipProcessor.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = ["What color is the circle?", "a red square.", "zebra", "a [DEC] b"]
    for text in texts:
        hf = proc.tokenizer(text).input_ids
        assert hf == raw.encode(text).ids, f"{text!r}: {hf} != {raw.encode(text).ids}"
        assert proc.tokenizer.decode(hf, skip_special_tokens=True) == raw.decode(hf)
    assert proc.tokenizer.convert_tokens_to_ids("[DEC]") == BOS
    batch = proc(text=texts, padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch and batch.input_ids.shape[0] == len(texts)

    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pixels = proc(images=Image.fromarray(image), return_tensors="pt").pixel_values
    resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)).astype(np.float64) / 255
    expected = (resized.astype(np.float32) - np.float32(mean)) / np.float32(std)
    assert_close(pixels[0], torch.from_numpy(expected).permute(2, 0, 1), 1e-6, "BlipProcessor pixel values")


@pytest.mark.parametrize("size,mean,std", [(32, CLIP_MEAN, CLIP_STD), (48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_processor_config_is_what_transformers_writes(tmp_path, size, mean, std):
    """save_checkpoint's processor_config.json holds what BlipProcessor.save_pretrained writes for the
    same image processor (the tokenizer's part of the processor is compared by the test above)."""
    import transformers

    from oracle import save_processor

    ours, cfg = build("BlipForConditionalGeneration", seed=8)
    folder = save_checkpoint(ours, cfg, tmp_path / "ours", image_size=size, mean=mean, std=std)
    save_processor(tmp_path / "theirs", TINY_TEXT["vocab_size"], size, mean=mean, std=std)
    theirs = json.loads((tmp_path / "theirs" / "processor_config.json").read_text())
    written = json.loads((folder / "processor_config.json").read_text())
    assert written == theirs, f"ours {written} != transformers {theirs}"
    image = transformers.BlipImageProcessor.from_pretrained(folder)
    assert image.size == {"height": size, "width": size} and list(image.image_mean) == list(mean)


def test_tokenizer_ids_must_match_the_config(tmp_path, tokenizer_dir):
    ours, cfg = build("BlipForConditionalGeneration", seed=5)
    bad = config_from_dict({**cfg.raw, "text_config": dict(cfg.raw["text_config"], bos_token_id=96)})
    with pytest.raises(ValueError, match=r"\[DEC\] has id 97"):
        save_checkpoint(ours, bad, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir)
    assert list(tmp_path.iterdir()) == [], "a failed save leaves nothing behind"


def test_replaces_folder_atomically(tmp_path, tokenizer_dir):
    first, cfg = build("BlipForImageTextRetrieval", seed=6)
    folder = save_checkpoint(first, cfg, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir)
    (folder / "stale.txt").write_text("from an older save")
    second, _ = build("BlipForImageTextRetrieval", seed=7)
    with pytest.raises(TypeError, match="expected one of"):
        save_checkpoint(torch.nn.Linear(2, 2), cfg, folder)
    bad = config_from_dict({**cfg.raw, "text_config": dict(cfg.raw["text_config"], sep_token_id=4)})
    with pytest.raises(ValueError):
        save_checkpoint(second, bad, folder, tokenizer_dir=tokenizer_dir)
    assert (folder / "stale.txt").is_file(), "a failed save must leave the old checkpoint as it was"
    mask = os.umask(0o027)  # a checkpoint is ordinary data: the umask decides, as for any folder
    try:
        save_checkpoint(second, cfg, folder, tokenizer_dir=tokenizer_dir)
    finally:
        os.umask(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary folders left"
    assert not (folder / "stale.txt").exists(), "the folder is replaced, not merged"
    loaded, _ = load_model(folder)
    pixels, _ = inputs()
    with torch.no_grad():
        assert_close(loaded.image_feat(pixels), second.image_feat(pixels), REL, "replaced checkpoint")
    assert oct(folder.stat().st_mode & 0o777) == "0o750"
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o640"
