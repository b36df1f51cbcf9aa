"""BlipRuntime over BLIP-2 bundles against transformers 5.24, token for token: captions with and without
a prompt, VQA with the template, greedy and beams, min_new_tokens, repetition_penalty, several returned
sequences, batches equal to their requests alone, OPT and Flan-T5, both image-token conventions (legacy:
as transformers 4.x composed the LM's input); ITM / ITC scores and features of Blip2ForImageTextRetrieval;
blip-run on the bundles; bad input; no torch in the runtime.

Bundles come from the exporter (blip_export.pipeline.export) of tiny re-randomized checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from blip2_oracle import NUM_QUERIES, generation_checkpoint, hf_config, make_checkpoint  # noqa: E402
from blip_runtime import cli  # noqa: E402
from blip_runtime.runtime import BlipRuntime  # noqa: E402
from oracle import assert_close, blip_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
GENERATION = [("opt", True), ("opt", False), ("t5", True), ("t5", False)]


def _export(ckpt: Path, out: Path) -> None:
    """The exporter's bundle of the checkpoint (fp32 ONNX, every task of its architecture). Its
    generation entry has only the lengths generation_config.json sets (transformers 5 generates 20
    new tokens when none is set)."""
    from blip_export.pipeline import export

    export(ckpt, out)
    config = json.loads((ckpt / "generation_config.json").read_text()) if (ckpt / "generation_config.json").is_file() else {}
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(key in config for key in ("max_length", "min_length") if key in manifest["generation"])


def _images(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module", params=GENERATION, ids=[f"{lm}-{'tokens' if t else 'legacy'}" for lm, t in GENERATION])
def gen(request, tmp_path_factory):
    lm, image_tokens = request.param
    folder = tmp_path_factory.mktemp(lm)
    theirs = generation_checkpoint(lm, folder / "ckpt", image_tokens)
    _export(folder / "ckpt", folder / "bundle")
    proc = transformers.Blip2Processor.from_pretrained(folder / "ckpt")
    return SimpleNamespace(lm=lm, legacy=not image_tokens, theirs=theirs, proc=proc, bundle=folder / "bundle",
                           rt=BlipRuntime.load(folder / "bundle"), cfg=theirs.config)


@torch.no_grad()
def _theirs(m, image, text, **settings) -> tuple[list[list[int]], list[str], int]:
    """transformers for one request: (generated ids per sequence, EOS included, no pads; the decoded
    outputs as batch_decode(skip_special_tokens=True) gives them; the length before the generated ids)."""
    inputs = m.proc(images=[image], text=None if text is None else [text], return_tensors="pt")
    eos = settings.pop("eos_token_id", m.cfg.text_config.eos_token_id)
    settings = dict(do_sample=False, eos_token_id=eos, pad_token_id=m.cfg.text_config.pad_token_id, **settings)
    if m.legacy:  # transformers 4.x: the queries before the text embeddings, the LM's generate over them
        prefix = m.theirs.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        ids = inputs["input_ids"]
        embeds = torch.cat([prefix, m.theirs.get_input_embeddings()(ids)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = m.theirs.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
        lead = 0 if m.lm == "opt" else 1  # 4.x OPT returned the new tokens only
    else:
        if text is None:
            inputs = {"pixel_values": inputs["pixel_values"]}
        out = m.theirs.generate(**inputs, **settings)
        # OPT returns the prompt (generate(pixel_values): the image tokens and bos), T5 the start token
        lead = (inputs["input_ids"].shape[1] if "input_ids" in inputs else NUM_QUERIES + 1) if m.lm == "opt" else 1
    rows = [r[lead:] for r in out.tolist()]
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
    return rows, m.proc.batch_decode(out, skip_special_tokens=True), lead


CASES = {
    "greedy": dict(max_new_tokens=8),
    "beam3": dict(max_new_tokens=8, num_beams=3),
    "min_new_tokens": dict(max_new_tokens=10, min_new_tokens=9),
    "repetition_penalty": dict(max_new_tokens=8, repetition_penalty=1.8),
    "beam3_return3": dict(max_new_tokens=8, num_beams=3, num_return_sequences=3),
    "defaults": {},  # the bundle's: transformers 5's 20 new tokens when the checkpoint sets no length
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prompt", [None, "a photo of the"], ids=["no-prompt", "prompt"])
def test_caption_matches_transformers(gen, case, prompt):
    m, options = gen, CASES[case]
    if m.legacy and (prompt is None or case == "repetition_penalty"):
        pytest.skip("legacy: 4.x generated from embeddings (no prompt ids to start from or to penalize)")
    if m.lm == "t5" and prompt is None:
        prompt_for_theirs = ""  # T5's config has no bos: generate(pixel_values) cannot start; text="" does
    else:
        prompt_for_theirs = prompt
    image = _images(1)[0]
    ref_tokens, ref_text, _ = _theirs(m, image, prompt_for_theirs, **options)
    n = options.get("num_return_sequences", 1)
    ours = m.rt._generate([image], None if prompt is None else [prompt], options)[0]
    tokens = m.rt.caption_tokens([image], prompt=prompt, **options)
    texts = m.rt.caption([image], prompt=prompt, **options)
    seqs, texts = (tokens[0], texts[0]) if n > 1 else (tokens, texts)
    print("transformers:", ref_tokens, ref_text, "\nours:", ours, texts)
    assert ours == ref_tokens
    for seq, g in zip(seqs, ours):  # what transformers puts before the new tokens, without image tokens
        assert seq[len(seq) - len(g):] == g
        assert seq[: len(seq) - len(g)] == ([0] if m.lm == "t5" else m.rt._rows([prompt] if prompt else None, 1)[0][NUM_QUERIES:])
    if not m.legacy:  # 4.x's OPT output lacked the prompt; the current one has it, as ours
        assert texts == ref_text
    assert len(set(sum(ref_tokens, []))) > 2, "a tiny LM that repeats one token proves little"
    if case == "min_new_tokens":
        assert all(len(r) >= 9 for r in ref_tokens)


@pytest.mark.parametrize("case", ["greedy", "beam3"])
def test_vqa_with_the_template_matches_transformers(gen, case):
    m = gen
    image = _images(1, seed=5)[0]
    ref_tokens, ref_text, lead = _theirs(m, image, "Question: what is the color of the square? Answer:", **CASES[case])
    answer = m.rt.answer([image], "what is the color of the square?", **CASES[case])
    tokens = m.rt.answer_tokens([image], "what is the color of the square?", **CASES[case])
    got = [t[1:] for t in tokens] if m.lm == "t5" else tokens
    print("transformers:", ref_tokens, "\nours:", got, answer)
    assert got == ref_tokens
    assert answer == m.rt.text.batch_decode(ref_tokens)  # the generated tokens only, for OPT as for T5
    if m.lm == "t5" and not m.legacy:
        assert answer == ref_text


@pytest.mark.parametrize("case", ["greedy", "beam3", "beam3_return3", "defaults"])
def test_batch_equals_each_request_alone(gen, case):
    m = gen
    images = _images(3, seed=11)
    prompts = ["a", "a photo of the small red", "what is the color of the small square on the left"]
    batch = m.rt.caption_tokens(images, prompt=prompts, **CASES[case])
    alone = [m.rt.caption_tokens([im], prompt=p, **CASES[case])[0] for im, p in zip(images, prompts)]
    assert batch == alone
    assert len({json.dumps(b) for b in batch}) == 3
    if not m.legacy and case in ("greedy", "defaults"):
        for im, p, got in zip(images, prompts, m.rt.caption(images, prompt=prompts, **CASES[case])):
            assert [got] == _theirs(m, im, p, **CASES[case])[1]


# -- retrieval ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    folder = tmp_path_factory.mktemp("itm")
    theirs = make_checkpoint("Blip2ForImageTextRetrieval", folder / "ckpt", hf_config("opt", True, text_input=True),
                             seed=3)
    # the retrieval checkpoint reads text with the Q-Former's BERT tokenizer
    bert = transformers.BertTokenizerFast(vocab=blip_vocab(99))
    proc = transformers.Blip2Processor(transformers.BlipImageProcessorPil(size={"height": 42, "width": 42}), bert,
                                       num_query_tokens=NUM_QUERIES)
    proc.save_pretrained(folder / "ckpt")
    _export(folder / "ckpt", folder / "bundle")
    return SimpleNamespace(theirs=theirs, bert=bert, proc=proc, bundle=folder / "bundle",
                           rt=BlipRuntime.load(folder / "bundle"))


TEXTS = ["a photo of a red circle", "two cat on the left", "what is there"]


@torch.no_grad()
def test_itm_itc_and_features_match_transformers(retrieval):
    m = retrieval
    images = _images(3, seed=21)
    pv = m.proc.image_processor(images, return_tensors="pt")["pixel_values"]
    enc = m.bert(TEXTS, padding=True, return_tensors="pt")
    Q = m.theirs.config.num_query_tokens
    ids = torch.cat([torch.full((3, Q), m.theirs.config.image_token_index), enc["input_ids"]], dim=1)
    mask = torch.cat([torch.ones(3, Q, dtype=torch.long), enc["attention_mask"]], dim=1)
    ref = m.theirs(pixel_values=pv, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert_close(m.rt.match(images, TEXTS), torch.softmax(ref.logits_per_image, dim=1)[:, 1], 1e-5, "ITM p(match)")
    ref = m.theirs(pixel_values=pv, input_ids=ids, attention_mask=mask)
    img, txt = m.rt.image_features(images), m.rt.text_features(TEXTS)
    assert img.shape == (3, Q, 12) and txt.shape == (3, 12)
    assert_close(img, ref.image_embeds, 1e-5, "image_features")
    assert_close(txt, ref.text_embeds, 1e-5, "text_features")
    assert_close(m.rt.similarity(img, txt), ref.logits_per_image, 1e-5, "ITC similarity")
    assert_close(m.rt.retrieve(images, TEXTS, batch_size=2), ref.logits_per_image, 1e-5, "retrieve")
    assert float(ref.logits_per_image.std()) > 1e-3, "scores must vary for the comparison to mean anything"


# -- reliability ------------------------------------------------------------------------------------
def test_bad_inputs_give_one_line_naming_the_argument(gen, retrieval):
    rt, im = gen.rt, _images(2)
    cases = [
        (lambda: rt.caption(im, prompt=["a"]), "prompt: got 1 for 2 image"),
        (lambda: rt.caption(im, prompt=3), "prompt: expected a str"),
        (lambda: rt.answer(im, "what", template="no slot"), "template="),
        (lambda: rt.caption(im, num_beams=0), "num_beams"),
        (lambda: rt.caption(im, num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (lambda: rt.caption(im, colour=1), "unknown generation option"),
        (lambda: rt.caption([]), "images: expected at least one image"),
        (lambda: rt.match(im, ["a", "b"]), "does the tasks"),
        (lambda: retrieval.rt.caption(im), "does the tasks"),
        (lambda: retrieval.rt.match(im, ["a"]), "texts: got 1 for 2"),
    ]
    if gen.lm == "opt":
        cases.append((lambda: rt.caption(im, max_new_tokens=500), "max_position_embeddings"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_blip_run_on_blip2_bundles(gen, retrieval, tmp_path, capsys):
    from PIL import Image

    paths = []
    for i, a in enumerate(_images(2, seed=31)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    assert cli.main([str(gen.bundle), "caption", *paths, "--prompt", "a photo of", "--max-new-tokens", "6",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["caption"] for r in doc["results"]] == gen.rt.caption(paths, prompt="a photo of", max_new_tokens=6)
    assert cli.main([str(gen.bundle), "vqa", *paths, "--question", "what is there", "--num-beams", "3",
                     "--max-new-tokens", "6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["answer"] for r in doc["results"]] == gen.rt.answer(paths, "what is there", num_beams=3,
                                                                   max_new_tokens=6)
    assert cli.main([str(retrieval.bundle), "itm", *paths, "--text", "a red circle", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    np.testing.assert_array_equal([r["probability"] for r in doc["results"]],
                                  retrieval.rt.match(paths, "a red circle"))
    assert cli.main([str(retrieval.bundle), "embed", "--image", paths[0], "--text", "a", "--text", "two cat",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert np.array(doc["similarity"]).shape == (1, 2)
    assert cli.main([str(gen.bundle), "itm", *paths, "--text", "a", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert "no 'itm' task" in doc["error"] and "\n" not in doc["error"]


def test_no_torch(gen):
    code = ("import sys\nfrom blip_runtime import BlipRuntime\n"
            f"rt = BlipRuntime.load({str(gen.bundle)!r})\n"
            "import numpy as np\nprint(rt.caption([np.zeros((40, 40, 3), np.uint8)], max_new_tokens=3))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["greedy", "beam3", "min_new_tokens"])
def test_generation_stops_at_the_eos_it_is_given(gen, case):
    """A token the model does generate as EOS (OPT's public checkpoints end at "\\n", 50118): decoding
    stops there, with min_new_tokens holding it back, as in transformers."""
    m, image = gen, _images(1, seed=41)[0]
    prompt = "a photo of the"
    first, _, _ = _theirs(m, image, prompt, max_new_tokens=8)
    eos = first[0][2]
    options = {"greedy": dict(max_new_tokens=8), "beam3": dict(max_new_tokens=8, num_beams=3),
               "min_new_tokens": dict(max_new_tokens=8, min_new_tokens=5)}[case]
    ref, _, _ = _theirs(m, image, prompt, **{**options, "eos_token_id": eos})
    ours = m.rt._generate([image], [prompt], {**options, "eos_token_id": eos})[0]
    print("eos", eos, "transformers:", ref, "\nours:", ours)
    assert ours == ref
    if case == "greedy":
        assert ours[0][-1] == eos and len(ours[0]) <= 3
    if case == "min_new_tokens":
        assert eos not in ours[0][:5]


@torch.no_grad()
def test_blip2_model_qformer_features_match_transformers(tmp_path):
    theirs = make_checkpoint("Blip2Model", tmp_path / "ckpt", hf_config("opt", True), seed=2)
    _export(tmp_path / "ckpt", tmp_path / "bundle")
    rt = BlipRuntime.load(tmp_path / "bundle")
    images = _images(2, seed=51)
    pv = transformers.Blip2Processor.from_pretrained(tmp_path / "ckpt").image_processor(images, return_tensors="pt")
    got = rt.qformer_features(images)
    assert got.shape == (2, NUM_QUERIES, 32)
    assert_close(got, theirs.get_qformer_features(pixel_values=pv["pixel_values"]), 1e-5, "qformer_features")
    with pytest.raises(ValueError, match="does the tasks"):
        rt.image_features(images)  # Blip2Model has no ITC projections
