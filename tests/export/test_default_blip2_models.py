"""The shipped easy-VQA BLIP-2 checkpoints (blip_export/models/easyvqa-blip2-*): transformers reads
them with no missing or unexpected keys, blip_export.load_model reads them with transformers'
outputs, and in transformers they answer the shipped sample questions, caption the samples with
the right colour and shape, and retrieve the right caption. `blip-export` lists and takes their short
names; the fp32 bundles it writes give transformers' tokens and scores, and meet the models README's
targets on a CI-sized part of the easy-VQA test split. Trained by training/train_blip2.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from blip_export.defaults import default_models, resolve_model
from oracle import assert_close, shipped_model_loader

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "blip_export" / "models"
SUBSET = 100  # test-split images (and their ~960 questions) through the bundles
NAMES = {"easyvqa-blip2-opt": "Blip2ForConditionalGeneration", "easyvqa-blip2-t5": "Blip2ForConditionalGeneration",
         "easyvqa-blip2-itm": "Blip2ForImageTextRetrieval"}
PROMPT = "Question: {} Answer:"
REL = 1e-4
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
    return shipped_model_loader(MODELS, NAMES, "Blip2Processor", "run training/train_blip2.py")


def test_listed_and_sizes():
    listed = default_models()
    for name in NAMES:
        assert name in listed, f"{name} not among blip_export.defaults.default_models(): {sorted(listed)}"
    assert sorted(default_models("blip-2")) == sorted(NAMES)
    assert not set(default_models("blip")) & set(NAMES)
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


# -- the bundles: blip-export's short names, parity with transformers, accuracy ----------------------


def test_cli_lists_the_short_names():
    from blip_export.cli import parser

    text = parser().format_help()
    for name in NAMES:
        assert name in text, f"blip-export --help does not list {name}"
        assert resolve_model(name) == MODELS / name


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """name -> fp32 bundle, written by `blip-export NAME --output DIR` (the short name), once."""
    from blip_export.cli import main

    out = tmp_path_factory.mktemp("blip2_default_bundles")
    for name in NAMES:
        assert main([name, "--output", str(out / name), "-q"]) == 0, f"blip-export {name} failed"
        assert (out / name / "manifest.json").is_file()
    return {name: out / name for name in NAMES}


@pytest.mark.parametrize("name", ["easyvqa-blip2-opt", "easyvqa-blip2-t5"])
@torch.no_grad()
def test_bundle_tokens_equal_transformers(loaded, bundles, name):
    """Greedy caption and VQA tokens of every sample image: the runtime's equal transformers' (one
    request at a time in transformers, so that no batch padding enters)."""
    from blip_runtime import BlipRuntime

    theirs_model, _, proc = loaded(name)
    rt = BlipRuntime.load(bundles[name])
    items, ims = samples(), images()
    paths = [s["path"] for s in items]
    Q = theirs_model.config.num_query_tokens
    decoder_only = theirs_model.config.use_decoder_only_language_model
    ours_caps = rt.caption_tokens(paths)
    ours_ans = rt.answer_tokens(paths, [s["question"] for s in items])
    for item, image, cap, ans in zip(items, ims, ours_caps, ours_ans):
        out = theirs_model.generate(**proc(images=image, return_tensors="pt"))[0]
        assert cap == (out[Q:] if decoder_only else out).tolist(), f"{name} {item['file']}: caption tokens"
        inputs = proc(images=image, text=PROMPT.format(item["question"]), return_tensors="pt")
        out = theirs_model.generate(**inputs)[0]
        want = out[inputs.input_ids.shape[1]:] if decoder_only else out
        assert ans == want.tolist(), f"{name} {item['file']}: answer tokens {ans} vs transformers {want.tolist()}"
    print(f"{name}: {len(items)} captions and answers, tokens equal; e.g. {rt.caption(paths[:1])[0]!r}")


@torch.no_grad()
def test_bundle_itc_and_itm_equal_transformers(loaded, bundles):
    from blip_runtime import BlipRuntime

    theirs, _, proc = loaded("easyvqa-blip2-itm")
    rt = BlipRuntime.load(bundles["easyvqa-blip2-itm"])
    paths, ims = [s["path"] for s in samples()], images()
    texts = [f"a large {c} {s} at the top" for c in COLORS for s in SHAPES]
    inputs = proc(images=ims, text=texts, padding=True, return_tensors="pt")
    itc = theirs(**inputs, use_image_text_matching_head=False).logits_per_image.numpy()  # (images, texts)
    assert_close(torch.from_numpy(rt.retrieve(paths, texts)), torch.from_numpy(itc), REL, "bundle ITC similarity")
    pair_texts = [texts[i % len(texts)] for i in range(len(ims))]
    pairs = proc(images=ims, text=pair_texts, padding=True, return_tensors="pt")
    p_theirs = theirs(**pairs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    assert_close(torch.from_numpy(rt.match(paths, pair_texts)), p_theirs, REL, "bundle ITM p(match)")


# VQA accuracy bar on the subset: the models README's target, for both language models.
VQA_BAR = {"easyvqa-blip2-opt": 95.0, "easyvqa-blip2-t5": 95.0}


def test_bundles_meet_the_targets_on_a_test_split_subset(bundles):
    """The models README's targets on the first SUBSET test images: VQA >= VQA_BAR and captions
    >= 95 % for OPT and T5, ITC R@1 >= 95 % both ways, and the ITM head ranks each image's caption
    above the same caption with another colour or shape (ROC AUC >= 0.95)."""
    pytest.importorskip("easy_vqa", reason="the easy-vqa package holds the data set (test extra)")
    sys.path.insert(0, str(ROOT / "training"))
    from evaluate_blip2 import evaluate_bundles, table
    from evaluate_reference import limit

    from data import load_split

    split = limit(load_split("test"), SUBSET)
    res = evaluate_bundles(bundles, split)
    print(f"easy-VQA test, first {SUBSET} images / {len(split.questions)} questions, fp32 bundles:\n{table(res)}")
    assert len(split.questions) > 900
    for name in ("easyvqa-blip2-opt", "easyvqa-blip2-t5"):
        assert res[name]["vqa_accuracy"] >= VQA_BAR[name], (name, res[name])
        assert res[name]["caption_correct"] >= 95.0, (name, res[name])
    itm = res["easyvqa-blip2-itm"]
    assert itm["i2t_r1"] >= 95.0 and itm["t2i_r1"] >= 95.0, itm
    assert itm["itm_auc_colour"] >= 0.95 and itm["itm_auc_shape"] >= 0.95, itm
