"""The shipped easy-VQA BLIP-2 checkpoints (blip_export/models/easyvqa-blip2-*): transformers reads
them with no missing or unexpected keys, blip_export.load_model reads them with transformers'
outputs, and in transformers they answer the shipped sample questions, caption the samples with
the right colour and shape, and retrieve the right caption. Trained by training/train_blip2.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_export import load_model
from blip_export.defaults import default_models
from oracle import assert_close

MODELS = Path(__file__).resolve().parents[2] / "blip_export" / "models"
NAMES = {"easyvqa-blip2-opt": "Blip2ForConditionalGeneration", "easyvqa-blip2-t5": "Blip2ForConditionalGeneration",
         "easyvqa-blip2-itm": "Blip2ForImageTextRetrieval"}
PROMPT = "Question: {} Answer:"
REL = 1e-4
# Until training/train_blip2.py's checkpoints meet the models README's targets they are not shipped.
pytestmark = pytest.mark.skipif(not any((MODELS / n / "config.json").is_file() for n in NAMES),
                                reason="no easyvqa-blip2-* folder shipped yet (python training/train_blip2.py)")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def samples() -> list[dict]:
    data = json.loads((MODELS / "samples" / "samples.json").read_text())
    return [{**s, "path": MODELS / "samples" / s["file"]} for s in data["images"]]


def images():
    from PIL import Image

    return [Image.open(s["path"]).convert("RGB") for s in samples()]


@pytest.fixture(scope="module")
def loaded():
    """name -> (transformers model, our model, Blip2Processor), built once."""
    import transformers

    made = {}

    def get(name):
        if name not in made:
            folder = MODELS / name
            assert (folder / "config.json").is_file(), f"{folder} is missing: run training/train_blip2.py"
            theirs, info = getattr(transformers, NAMES[name]).from_pretrained(folder, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            ours, config = load_model(folder)
            assert config.architecture == NAMES[name]
            made[name] = (theirs.eval(), ours, transformers.Blip2Processor.from_pretrained(folder))
        return made[name]

    return get


def test_listed_and_sizes():
    listed = default_models()
    for name in NAMES:
        assert name in listed, f"{name} not among blip_export.defaults.default_models(): {sorted(listed)}"
    sizes = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in listed.values()}
    print({k: f"{v / 1e6:.1f} MB" for k, v in sizes.items()})
    for name in NAMES:
        assert (MODELS / name / "model.safetensors").is_file() and (MODELS / name / "tokenizer.json").is_file()
    assert sum(sizes.values()) <= 40e6, f"all shipped checkpoints: {sum(sizes.values()) / 1e6:.1f} MB > 40 MB"


@pytest.mark.parametrize("name", ["easyvqa-blip2-opt", "easyvqa-blip2-t5"])
@torch.no_grad()
def test_lm_models_match_and_answer(loaded, name):
    theirs, ours, proc = loaded(name)
    items, ims = samples(), images()
    decoder_only = theirs.config.use_decoder_only_language_model
    gen = theirs.generation_config
    assert gen.max_new_tokens == 20
    if decoder_only:  # OPT stops at its "\n" token, as the public BLIP-2 OPT checkpoints
        assert gen.eos_token_id == theirs.config.text_config.eos_token_id == proc.tokenizer.convert_tokens_to_ids("Ċ")
    for item, image in zip(items, ims):
        inputs = proc(images=image, text=PROMPT.format(item["question"]), return_tensors="pt")
        out = theirs.generate(**inputs)
        new = out[0, inputs.input_ids.shape[1]:] if decoder_only else out[0]
        text = proc.decode(new, skip_special_tokens=True).strip()
        assert text == item["answer"], f"{item['file']}: {item['question']!r} -> {text!r}, expected {item['answer']!r}"
        # our reference module gives transformers' logits on the prompt (and the answer, for T5)
        if decoder_only:
            ref = theirs(**inputs).logits
            got = ours(inputs.pixel_values, inputs.input_ids, inputs.attention_mask)
        else:
            ref = theirs(**inputs, decoder_input_ids=out[:, :-1]).logits
            got = ours(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, decoder_input_ids=out[:, :-1])
        assert_close(got, ref, REL, f"{name} logits, {item['question']!r}")


@pytest.mark.parametrize("name", ["easyvqa-blip2-opt", "easyvqa-blip2-t5"])
@torch.no_grad()
def test_captions_name_the_right_colour_and_shape(loaded, name):
    """No prompt: where a sample's answer is a colour or a shape, the caption names it and no other
    colour or shape."""
    theirs, _, proc = loaded(name)
    items = samples()
    out = theirs.generate(**proc(images=images(), return_tensors="pt"))
    if theirs.config.use_decoder_only_language_model:
        out = out[:, theirs.config.num_query_tokens + 1:]  # image tokens + bos come back first
    for item, text in zip(items, [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]):
        print(f"{name} {item['file']}: {text!r} ({item['question']!r} -> {item['answer']!r})")
        words = text.split()
        if item["answer"] in COLORS:
            assert [w for w in words if w in COLORS] == [item["answer"]], f"{item['file']}: caption {text!r}"
        if item["answer"] in SHAPES:
            assert [w for w in words if w in SHAPES] == [item["answer"]], f"{item['file']}: caption {text!r}"


@torch.no_grad()
def test_itm_model_retrieves_and_matches(loaded):
    """ITC: among every "a small {colour} {shape} in the center" the sample's best caption names its
    colour or shape (whichever its answer is); our module gives transformers' ITC and ITM scores."""
    theirs, ours, proc = loaded("easyvqa-blip2-itm")
    items, ims = samples(), images()
    texts = [f"a small {c} {s} in the center" for c in COLORS for s in SHAPES]
    inputs = proc(images=ims, text=texts, padding=True, return_tensors="pt")
    itc = theirs(**inputs, use_image_text_matching_head=False).logits_per_image  # (images, texts)
    assert_close(ours(inputs.pixel_values, inputs.input_ids, inputs.attention_mask), itc, REL, "ITC similarity")
    for item, row in zip(items, itc):
        best = texts[int(row.argmax())]
        print(f"{item['file']}: {best!r} ({item['question']!r} -> {item['answer']!r})")
        if item["answer"] not in ("yes", "no"):
            assert item["answer"] in best.split(), f"{item['file']}: best caption {best!r} lacks {item['answer']!r}"
    pairs = proc(images=ims, text=[texts[0]] * len(ims), padding=True, return_tensors="pt")
    itm = theirs(**pairs, use_image_text_matching_head=True).logits_per_image
    got = ours(pairs.pixel_values, pairs.input_ids, pairs.attention_mask, use_image_text_matching_head=True)
    assert_close(got, itm, REL, "ITM logits")
