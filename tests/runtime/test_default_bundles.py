"""The shipped easy-VQA model through the runtime: the exported bundles give what transformers gives
on the same checkpoints, and a CI-sized part of the easy-VQA test split meets the accuracy bar."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_export.defaults import default_models, sample_images
from blip_export.pipeline import export
from blip_runtime import BlipRuntime

ROOT = Path(__file__).resolve().parents[2]
SUBSET = 200  # images of the test split (and their ~1,900 questions)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    models = default_models("blip")
    assert set(models) == {"easyvqa-caption", "easyvqa-vqa", "easyvqa-itm"}, models
    out = tmp_path_factory.mktemp("bundles")
    return {name: export(folder, out / name).bundle for name, folder in models.items()}


@torch.no_grad()
def test_runtime_equals_transformers_on_shipped_checkpoints(bundles):
    import transformers

    models = default_models("blip")
    samples = sample_images()
    paths = [s["path"] for s in samples]
    processor = transformers.BlipProcessor.from_pretrained(models["easyvqa-caption"])
    pixels = processor(images=[str(p) for p in paths], return_tensors="pt")["pixel_values"]

    hf = transformers.BlipForConditionalGeneration.from_pretrained(models["easyvqa-caption"]).eval()
    theirs = processor.batch_decode(hf.generate(pixel_values=pixels, max_new_tokens=20), skip_special_tokens=True)
    ours = BlipRuntime.load(bundles["easyvqa-caption"]).caption(paths, max_new_tokens=20)
    assert ours == theirs

    hf = transformers.BlipForQuestionAnswering.from_pretrained(models["easyvqa-vqa"]).eval()
    theirs = []
    for s, px in zip(samples, pixels):  # one at a time: transformers' batches leak padding
        ids = processor(text=s["question"], return_tensors="pt")["input_ids"]
        theirs += processor.batch_decode(hf.generate(input_ids=ids, pixel_values=px[None]), skip_special_tokens=True)
    ours = BlipRuntime.load(bundles["easyvqa-vqa"]).answer(paths, [s["question"] for s in samples])
    assert ours == theirs
    assert sum(a == s["answer"] for a, s in zip(ours, samples)) >= 7

    hf = transformers.BlipForImageTextRetrieval.from_pretrained(models["easyvqa-itm"]).eval()
    texts = [f"a {w} shape" for w in ("red", "green", "blue", "teal", "black", "gray", "brown", "yellow")]
    enc = processor(images=[str(p) for p in paths], text=texts, padding=True, return_tensors="pt")
    p_theirs = hf(**enc).itm_score.softmax(-1)[:, 1].numpy()
    p_ours = BlipRuntime.load(bundles["easyvqa-itm"]).match(paths, texts)
    err = float(np.abs(p_ours - p_theirs).max())
    print(f"ITM probability on shipped checkpoint: max abs error {err:.2e}")
    assert err < 1e-4


def test_test_split_subset_meets_accuracy(bundles):
    """VQA accuracy and caption correctness >= 97% on the first SUBSET test images."""
    pytest.importorskip("easy_vqa", reason="the easy-vqa package holds the data set (test extra)")
    sys.path.insert(0, str(ROOT / "training"))
    from evaluate import evaluate_bundles
    from evaluate_reference import limit

    from data import load_split

    split = limit(load_split("test"), SUBSET)
    result = evaluate_bundles({name: Path(b) for name, b in bundles.items()}, split)
    print(f"easy-VQA test, first {SUBSET} images / {len(split.questions)} questions: {result}")
    assert len(split.questions) > 1000
    assert result["vqa_accuracy"] >= 97.0, result
    assert result["caption_correct"] >= 97.0, result
    assert result["i2t_r1"] >= 90.0 and result["t2i_r1"] >= 90.0, result
