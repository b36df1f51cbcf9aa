"""Sequence scores (return_scores=True) against transformers' generate(output_scores=True,
return_dict_in_generate=True) on tiny re-randomized BLIP and BLIP-2 OPT checkpoints.

Beam search: transformers' `sequences_scores`. Greedy: `compute_transition_scores(sequences, scores,
normalize_logits=True).sum(-1)` of the request generated alone (alone, no pads follow its EOS). Each
request's score in a batch equals its score alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from blip2_oracle import hf_config as blip2_config, make_checkpoint as make_blip2_checkpoint
from blip_export.bundle import export_bundle
from blip_runtime import BlipRuntime, Generated
from oracle import assert_close, errors, make_full_checkpoint

CASES = {"greedy": dict(max_new_tokens=10), "beam3": dict(max_new_tokens=10, num_beams=3)}
PROMPTS = ["a picture of", "the", "a red circle on the left and", "two"]
QUESTIONS = ["what color is the shape?", "is there a circle", "what", "what shape is on the top left?"]


def images(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size + 7 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def hf_scored(model, out, eos, start: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """(the returned sequences from `start` (the prompt before it dropped: OPT's bos is its EOS) up to their
    EOS; their scores float32 [n]) from a one-request generate."""
    if getattr(out, "sequences_scores", None) is not None:
        scores = out.sequences_scores
    else:
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).sum(-1)
    rows = [r[start:] for r in out.sequences.tolist()]
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
    return rows, scores.float().numpy()


def check(ours: list, theirs_rows, theirs_scores, lead: int, what: str) -> None:
    """ours: a Generated per sequence; its tokens are `lead` ids (what our *_tokens form puts before
    the ids transformers' rows hold) then exactly transformers' row; scores within 1e-4."""
    for i, (g, t) in enumerate(zip(ours, theirs_rows)):
        assert isinstance(g, Generated), f"{what}: row {i} is a {type(g).__name__}"
        assert len(g.tokens) == lead + len(t) and g.tokens[lead:] == t, f"{what}, row {i}: {g.tokens} vs {t}"
    assert_close(np.array([g.score for g in ours], np.float32), theirs_scores, 1e-4, what)


def check_batch(batch: list, alone: list, what: str) -> None:
    assert [g.tokens for g in batch] == [g.tokens for g in alone], what
    max_abs, rel = errors(np.array([g.score for g in batch]), np.array([g.score for g in alone]))
    print(f"{what}: batch vs alone max abs {max_abs:.3e}, relative {rel:.3e}; lengths {[len(g.tokens) for g in batch]}")
    assert rel < 1e-5, f"{what}: batch scores differ from alone by {rel:.3e}"


# -- BLIP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip-scores")
    pairs = {}
    for task, arch, seed in (("caption", "BlipForConditionalGeneration", 1), ("vqa", "BlipForQuestionAnswering", 2)):
        model = make_full_checkpoint(arch, folder / task / "ckpt", seed=seed, std=0.3)
        export_bundle(folder / task / "ckpt", folder / task / "bundle")
        processor = transformers.BlipProcessor.from_pretrained(folder / task / "ckpt")
        pairs[task] = SimpleNamespace(model=model, processor=processor, rt=BlipRuntime.load(folder / task / "bundle"))
    return pairs


@torch.no_grad()
def hf_blip(pair, task, img, text, **gen):
    eos = pair.model.config.text_config.sep_token_id
    kw = dict(output_scores=True, return_dict_in_generate=True, **gen)
    if task == "caption":
        enc = pair.processor(images=[img], text=text, return_tensors="pt")
        out = pair.model.generate(**enc, **kw)
    else:
        enc = pair.processor(images=[img], text=text, return_tensors="pt")
        out = pair.model.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], **kw)
    return hf_scored(pair.model.text_decoder, out, eos)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_blip_scores_match_transformers(blip, task, case):
    pair, gen, imgs = blip[task], CASES[case], images(4, seed=3)
    texts = PROMPTS if task == "caption" else QUESTIONS
    run = pair.rt.caption if task == "caption" else pair.rt.answer
    theirs = [hf_blip(pair, task, img, t, **gen) for img, t in zip(imgs, texts)]
    batch = run(imgs, texts, return_scores=True, **gen)
    alone = [run([img], t, return_scores=True, **gen)[0] for img, t in zip(imgs, texts)]
    check(alone, [r[0] for r, _ in theirs], np.concatenate([s for _, s in theirs]), 0, f"BLIP {task} {case}")
    check_batch(batch, alone, f"BLIP {task} {case}")
    assert [g.text for g in batch] == run(imgs, texts, **gen)  # return_scores changes only the result's form
    assert batch == (pair.rt.caption_tokens if task == "caption" else pair.rt.answer_tokens)(
        imgs, texts, return_scores=True, **gen)
    assert len({round(g.score, 4) for g in batch}) > 1 and all(g.score < 0 for g in batch), batch


@torch.no_grad()
def test_blip_several_sequences(blip):
    """num_return_sequences=3 of 3 beams: one list of 3 per request, best first, each transformers' score."""
    pair, gen, imgs = blip["caption"], dict(max_new_tokens=8, num_beams=3, num_return_sequences=3), images(2, seed=4)
    ours = pair.rt.caption(imgs, return_scores=True, **gen)
    assert len(ours) == 2 and all(len(per) == 3 for per in ours)
    for i, img in enumerate(imgs):
        rows, scores = hf_blip(pair, "caption", img, None, **gen)
        check(ours[i], rows, scores, 0, f"BLIP caption 3 of 3 beams, image {i}")
        assert [g.score for g in ours[i]] == sorted((g.score for g in ours[i]), reverse=True)


def test_return_scores_is_a_bool(blip):
    with pytest.raises(ValueError, match="return_scores='yes'"):
        blip["caption"].rt.caption(images(1), return_scores="yes")


# -- BLIP-2 OPT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    from blip_export.pipeline import export

    folder = tmp_path_factory.mktemp("blip2-opt-scores")
    # an untied head: tied to its spread-out embeddings, a tiny LM repeats its input
    config = blip2_config("opt", True, text_overrides={"tie_word_embeddings": False})
    model = make_blip2_checkpoint("Blip2ForConditionalGeneration", folder / "ckpt", config, seed=7, std=0.1)
    export(folder / "ckpt", folder / "bundle")
    return SimpleNamespace(model=model, proc=transformers.Blip2Processor.from_pretrained(folder / "ckpt"),
                           rt=BlipRuntime.load(folder / "bundle"))


@torch.no_grad()
def hf_opt(m, img, text, eos=None, **gen):
    c = m.model.config.text_config
    eos = c.eos_token_id if eos is None else eos
    inputs = m.proc(images=[img], text=[text], return_tensors="pt")
    out = m.model.generate(**inputs, do_sample=False, eos_token_id=eos, pad_token_id=c.pad_token_id,
                           output_scores=True, return_dict_in_generate=True, **gen)
    return hf_scored(m.model, out, eos, start=inputs["input_ids"].shape[1])


@pytest.mark.parametrize("case", CASES)
def test_blip2_opt_scores_match_transformers(opt, case):
    gen, imgs = CASES[case], [np.random.RandomState(s).randint(0, 255, (40, 40, 3), dtype=np.uint8) for s in range(3)]
    questions = ["what is it", "is there a red circle on the left", "two"]
    template = "Question: {} Answer:"
    theirs = [hf_opt(opt, img, template.format(q), **gen) for img, q in zip(imgs, questions)]
    batch = opt.rt.answer(imgs, questions, template, return_scores=True, **gen)
    alone = [opt.rt.answer([img], q, template, return_scores=True, **gen)[0] for img, q in zip(imgs, questions)]
    check(alone, [r[0] for r, _ in theirs], np.concatenate([s for _, s in theirs]), 0, f"BLIP-2 OPT answer {case}")
    check_batch(batch, alone, f"BLIP-2 OPT answer {case}")
    assert [g.text for g in batch] == opt.rt.answer(imgs, questions, template, **gen)
    captions = opt.rt.caption(imgs[:2], "a photo of the", return_scores=True, **gen)
    for img, g in zip(imgs[:2], captions):
        rows, scores = hf_opt(opt, img, "a photo of the", **gen)
        prompt = len(opt.proc.tokenizer("a photo of the")["input_ids"])
        check([g], [rows[0]], scores, prompt, f"BLIP-2 OPT caption {case}")
    assert len({round(g.score, 4) for g in batch}) > 1 and all(g.score < 0 for g in batch), batch


def test_blip2_opt_greedy_scores_of_sequences_ending_early(opt):
    """The tiny LM rarely reaches its EOS; with a token it often generates as EOS, some greedy answers
    end early while the others in the batch run on (transformers would add the pads' log-probs to a
    batch's score): an ended request's score counts its own tokens only. Beams keep each hypothesis's
    own score by construction (and avoid this EOS here)."""
    case = "greedy"
    eos, template = 226, "Question: {} Answer:"
    imgs = [np.random.RandomState(s).randint(0, 255, (40, 40, 3), dtype=np.uint8) for s in range(3)]
    questions = ["what is it", "is there a red circle on the left", "two"]
    gen = dict(CASES[case], eos_token_id=eos)
    batch = opt.rt.answer(imgs, questions, template, return_scores=True, **gen)
    alone = [opt.rt.answer([img], q, template, return_scores=True, **gen)[0] for img, q in zip(imgs, questions)]
    theirs = [hf_opt(opt, img, template.format(q), eos=eos, **CASES[case]) for img, q in zip(imgs, questions)]
    assert any(g.tokens[-1] == eos for g in batch) and len({len(g.tokens) for g in batch}) > 1, batch
    check(alone, [r[0] for r, _ in theirs], np.concatenate([s for _, s in theirs]), 0, f"BLIP-2 OPT {case}, early ends")
    check_batch(batch, alone, f"BLIP-2 OPT {case}, early ends")
