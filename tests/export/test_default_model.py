"""The shipped easy-VQA checkpoints (blip_export/models/easyvqa-*): transformers and load_model read
them with identical outputs, the tokenizer gives identical ids through BlipProcessor and the raw
tokenizers library, and the models answer the shipped sample questions right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_runtime.processor_config import image_processor_config
from oracle import assert_close, shipped_model_loader

MODELS = Path(__file__).resolve().parents[2] / "blip_export" / "models"
NAMES = {"easyvqa-caption": "BlipForConditionalGeneration", "easyvqa-vqa": "BlipForQuestionAnswering",
         "easyvqa-itm": "BlipForImageTextRetrieval"}
REL = 1e-5
TEXTS = ["is there not a teal shape in the image?", "What color is the Triangle?", "a small red circle in the top left",
         "a zebra, 42 of them!", "[DEC] yes"]


def samples() -> list[dict]:
    data = json.loads((MODELS / "samples" / "samples.json").read_text())
    return [{**s, "path": MODELS / "samples" / s["file"]} for s in data["images"]]


@pytest.fixture(scope="module")
def loaded():
    """name -> (transformers model, our model, BlipProcessor), built once."""
    return shipped_model_loader(MODELS, NAMES, "BlipProcessor", "run training/train.py (see models/README.md)")


def test_sizes_and_files():
    total = 0
    for name in NAMES:
        folder = MODELS / name
        for f in ("config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            assert (folder / f).is_file(), f"{folder / f} missing"
        # preprocessor_config.json (older saves) or processor_config.json (save_checkpoint today)
        image, source = image_processor_config(folder)
        assert image is not None and image["size"] == {"height": 64, "width": 64}, (folder, source)
        total += sum(p.stat().st_size for p in folder.iterdir())
        assert (folder / "tokenizer.json").read_bytes() == (MODELS / "easyvqa-caption" / "tokenizer.json").read_bytes()
    print(f"shipped checkpoints: {total / 1e6:.1f} MB")
    assert total <= 20e6


def test_tokenizer_ids_match_blip_processor(loaded):
    from tokenizers import Tokenizer

    _, _, proc = loaded("easyvqa-vqa")
    raw = Tokenizer.from_file(str(MODELS / "easyvqa-vqa" / "tokenizer.json"))
    for text in TEXTS:
        ids = proc.tokenizer(text).input_ids
        assert ids == raw.encode(text).ids, f"{text!r}: BlipProcessor {ids}, tokenizers {raw.encode(text).ids}"
        assert proc.decode(ids, skip_special_tokens=True) == raw.decode(ids)
    assert "[UNK]" not in raw.encode(TEXTS[3]).tokens, "unseen words are spelled in pieces"
    config = json.loads((MODELS / "easyvqa-vqa" / "config.json").read_text())["text_config"]
    assert raw.token_to_id("[DEC]") == config["bos_token_id"] and raw.token_to_id("[SEP]") == config["sep_token_id"]


def pixels_and_questions(proc):
    from PIL import Image

    items = samples()
    images = [Image.open(s["path"]).convert("RGB") for s in items]
    batch = proc(images=images, text=[s["question"] for s in items], padding=True, return_tensors="pt")
    return items, images, batch


@torch.no_grad()
def test_caption_outputs_match(loaded):
    theirs, ours, proc = loaded("easyvqa-caption")
    _, _, batch = pixels_and_questions(proc)
    ids = proc(text=["a small red circle in the top left"] * len(batch.pixel_values), return_tensors="pt").input_ids
    ids[:, 0] = ours.config.text.bos_token_id
    ref = theirs(pixel_values=batch.pixel_values, input_ids=ids).logits
    assert_close(ours(batch.pixel_values, ids), ref, REL, "shipped caption model logits")


@torch.no_grad()
def test_vqa_outputs_match_and_answers_are_right(loaded):
    theirs, ours, proc = loaded("easyvqa-vqa")
    items, images, _ = pixels_and_questions(proc)
    bos, sep = ours.config.text.bos_token_id, ours.config.text.sep_token_id
    for item, image in zip(items, images):
        # One question at a time: transformers 5 ignores the question's padding mask in the answer
        # decoder (see test_modeling.test_vqa_answer_logits), so padding would make it differ.
        inputs = proc(images=image, text=item["question"], return_tensors="pt")
        answer = theirs.generate(**inputs, max_new_tokens=5)[0]
        text = proc.decode(answer, skip_special_tokens=True)
        assert answer[0] == bos and answer[-1] == sep
        logits = ours(inputs.pixel_values, inputs.input_ids, answer[None, :-1])
        ref_q = theirs.text_encoder(input_ids=inputs.input_ids,
                                    encoder_hidden_states=theirs.vision_model(inputs.pixel_values)[0])[0]
        ref = theirs.text_decoder(input_ids=answer[None, :-1], encoder_hidden_states=ref_q).logits
        assert_close(logits, ref, REL, f"shipped VQA answer logits, {item['question']!r}")
        assert logits[0].argmax(-1).tolist() == answer[1:].tolist(), "greedy over our logits = generate"
        assert text == item["answer"], f"{item['file']}: {item['question']!r} -> {text!r}, expected {item['answer']!r}"


@torch.no_grad()
def test_itm_outputs_match(loaded):
    theirs, ours, proc = loaded("easyvqa-itm")
    _, _, batch = pixels_and_questions(proc)
    texts = proc(text=["a large blue rectangle at the bottom"] * len(batch.pixel_values), return_tensors="pt")
    itm = theirs(input_ids=texts.input_ids, pixel_values=batch.pixel_values, use_itm_head=True).itm_score
    assert_close(ours(batch.pixel_values, texts.input_ids, use_itm_head=True), itm, REL, "shipped ITM logits")
    itc = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                 use_itm_head=False).itm_score
    ours_itc = ours(batch.pixel_values, batch.input_ids, batch.attention_mask, use_itm_head=False)
    assert_close(ours_itc, itc, REL, "shipped ITC similarity")


@torch.no_grad()
def test_captions_name_the_right_colour_and_shape(loaded):
    """transformers' generate over the shipped caption model: where a sample's answer is a colour or
    a shape, the caption names it."""
    theirs, _, proc = loaded("easyvqa-caption")
    items, images, _ = pixels_and_questions(proc)
    out = theirs.generate(pixel_values=proc(images=images, return_tensors="pt").pixel_values, max_new_tokens=20)
    captions = proc.batch_decode(out, skip_special_tokens=True)
    for item, text in zip(items, captions):
        print(f"{item['file']}: {text!r} ({item['question']!r} -> {item['answer']!r})")
        if item["answer"] not in ("yes", "no"):
            assert item["answer"] in text.split(), f"{item['file']}: caption {text!r} lacks {item['answer']!r}"
