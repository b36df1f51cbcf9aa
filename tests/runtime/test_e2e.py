"""End to end: checkpoint -> blip-export bundle -> BlipRuntime on ONNX Runtime, against
transformers' generate and forward on the same re-randomized checkpoint.

Batches are compared row by row with transformers run on each request alone: that is the
unambiguous reference (transformers' own padded batches leak padding into results; see
blip_runtime/runtime.py), and our batch must equal it token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_export.bundle import export_bundle
from blip_runtime import BlipRuntime
from oracle import BASE_TEXT, BASE_VISION, errors, hf_config, make_full_checkpoint

PROMPTS = ["a picture of", "the", "a red circle on the left and", "two"]
QUESTIONS = ["what color is the shape?", "is there a circle", "what", "what shape is on the top left?"]


def images(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size + 7 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


class Pair:
    """transformers model + processor, and our runtime, for one checkpoint."""

    def __init__(self, arch, folder, config=None, seed=1, std=0.3):
        import transformers

        self.model = make_full_checkpoint(arch, folder / "ckpt", config, seed=seed, std=std)
        self.processor = transformers.BlipProcessor.from_pretrained(folder / "ckpt")
        export_bundle(folder / "ckpt", folder / "bundle")
        self.rt = BlipRuntime.load(folder / "bundle")

    def pixels(self, imgs):
        return self.processor(images=imgs, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def caption(tmp_path_factory):
    return Pair("BlipForConditionalGeneration", tmp_path_factory.mktemp("caption"))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return Pair("BlipForQuestionAnswering", tmp_path_factory.mktemp("vqa"), seed=2)


@pytest.fixture(scope="module")
def itr(tmp_path_factory):
    return Pair("BlipForImageTextRetrieval", tmp_path_factory.mktemp("itr"), seed=3, std=0.1)


def strip(ids, pad=0):
    ids = list(ids)
    while ids and ids[-1] == pad:
        ids.pop()
    return ids


@torch.no_grad()
def hf_caption(pair, img, prompt, **gen):
    kwargs = {}
    if prompt is not None:
        enc = pair.processor(text=prompt, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out = pair.model.generate(pixel_values=pair.pixels([img]), **kwargs, **gen)
    return strip(out[0].tolist())


@torch.no_grad()
def hf_answer(pair, img, question, **gen):
    enc = pair.processor(images=[img], text=question, return_tensors="pt")
    out = pair.model.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], **gen)
    return strip(out[0].tolist())


def check_rows(ours, theirs, what):
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert o == t, f"{what}, row {i}: ours {o} != transformers {t}"
    print(f"{what}: {len(ours)} rows identical; lengths {[len(t) for t in theirs]}")


CAPTION_CASES = {
    "greedy": dict(max_new_tokens=12),
    "beam3": dict(max_new_tokens=12, num_beams=3),
    "beam3-lp": dict(max_new_tokens=10, num_beams=3, length_penalty=0.6, early_stopping=True),
    "min-new-tokens": dict(max_new_tokens=12, min_new_tokens=8),
    "repetition-penalty": dict(max_new_tokens=12, repetition_penalty=1.5),
}


@pytest.mark.parametrize("case", CAPTION_CASES)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_caption_matches_transformers(caption, case, with_prompt):
    gen = CAPTION_CASES[case]
    imgs = images(4, seed=len(case))
    prompts = PROMPTS if with_prompt else [None] * 4
    theirs = [hf_caption(caption, img, p, **gen) for img, p in zip(imgs, prompts)]
    ours_batch = caption.rt.caption_tokens(imgs, PROMPTS if with_prompt else None, **gen)
    ours_single = caption.rt.caption_tokens(imgs[:1], prompts[0], **gen)
    check_rows(ours_single, theirs[:1], f"caption {case} prompt={with_prompt} batch 1")
    check_rows(ours_batch, theirs, f"caption {case} prompt={with_prompt} batch 4")
    texts = caption.rt.caption(imgs, PROMPTS if with_prompt else None, **gen)
    assert texts == [caption.processor.decode(t, skip_special_tokens=True) for t in theirs]


def test_caption_cases_are_not_vacuous(caption):
    """The random model must generate varied tokens, and some rows must stop at [SEP] early,
    or the comparisons above would prove little."""
    outs = [hf_caption(caption, img, None, max_new_tokens=12) for img in images(8, seed=5)]
    assert len({tuple(o) for o in outs}) > 1, outs
    assert any(len(set(o)) > 3 for o in outs), outs
    with_min = caption.rt.caption_tokens(images(4, seed=len("min-new-tokens")), None, max_new_tokens=12, min_new_tokens=8)
    assert all(len(r) >= 9 for r in with_min)


VQA_CASES = {
    "greedy": dict(max_new_tokens=8),
    "beam3": dict(max_new_tokens=8, num_beams=3),
    "repetition-penalty": dict(max_new_tokens=8, repetition_penalty=1.3, min_new_tokens=2),
}


@pytest.mark.parametrize("case", VQA_CASES)
def test_vqa_matches_transformers(vqa, case):
    gen = VQA_CASES[case]
    imgs = images(4, seed=11)
    theirs = [hf_answer(vqa, img, q, **gen) for img, q in zip(imgs, QUESTIONS)]
    check_rows(vqa.rt.answer_tokens(imgs, QUESTIONS, **gen), theirs, f"vqa {case} batch 4")
    check_rows(vqa.rt.answer_tokens(imgs[:1], QUESTIONS[0], **gen), theirs[:1], f"vqa {case} batch 1")
    assert len({tuple(t) for t in theirs}) > 1 or len(theirs[0]) > 3, theirs


@torch.no_grad()
def test_itm_and_itc_match_transformers(itr):
    imgs = images(3, seed=21)
    texts = ["a red circle", "two blue squares on the left", "what"]
    enc = itr.processor(images=imgs, text=texts, padding=True, return_tensors="pt")
    itm = itr.model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1]
    ours = itr.rt.match(imgs, texts)
    max_abs, rel = errors(ours, itm)
    print(f"ITM probability: max abs error {max_abs:.2e}, relative {rel:.2e}")
    assert max_abs < 1e-4
    sim = itr.model(**enc, use_itm_head=False).itm_score
    ours_sim = itr.rt.similarity(itr.rt.image_features(imgs), itr.rt.text_features(texts))
    max_abs, rel = errors(ours_sim, sim)
    print(f"ITC similarity: max abs error {max_abs:.2e}, relative {rel:.2e}")
    assert max_abs < 1e-4
    assert np.allclose(np.linalg.norm(itr.rt.image_features(imgs), axis=1), 1, atol=1e-5)
    assert float(np.ptp(ours)) > 1e-3, "ITM probabilities must differ between pairs"


def test_wrong_task_and_bad_input(caption):
    from blip_runtime import BundleError

    with pytest.raises(BundleError, match="'vqa'"):
        caption.rt.answer(images(1), "what")
    with pytest.raises(ValueError, match="prompt: got 2 for 1 image"):
        caption.rt.caption(images(1), ["a", "b"])
    with pytest.raises(ValueError, match="num_beams"):
        caption.rt.caption(images(1), num_beams=0)
    with pytest.raises(ValueError, match="unknown generation option"):
        caption.rt.caption(images(1), beams=3)


def test_only_the_decoding_loop_spins(caption):
    """Thread pools spin-wait only in the decoding loop's graph (see OrtSession)."""
    sessions = caption.rt.session.sessions
    assert {"vision", "cross_kv", "decoder_step"} <= sessions.keys()
    spins = {name: s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
             for name, s in sessions.items()}
    assert spins == {name: "1" if name == "decoder_step" else "0" for name in sessions}


@pytest.mark.slow
def test_blip_base_size_caption(tmp_path):
    """577 image tokens, 30524-token vocabulary, 12 layers: greedy and 3-beam captions."""
    pair = Pair("BlipForConditionalGeneration", tmp_path, hf_config(BASE_VISION, BASE_TEXT), seed=4, std=0.05)
    imgs = images(2, size=300, seed=3)
    for gen in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3)):
        theirs = [hf_caption(pair, img, p, **gen) for img, p in zip(imgs, [None, "a picture of"])]
        check_rows(pair.rt.caption_tokens(imgs[:1], None, **gen), theirs[:1], f"base caption {gen}")
        check_rows(pair.rt.caption_tokens(imgs[1:], "a picture of", **gen), theirs[1:], f"base caption prompt {gen}")
