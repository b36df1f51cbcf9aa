"""blip_runtime.families.blip2.processor against transformers 5's Blip2Processor, for tiny OPT
(byte-level BPE) and Flan-T5 (Unigram) tokenizers trained here, saved by transformers itself
(`Blip2Processor.save_pretrained`, or tokenizer and image processor on their own for the older
folder layout without `<image>` and with preprocessor_config.json), and loaded back from the folder."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip_runtime.families.blip2.processor import Blip2Processor, Blip2TextProcessor, Blip2TextSettings
from tiny_lm_tokenizers import opt_tokenizer, t5_sentencepiece_tokenizer, t5_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers import Blip2Processor as HFBlip2Processor  # noqa: E402
from transformers import BlipImageProcessorPil, GPT2TokenizerFast  # noqa: E402

NQ = 4  # num_query_tokens
IMAGE_KW = dict(size={"height": 40, "width": 48}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])

TEXTS = [
    "Question: what is in the photo? Answer:",
    "Café naïve über déjà vu — straße",  # accents (OPT: bytes; T5: pieces or <unk>)
    "你好世界 猫 🙂🐈 emoji and CJK",  # CJK and emoji, some unseen in training
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew lines,  double  spaces",
    "ﬁne ① ＦＵＬＬ width ½ — NFKC at work",  # changed by the SentencePiece normalizer only
    "literal <image> and </s> and <pad> in the text",  # parsed as the added tokens, as transformers does
    "the cat is sitting on the table " * 10,  # long: cut by the max_lengths below
]
MAX_LENGTHS = [None, NQ + 3, 12, 40]


def _save(folder, tok, layout: str):
    if layout == "processor":  # transformers 5: one processor_config.json, <image> in tokenizer.json
        HFBlip2Processor(BlipImageProcessorPil(**IMAGE_KW), tok, num_query_tokens=NQ).save_pretrained(folder)
    else:  # older layout: no <image> in tokenizer.json, preprocessor_config.json
        tok.save_pretrained(folder)
        BlipImageProcessorPil(**IMAGE_KW).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    # clean_up_tokenization_spaces=True: transformers applies it to T5 and skips it for BPE (OPT).
    out = {
        "opt": _save(tmp_path_factory.mktemp("opt"), opt_tokenizer(clean_up_tokenization_spaces=True), "processor"),
        "t5": _save(tmp_path_factory.mktemp("t5"), t5_tokenizer(clean_up_tokenization_spaces=True), "processor"),
        "opt_old": _save(tmp_path_factory.mktemp("opt_old"), opt_tokenizer(), "separate"),
        "t5_old": _save(tmp_path_factory.mktemp("t5_old"), t5_tokenizer(), "separate"),
        # padding_side / truncation_side saved in tokenizer_config.json
        "opt_left": _save(tmp_path_factory.mktemp("opt_left"),
                          opt_tokenizer(padding_side="left", truncation_side="left"), "processor"),
    }
    try:
        import sentencepiece  # noqa: F401
    except ImportError:  # not a test dependency of the project: the "t5_spm" cases skip
        return out
    spm_dir = tmp_path_factory.mktemp("spm")
    out["t5_spm"] = _save(tmp_path_factory.mktemp("t5_spm"), t5_sentencepiece_tokenizer(spm_dir), "processor")
    return out


def _pair(folders, name, legacy=False):
    """(transformers processor, ours); legacy: num_query_tokens None / image_token_index None."""
    if name not in folders:
        pytest.skip(f"{name}: needs the sentencepiece package")
    hf = HFBlip2Processor.from_pretrained(folders[name], num_query_tokens=None if legacy else NQ)
    image_token_index = None if legacy else hf.tokenizer.convert_tokens_to_ids("<image>")
    return hf, Blip2Processor.from_folder(folders[name], num_query_tokens=NQ, image_token_index=image_token_index)


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (17 + 5 * i, 23 + 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _check(ours, ref, what):
    for name, a, b in zip(("input_ids", "attention_mask"), ours, ref):
        b = np.asarray(b)
        assert a.dtype == np.int64 and a.shape == b.shape, (
            f"{what} {name}: {a.dtype} {a.shape} vs {b.shape}\nours {a.tolist()}\nref  {b.tolist()}")
        err = int(np.abs(a - b).max()) if a.size else 0
        assert err == 0, f"{what} {name}: max abs err {err}\nours {a.tolist()}\nref  {b.tolist()}"


def _ref(hf, texts, max_length, side, images=True):
    kw = dict(padding="longest", padding_side=side, return_tensors="np")
    if max_length is not None:
        kw.update(truncation=True, max_length=max_length)
    enc = hf(images=_images(len(texts)) if images else None, text=texts, **kw)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("name", ["opt", "t5", "opt_old", "t5_old", "opt_left", "t5_spm"])
def test_tokenizer_json_is_what_transformers_runs(folders, name):
    # We run tokenizer.json's pipeline as written; transformers' GPT2Tokenizer / T5Tokenizer rebuild
    # theirs on load: for files transformers wrote, the rebuilt one must be the same.
    hf, ours = _pair(folders, name)
    mem = json.loads(hf.tokenizer.backend_tokenizer.to_str())
    disk = json.loads(ours.text._tok.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert mem[key] == disk[key], f"{name} {key}:\ntransformers {mem[key]}\nours {disk[key]}"


@pytest.mark.parametrize("name", ["opt", "t5", "opt_old", "t5_old", "t5_spm"])
def test_special_ids(folders, name):
    hf, ours = _pair(folders, name)
    t, h = ours.text, hf.tokenizer
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id) == (
        h.bos_token_id, h.eos_token_id, h.pad_token_id, h.unk_token_id)
    want = {"opt": (2, 2, 1, 3), "t5": (None, 1, 0, 2)}[name.split("_")[0]]
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id) == want
    assert t.image_token_id == h.convert_tokens_to_ids("<image>") == len(h) - 1  # added last, in both layouts
    assert t.vocab_size == len(h) and t.kind == {"opt": "bpe", "t5": "unigram"}[name.split("_")[0]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["opt", "t5", "opt_old", "t5_old", "opt_left", "t5_spm"])
def test_encode_with_image_tokens(folders, name, side):
    hf, ours = _pair(folders, name)
    for max_length in MAX_LENGTHS:
        what = f"{name} {side} max_length={max_length}"
        _check(ours.text.encode(TEXTS, max_length=max_length, padding_side=side),
               _ref(hf, TEXTS, max_length, side), what)
        for t in TEXTS:
            _check(ours.text.encode([t], max_length=max_length, padding_side=side),
                   _ref(hf, [t], max_length, side), f"{what} {t[:20]!r}")
    ids, mask = ours.text.encode(TEXTS[:4], padding_side=side)
    assert (ids[:, :NQ] == ours.text.image_token_id).all() and (mask[:, :NQ] == 1).all()
    if side == "left" and name.startswith("opt"):  # pads between the image tokens and the bos
        row = ids[3]  # "" -> <image> x4, pads, </s>
        assert row[-1] == 2 and (row[NQ:-1] == 1).all() and mask[3, NQ:-1].sum() == 0


@pytest.mark.parametrize("name", ["opt", "t5", "opt_left"])
def test_default_padding_side_and_text_only_call(folders, name):
    hf, ours = _pair(folders, name)
    side = "left" if name == "opt_left" else "right"
    assert hf.tokenizer.padding_side == ours.text.settings.padding_side == side
    assert hf.tokenizer.truncation_side == ours.text.settings.truncation_side == side
    for max_length in MAX_LENGTHS:
        _check(ours.text.encode(TEXTS, max_length=max_length), _ref(hf, TEXTS, max_length, None),
               f"{name} default sides max_length={max_length}")
    # Blip2Processor without images: no image tokens, but max_length still less num_query_tokens.
    _check(ours.text.encode(TEXTS, max_length=12, image_tokens=False),
           _ref(hf, TEXTS, 12, None, images=False), f"{name} text only")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["opt", "t5", "opt_old"])
def test_encode_legacy_convention(folders, name, side):
    hf, ours = _pair(folders, name, legacy=True)
    assert hf.num_query_tokens is None and not ours.text.settings.image_tokens
    _check(ours.text.encode(TEXTS, padding_side=side), _ref(hf, TEXTS, None, side), f"{name} legacy {side}")
    # With a max_length, Blip2Processor fails (max_length - None): the tokenizer alone is the reference.
    for max_length in (3, 12):
        ref = hf.tokenizer(TEXTS, padding="longest", padding_side=side, truncation=True, max_length=max_length,
                           return_tensors="np")
        _check(ours.text.encode(TEXTS, max_length=max_length, padding_side=side),
               (ref["input_ids"], ref["attention_mask"]), f"{name} legacy {side} max_length={max_length}")


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_padding_max_length(folders, name):
    hf, ours = _pair(folders, name)
    for side in ("left", "right"):
        ref = hf(images=_images(3), text=TEXTS[:3], padding="max_length", truncation=True, max_length=20,
                 padding_side=side, return_tensors="np")
        _check(ours.text.encode(TEXTS[:3], max_length=20, padding="max_length", padding_side=side),
               (ref["input_ids"], ref["attention_mask"]), f"{name} padding=max_length {side}")


def test_add_bos_token_flag_rebuilds_post_processor(folders, tmp_path):
    # A checkpoint whose tokenizer_config says add_bos_token / add_eos_token: transformers replaces
    # tokenizer.json's post-processor by [bos] $A [eos]. Same files, flags given to both sides.
    _save(tmp_path, opt_tokenizer(add_bos_token=False), "processor")
    base = Blip2TextProcessor.from_folder(tmp_path, NQ, None).settings
    for bos, eos in [(True, False), (False, True), (True, True), (False, False)]:
        tok = GPT2TokenizerFast.from_pretrained(tmp_path, add_bos_token=bos, add_eos_token=eos)
        hf = HFBlip2Processor(BlipImageProcessorPil(**IMAGE_KW), tok, num_query_tokens=NQ)
        settings = dataclasses.replace(base, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                       add_bos_token=bos, add_eos_token=eos)
        ours = Blip2TextProcessor.from_file(tmp_path / "tokenizer.json", settings)
        for max_length in (None, NQ + 3):
            _check(ours.encode(TEXTS, max_length=max_length), _ref(hf, TEXTS, max_length, "right"),
                   f"add_bos_token={bos} add_eos_token={eos} max_length={max_length}")


@pytest.mark.parametrize("name", ["opt_left", "t5"])
def test_settings_travel_as_json(folders, name):
    # A bundle carries tokenizer.json plus the settings as JSON: the same processor comes back.
    hf, ours = _pair(folders, name)
    settings = Blip2TextSettings.from_dict(json.loads(json.dumps(ours.text.settings.to_dict())))
    assert settings == ours.text.settings
    again = Blip2TextProcessor.from_file(folders[name] / "tokenizer.json", settings)
    for max_length in MAX_LENGTHS:
        _check(again.encode(TEXTS, max_length=max_length), _ref(hf, TEXTS, max_length, None), f"{name} {max_length}")
    cases = _decode_cases(ours)
    assert again.batch_decode(cases) == hf.batch_decode(cases, skip_special_tokens=True)


def _decode_cases(ours, seed=0):
    t = ours.text
    rng = np.random.default_rng(seed)
    ids, _ = t.encode(TEXTS, max_length=30, padding_side="left")  # image tokens, pads, bos
    cases = [list(r) for r in ids]
    specials = [x for x in (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id) if x is not None]
    start = t.pad_token_id if t.kind == "unigram" else t.bos_token_id  # T5's decoder starts from <pad>
    for n in (0, 1, 5, 17):  # generated sequences: start, tokens, eos, pads after it
        body = rng.integers(0, t.vocab_size, n).tolist()
        cases.append([start, *body, t.eos_token_id, t.pad_token_id, t.pad_token_id])
    cases.append(rng.choice(specials + [t.image_token_id], 12).tolist())  # specials only
    cases.append(rng.integers(0, t.vocab_size, 40).tolist())
    cases.append([t.eos_token_id, *rng.integers(0, t.vocab_size, 6).tolist(), t.vocab_size + 5])  # past the vocab
    cases.append([])
    return cases


@pytest.mark.parametrize("name", ["opt", "t5", "opt_old", "t5_old", "t5_spm"])
def test_decode_matches_processor(folders, name):
    hf, ours = _pair(folders, name)
    cases = _decode_cases(ours)
    assert ours.text.batch_decode(cases) == hf.batch_decode(cases, skip_special_tokens=True)
    for ids in cases:
        for skip in (True, False):
            assert ours.text.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), f"{name} {ids} skip={skip}"
    arr = np.asarray(cases[:8], dtype=np.int64)  # rows of equal width, as generate returns them
    assert ours.text.batch_decode(arr) == hf.batch_decode(arr, skip_special_tokens=True)


def test_clean_up_applies_to_unigram_only(folders):
    # " ." -> "." when decoding T5 with clean_up_tokenization_spaces; OPT's BPE keeps the text.
    for name, cleaned in (("t5", True), ("opt", False)):
        hf, ours = _pair(folders, name)
        assert ours.text.settings.clean_up_tokenization_spaces and ours.text.clean_up == cleaned
        ids = ours.text.encode(["a cat . is it ? yes , it is !"], image_tokens=False)[0][0]
        raw = ours.text._tok.decode(ids.tolist(), skip_special_tokens=True)
        assert (ours.text.decode(ids) != raw) == cleaned
        assert ours.text.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["opt", "t5_old"])
def test_pixel_values_match_processor(folders, name):
    hf, ours = _pair(folders, name)
    assert ours.image.size == (40, 48) and ours.image.mean == (0.5, 0.4, 0.3)
    images = _images(3) + [Image.fromarray(np.full((9, 60, 4), 200, np.uint8), "RGBA")]
    texts = ["a", "bb", "", "describe the image"]
    ref = hf(images=images, text=texts, padding="longest", return_tensors="np")
    got = ours(images, texts)
    assert set(got) == set(ref) == {"pixel_values", "input_ids", "attention_mask"}
    a, b = got["pixel_values"], ref["pixel_values"]
    err = float(np.abs(a - b).max())
    print(f"{name} pixel_values max abs err {err:.3g}, rel {err / float(np.abs(b).max()):.3g}")
    assert a.dtype == np.float32 and a.shape == b.shape == (4, 3, 40, 48) and err == 0
    _check((got["input_ids"], got["attention_mask"]), (ref["input_ids"], ref["attention_mask"]), name)


def test_bad_input(folders):
    _, ours = _pair(folders, "opt")
    t = ours.text
    cases = [
        (lambda: t.encode([]), "texts must be a non-empty list of str"),
        (lambda: t.encode("a cat"), "texts must be a non-empty list of str"),
        (lambda: t.encode(["a", 3]), r"texts\[1\] must be a str, got int"),
        (lambda: t.encode(["ok", "bad \ud800 text"]),
         r"texts\[1\]: not valid Unicode text \(lone surrogate U\+D800 at index 4\)"),
        (lambda: t.encode(["a"], max_length=NQ), r"max_length must be >= 5 \(num_query_tokens 4 \+ 1 text token"),
        (lambda: t.encode(["a"], max_length=7.0), "max_length must be an int"),
        (lambda: t.encode(["a"], padding_side="middle"), "padding_side must be"),
        (lambda: t.encode(["a"], padding="do_not_pad"), "padding must be"),
        (lambda: t.encode(["a"], padding="max_length"), "needs max_length"),
        (lambda: t.decode([[1, 2]]), "ids must be a 1-D sequence of ints"),
        (lambda: t.decode([1.5]), "ids must be a 1-D sequence of ints"),
        (lambda: t.decode([3, -1]), "ids must be >= 0"),
        (lambda: t.batch_decode(np.zeros(3, np.int64)), r"ids must be \[B, S\]"),
        (lambda: ours([_images(1)[0]], ["a", "b"]), "one image per text"),
        (lambda: Blip2Processor.from_folder(folders["opt"], NQ, t.image_token_id + 1), "image_token_index"),
        (lambda: Blip2Processor.from_folder(folders["opt"], NQ + 1, t.image_token_id),
         "num_query_tokens 5 .* differs"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_missing_files(folders, tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer file .*tokenizer.json"):
        Blip2TextProcessor.from_folder(tmp_path, NQ, None)
    shutil.copy(folders["opt"] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no processor_config.json with an image_processor, nor preprocessor_config.json"):
        Blip2Processor.from_folder(tmp_path, NQ, None)
    # tokenizer.json alone: no named specials, so no pad id; equal lengths still encode.
    alone = Blip2TextProcessor.from_folder(tmp_path, NQ, None)
    assert alone.pad_token_id is None and alone.encode(["a", "b"])[0].shape == (2, 2)
    with pytest.raises(ValueError, match="texts of different lengths need a pad_token"):
        alone.encode(["a", "a cat"])


def test_tokenizer_class_must_match_model(folders, tmp_path):
    # An OPT tokenizer_config.json (GPT2Tokenizer) beside a T5 tokenizer.json, both written by transformers.
    shutil.copytree(folders["t5"], tmp_path, dirs_exist_ok=True)
    shutil.copy(folders["opt"] / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="tokenizer_class GPT2Tokenizer needs a BPE tokenizer.json, found Unigram"):
        Blip2TextProcessor.from_folder(tmp_path, NQ, None)


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, blip_runtime.families.blip2.processor; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_generated_sequences_of_a_tiny_blip2(tmp_path, lm):
    # A re-randomized Blip2ForConditionalGeneration saved with its processor (tests/blip2_oracle.py):
    # our feeds, built from config.json's values as the runtime builds them, drive transformers'
    # generate; its output (image tokens and pads included for OPT) decodes alike.
    torch = pytest.importorskip("torch")
    from blip2_oracle import hf_config, make_checkpoint

    model = make_checkpoint("Blip2ForConditionalGeneration", tmp_path, hf_config(lm, True), seed=3, std=0.1)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = Blip2Processor.from_folder(tmp_path, config["num_query_tokens"], config["image_token_index"])
    hf = HFBlip2Processor.from_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 41, 3), dtype=np.uint8)) for i in range(3)]
    texts = ["a photo of", "", "question: what color is the square? answer:"]
    side = "left" if lm == "opt" else "right"  # decoder-only generation pads on the left
    feeds = ours(images, texts, padding_side=side)
    ref = hf(images=images, text=texts, padding="longest", padding_side=side, return_tensors="np")
    _check((feeds["input_ids"], feeds["attention_mask"]), (ref["input_ids"], ref["attention_mask"]), lm)
    assert np.array_equal(feeds["pixel_values"], ref["pixel_values"])
    torch.manual_seed(0)  # sampling at a high temperature: a random model's greedy output repeats one token
    with torch.no_grad():
        out = model.generate(**{k: torch.from_numpy(v) for k, v in feeds.items()}, max_new_tokens=12,
                             do_sample=True, top_k=0, temperature=3.0).numpy()
    if lm == "opt":  # decoder-only: the prompt comes back in front of the new tokens
        assert (out[:, :NQ] == config["image_token_index"]).all()
    texts_out = ours.text.batch_decode(out)
    assert len(set(out[:, -12:].ravel().tolist())) > 12, "generation must vary for the comparison to mean anything"
    assert texts_out == hf.batch_decode(out, skip_special_tokens=True)
    assert [ours.text.decode(r, False) for r in out] == [hf.decode(r, skip_special_tokens=False) for r in out]
