"""Reliability of BlipRuntime and blip-run on bad and odd input: every bad input gets one clear
error that names the input and says what was expected (never a numpy / tokenizers / ONNX Runtime
traceback), and nothing comes back silently wrong. Table-driven: texts, generation options,
manifests and command lines (images, threads and memory: test_runtime_reliability_images.py).
Tiny bundles, exported once per module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_runtime import BlipRuntime, BundleError, cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from oracle import make_full_checkpoint  # noqa: E402

from blip_export.bundle import export_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_POSITIONS = 64  # tests/oracle.py TINY_TEXT max_position_embeddings
ARCHS = {"caption": ("BlipForConditionalGeneration", 1), "vqa": ("BlipForQuestionAnswering", 2),
         "ret": ("BlipForImageTextRetrieval", 3)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (transformers model, processor, bundle folder)}; std=0.3 so that outputs vary."""
    root = tmp_path_factory.mktemp("reliability")
    out = {}
    for name, (arch, seed) in ARCHS.items():
        model = make_full_checkpoint(arch, root / f"ckpt_{name}", seed=seed, std=0.3)
        export_bundle(root / f"ckpt_{name}", root / name)
        out[name] = (model, transformers.BlipProcessor.from_pretrained(root / f"ckpt_{name}"), root / name)
    return out


@pytest.fixture(scope="module")
def rt(models):
    return {name: BlipRuntime.load(m[2], threads=1) for name, m in models.items()}


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 5 * i, 50 - 3 * i, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, im in enumerate(images(2, seed=7)):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(im).save(paths[-1])
    return paths


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str, *words) -> None:
    assert err.count("\n") == 1 and err.startswith("blip-run: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# -- 1. positions past the decoder's table -----------------------------------------------------------
@pytest.mark.parametrize("task, text, rows, fits", [
    ("caption", None, 1, 64),
    ("caption", "a picture of the", 5, 60),  # [DEC] a picture of the
    ("vqa", "what color is it?", 1, 64),  # the answer starts from [DEC] alone
])
def test_positions_are_checked_before_running(rt, capsys, models, image_files, task, text, rows, fits):
    runtime = rt[task]
    call = runtime.caption_tokens if task == "caption" else runtime.answer_tokens
    args = (images(1), text) if task == "caption" else (images(1), text)
    # the last position that fits is used in full (min_new_tokens keeps EOS away)
    out = call(*args, max_new_tokens=fits, min_new_tokens=fits)
    assert len(out[0]) == rows + fits
    with pytest.raises(ValueError) as e:
        call(*args, max_new_tokens=fits + 1)
    msg = str(e.value)
    print(msg)
    assert f"max_new_tokens={fits + 1}" in msg and f"the model has {MAX_POSITIONS}" in msg
    assert f"max_new_tokens <= {fits}" in msg
    assert (f"a prompt of {rows} tokens" in msg) if rows > 1 else msg.startswith("[DEC] plus")

    flags = ["--prompt", text] if task == "caption" and text else ["-q", text] if task == "vqa" else []
    rc, out_, err = run(capsys, models[task][2], task, image_files[0], *flags, "--max-new-tokens", fits + 1)
    assert rc == 1 and out_ == ""
    one_line(err, f"max_new_tokens={fits + 1}", str(MAX_POSITIONS))


def test_position_limit_comes_from_the_bundle(models, tmp_path):
    """dims.max_position_embeddings when the manifest records it, else tokenizer.model_max_length."""
    bundle = copy_bundle(models["caption"][2], tmp_path / "b", _set("dims.max_position_embeddings", 20))
    runtime = BlipRuntime.load(bundle)
    assert runtime.max_positions == 20
    assert len(runtime.caption_tokens(images(1), max_new_tokens=20, min_new_tokens=20)[0]) == 21
    with pytest.raises(ValueError, match=r"max_new_tokens=21 needs 21 positions; the model has 20"):
        runtime.caption(images(1), max_new_tokens=21)
    assert BlipRuntime.load(models["caption"][2]).max_positions == MAX_POSITIONS  # from the tokenizer entry


# -- 2. several sequences per request --------------------------------------------------------------
def strip(ids, pad=0):
    ids = list(ids)
    while ids and ids[-1] == pad:
        ids.pop()
    return ids


@torch.no_grad()
def hf_generate(models, task, img, text, **gen):
    model, processor, _ = models[task]
    if task == "caption":
        out = model.generate(pixel_values=processor(images=[img], return_tensors="pt")["pixel_values"], **gen)
    else:
        enc = processor(images=[img], text=text, return_tensors="pt")
        out = model.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], **gen)
    return [strip(row) for row in out.tolist()]


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_num_return_sequences_match_transformers(models, rt, task):
    gen = dict(num_beams=3, num_return_sequences=3, max_new_tokens=10)
    imgs = images(3, seed=4)
    text = None if task == "caption" else "what shape is it?"
    call = rt[task].caption_tokens if task == "caption" else rt[task].answer_tokens
    batch = call(imgs, text, **gen) if task == "caption" else call(imgs, text, **gen)
    assert len(batch) == 3 and all(len(seqs) == 3 for seqs in batch)
    theirs = [hf_generate(models, task, img, text, **gen) for img in imgs]
    for i, (ours, ref) in enumerate(zip(batch, theirs)):
        assert ours == ref, f"{task} image {i}: ours {ours} != transformers {ref}"
        assert call([imgs[i]], text, **gen) == [ours]  # what the request gets alone
    assert len({tuple(s) for seqs in batch for s in seqs}) > 3, batch  # varied: a stub could not pass
    print(f"{task}: 3 images x 3 beams identical to transformers; lengths {[[len(s) for s in t] for t in theirs]}")
    texts = rt[task].caption(imgs, **gen) if task == "caption" else rt[task].answer(imgs, text, **gen)
    assert texts == [[models[task][1].decode(s, skip_special_tokens=True) for s in t] for t in theirs]


@pytest.mark.parametrize("gen", [dict(num_beams=3, num_return_sequences=2, max_new_tokens=8),
                                 dict(do_sample=True, num_return_sequences=3, seed=11, max_new_tokens=8),
                                 dict(do_sample=True, num_beams=2, num_return_sequences=2, seed=3, max_new_tokens=6)])
def test_each_request_gets_what_it_gets_alone(rt, gen):
    imgs = images(3, seed=9)
    prompts = ["a picture of", "the", "two red"]
    together = rt["caption"].caption(imgs, prompts, **gen)
    assert together == [rt["caption"].caption([im], p, **gen)[0] for im, p in zip(imgs, prompts)]
    answers = rt["vqa"].answer(imgs, prompts, **gen)
    assert answers == [rt["vqa"].answer([im], p, **gen)[0] for im, p in zip(imgs, prompts)]
    assert all(isinstance(a, list) and len(a) == gen["num_return_sequences"] for a in together + answers)
    assert isinstance(rt["caption"].caption(imgs[:2], max_new_tokens=4)[0], str)  # one: a flat list


def test_num_return_sequences_on_the_command_line(capsys, rt, models, image_files):
    gen = dict(num_beams=3, num_return_sequences=3)
    expected = rt["caption"].caption(image_files, **gen)
    rc, out, err = run(capsys, "--json", models["caption"][2], "caption", *image_files, "--num-beams", 3,
                       "--num-return-sequences", 3)
    assert rc == 0, err
    doc = json.loads(out)
    assert [r["captions"] for r in doc["results"]] == expected and doc["options"] == gen
    rc, out, err = run(capsys, models["vqa"][2], "vqa", *image_files, "-q", "what?", "--num-beams", 2,
                       "--num-return-sequences", 2)
    assert rc == 0, err
    answers = rt["vqa"].answer(image_files, "what?", num_beams=2, num_return_sequences=2)
    assert out.splitlines()[:4] == [f"{p} [{j + 1}]: what? -> {a[j]}" for p, a in zip(image_files, answers)
                                    for j in range(2)]


# -- 3. retrieve -----------------------------------------------------------------------------------
def test_retrieve_takes_a_string_as_one_text(rt):
    ret = rt["ret"]
    imgs = images(3)
    one = ret.retrieve(imgs, "a red circle on the left")
    assert one.shape == (3, 1)
    np.testing.assert_array_equal(one, ret.retrieve(imgs, ["a red circle on the left"]))
    texts = ["a red circle", "two blue squares", "what", "a cat"]
    np.testing.assert_allclose(ret.retrieve(imgs, texts, batch_size=1), ret.retrieve(imgs, texts), atol=1e-6)


@pytest.mark.parametrize("texts, batch_size, words", [
    ([], 16, ["texts", "at least one text"]),
    ((), 16, ["texts", "at least one text"]),
    (None, 16, ["texts", "expected a str or a list of str", "NoneType"]),
    (["ok", 3], 16, ["texts[1]", "expected a str", "int"]),
    (["ok"], 0, ["batch_size=0", "int >= 1"]),
    (["ok"], -2, ["batch_size=-2", "int >= 1"]),
    (["ok"], 1.5, ["batch_size=1.5", "int >= 1"]),
    (["ok"], True, ["batch_size=True", "int >= 1"]),
])
def test_retrieve_bad_arguments(rt, texts, batch_size, words):
    with pytest.raises(ValueError) as e:
        rt["ret"].retrieve(images(2), texts, batch_size=batch_size)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# -- 4./5. texts: types and Unicode -------------------------------------------------------------------
BAD_TEXTS = [
    ("caption", "prompt", "a \udcff cat", ["prompt[0]", "not valid Unicode", "byte 0xff", "UTF-8"]),
    ("caption", "prompt", ["fine", "lone \ud800"], ["prompt[1]", "lone surrogate U+D800"]),
    ("caption", "prompt", 123, ["prompt", "expected a str or a list of str", "int"]),
    ("caption", "prompt", ["a", "b", "c"], ["prompt: got 3 for 2 image(s)"]),
    ("vqa", "questions", None, ["questions", "expected a str or a list of str", "NoneType"]),
    ("vqa", "questions", [None, "what"], ["questions[0]", "expected a str", "NoneType"]),
    ("vqa", "questions", "what \udc80", ["questions[0]", "byte 0x80"]),
    ("vqa", "questions", [], ["questions", "at least one text"]),
    ("itm", "texts", None, ["texts", "expected a str or a list of str"]),
    ("itm", "texts", ["x\udcfe", "y"], ["texts[0]", "byte 0xfe"]),
    ("itc", "texts", "\udcc3", ["texts[0]", "not valid Unicode"]),
    ("itc", "texts", 5, ["texts", "int"]),
]


@pytest.mark.parametrize("task, name, value, words", BAD_TEXTS)
def test_bad_texts(rt, task, name, value, words):
    imgs = images(2)
    calls = {
        "caption": lambda: rt["caption"].caption(imgs, value),
        "vqa": lambda: rt["vqa"].answer(imgs, value),
        "itm": lambda: rt["ret"].match(imgs, value),
        "itc": lambda: rt["ret"].text_features(value),
    }
    with pytest.raises(ValueError) as e:
        calls[task]()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_undecodable_argv_bytes(models, image_files):
    """Bytes that are not UTF-8 in argv (Python decodes them to lone surrogates): one line naming the flag."""
    exe = [sys.executable, "-m", "blip_runtime.cli"]
    for task, flags, flag in [("caption", [b"--prompt", b"a \xff cat"], "--prompt"),
                              ("vqa", [b"-q", b"what\xc3("], "--question"),
                              ("ret", [b"--text", b"\xfe"], "--text")]:
        command = {"ret": "itm"}.get(task, task)
        proc = subprocess.run([*exe, str(models[task][2]), command, image_files[0], *flags],
                              capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                              timeout=120)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and proc.stdout == b"", err
        one_line(err, flag, "not valid Unicode", "UTF-8")


# -- 5. generation options ------------------------------------------------------------------------
BAD_OPTIONS = [
    ("num_beams", 2.5, "an int >= 1"), ("num_beams", "3", "an int >= 1"), ("num_beams", True, "an int >= 1"),
    ("num_beams", 0, "an int >= 1"), ("max_new_tokens", 1.5, "an int >= 1"), ("max_new_tokens", None, "an int"),
    ("min_new_tokens", -1, "an int >= 0"), ("min_new_tokens", 2.0, "an int >= 0"),
    ("seed", 1.5, "None or an int >= 0"), ("seed", -1, "None or an int >= 0"), ("seed", "7", "None or an int"),
    ("do_sample", "false", "True or False"), ("do_sample", 1, "True or False"), ("do_sample", None, "True or False"),
    ("temperature", "hot", "a number"), ("top_k", 2.0, "an int >= 0"), ("top_k", -1, "an int >= 0"),
    ("top_p", 0.0, "in (0, 1]"), ("top_p", "0.9", "a number in (0, 1]"),
    ("repetition_penalty", 0, "a number > 0"), ("repetition_penalty", float("inf"), "a number > 0"),
    ("length_penalty", float("nan"), "a finite number"), ("length_penalty", False, "a finite number"),
    ("early_stopping", "yes", "True, False or 'never'"), ("early_stopping", 1, "True, False or 'never'"),
    ("num_return_sequences", 1.0, "an int >= 1"), ("num_return_sequences", 2, "1 for greedy"),
    ("eos_token_id", 500, "below the vocabulary size 99"), ("eos_token_id", [], "non-empty list"),
    ("eos_token_id", 3.0, "a token id"), ("eos_token_id", [3, True], "a token id"),
    ("pad_token_id", -1, "a token id"), ("pad_token_id", 99, "below the vocabulary size 99"),
]


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("name, value, expected", BAD_OPTIONS)
def test_bad_generation_options(rt, task, name, value, expected):
    runtime = rt[task]
    with pytest.raises(ValueError) as e:
        runtime.caption(images(1), **{name: value}) if task == "caption" else runtime.answer(images(1), "q", **{name: value})
    msg = str(e.value)
    assert f"{name}=" in msg and expected in msg, msg
    assert "\n" not in msg


def test_option_types_that_are_accepted(rt):
    cap = rt["caption"]
    imgs = images(2)
    ref = cap.caption_tokens(imgs, num_beams=2, max_new_tokens=6, length_penalty=1.0)
    assert cap.caption_tokens(imgs, num_beams=np.int64(2), max_new_tokens=np.int32(6), length_penalty=1) == ref
    assert cap.caption_tokens(imgs, do_sample=np.bool_(False), num_beams=2, max_new_tokens=6) == ref
    options = cap.options(1, dict(num_beams=np.int64(2), top_p=np.float32(0.5)))
    assert type(options.num_beams) is int and type(options.top_p) is float


def test_eos_and_pad_overrides_are_honoured(rt):
    cap = rt["caption"]
    img = images(1, seed=3)
    default = cap.caption_tokens(img, max_new_tokens=12, min_new_tokens=12)[0]
    stop = default[4]  # a token the default caption generates, not at its start
    first = default.index(stop)
    got = cap.caption_tokens(img, max_new_tokens=12, eos_token_id=stop)[0]
    assert got == default[: first + 1], (default, got)
    assert cap.caption_tokens(img, max_new_tokens=12, eos_token_id=[stop, 98])[0] == got
    options = cap.options(1, {"pad_token_id": 5, "eos_token_id": 7})
    assert (options.pad_token_id, options.eos_token_id) == (5, 7)
    options = cap.options(1, {})
    assert (options.pad_token_id, options.eos_token_id) == (0, 3)  # the bundle's [PAD] and [SEP]


# -- 6. manifests ----------------------------------------------------------------------------------
def copy_bundle(src: Path, dest: Path, edit) -> Path:
    """A copy of the bundle at src whose manifest.json holds `edit(data)`."""
    shutil.copytree(src, dest)
    data = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps(edit(data)))
    return dest


def _set(path: str, value):
    def edit(root):
        *parents, last = path.split(".")
        d = root
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[last if not isinstance(d, list) else int(last)] = value
        return root
    return edit


def _drop(path: str):
    def edit(root):
        *parents, last = path.split(".")
        d = root
        for p in parents:
            d = d[p]
        del d[last]
        return root
    return edit


BAD_MANIFESTS = {
    "list": (lambda d: [], ["expected a JSON object, got a JSON list"]),
    "string": (lambda d: "manifest", ["expected a JSON object, got a JSON string"]),
    "null": (lambda d: None, ["expected a JSON object, got a JSON null"]),
    "no special_tokens": (_drop("special_tokens"), ["no 'special_tokens' entry", "expected object"]),
    "tasks string": (_set("tasks", "caption"), ["'tasks' is a JSON string", "expected list"]),
    "tasks item": (_set("tasks", [1]), ["'tasks[0]' is a JSON integer", "expected string"]),
    "family type": (_set("family", 3), ["'family' is a JSON integer", "expected string"]),
    "family value": (_set("family", "blip9"), ["family 'blip9'", "'blip'"]),
    "dims list": (_set("dims", []), ["'dims' is a JSON list", "expected object"]),
    "dims value": (_set("dims.vocab_size", "99"), ["'dims.vocab_size' is a JSON string", "expected integer"]),
    "dims missing": (_drop("dims.num_heads"), ["no 'dims.num_heads' entry"]),
    "limits value": (_set("limits.max_batch", "8"), ["'limits.max_batch'", "expected integer"]),
    "graphs list": (_set("graphs", []), ["'graphs' is a JSON list", "expected object"]),
    "graph entry": (_set("graphs.vision", "vision.onnx"), ["'graphs.vision' is a JSON string", "expected object"]),
    "graph file": (_set("graphs.vision.file", 3), ["'graphs.vision.file'", "expected string"]),
    "graph io": (_drop("graphs.cross_kv.io"), ["no 'graphs.cross_kv.io' entry"]),
    "io inputs": (_set("graphs.vision.io.inputs", {}), ["'graphs.vision.io.inputs' is a JSON object", "expected list"]),
    "io shape": (_set("graphs.vision.io.inputs.0.shape", "batch"), ["'graphs.vision.io.inputs[0].shape'", "expected list"]),
    "io axis": (_set("graphs.decoder_step.io.outputs.0.shape", [1.5]),
                ["'graphs.decoder_step.io.outputs[0].shape[0]' is a JSON number", "expected integer or string"]),
    "io dtype": (_set("graphs.vision.io.outputs.0.dtype", "float99"),
                 ["graph 'vision' tensor 'image_embeds' has dtype 'float99'", "expected one of float32"]),
    "io names": (_set("graphs.vision.io.inputs.0.name", "pixels"),
                 ["vision.onnx: the manifest lists inputs ['pixels']", "the graph has ['pixel_values']"]),
    "tokenizer": (_set("tokenizer", "tokenizer.json"), ["'tokenizer' is a JSON string"]),
    "tokenizer length": (_set("tokenizer.model_max_length", "64"), ["'tokenizer.model_max_length'", "integer or null"]),
    "image size": (_set("image.size", "big"), ["'image.size' is a JSON string", "expected object or integer or list"]),
    "image size value": (_set("image.size", {"height": 32, "width": 32, "shortest_edge": None}), None),  # loads
    "image flag": (_set("image.do_resize", "yes"), ["'image.do_resize'", "expected boolean or null"]),
    "image mean": (_set("image.image_mean", [0.5, 0.5]), ["'image'", "mean must have 3 values"]),
    "special token": (_set("special_tokens.bos_token_id", True), ["'special_tokens.bos_token_id' is a JSON boolean"]),
    "generation beams": (_set("generation.num_beams", 2.5), ["'generation.num_beams' is a JSON number", "integer"]),
    "generation sample": (_set("generation.do_sample", "false"), ["'generation.do_sample'", "expected boolean"]),
    "generation object": (_set("generation", [20]), ["'generation' is a JSON list"]),
    "format": (_set("format_version", 3), ["format_version 3", "re-export"]),
    "format 1": (_set("format_version", 1), ["format_version 1", "this runtime reads 2", "re-export"]),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifests(models, tmp_path, capsys, image_files, case):
    edit, words = BAD_MANIFESTS[case]
    bundle = copy_bundle(models["caption"][2], tmp_path / "b", edit)
    if words is None:
        assert BlipRuntime.load(bundle).tasks == ["caption"]
        return
    with pytest.raises(BundleError) as e:
        BlipRuntime.load(bundle)
    msg = str(e.value)
    assert msg.startswith(str(bundle)) and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    rc, out, err = run(capsys, "--json", bundle, "caption", image_files[0])
    assert rc == 1
    one_line(err, str(bundle), *words)
    doc = json.loads(out)
    assert doc["exit_code"] == 1 and doc["error"] == err.strip()


def test_manifests_the_exporter_writes_load(models, tmp_path):
    """Every fixture bundle (written by the current exporter) passes the schema, and so do keys a
    newer exporter may add (unknown top-level, image and dims entries)."""
    for _, _, bundle in models.values():
        BlipRuntime.load(bundle)

    def newer(d):
        d["form"] = "int8-qdq"
        d["image"]["source"] = "defaults"
        d["dims"]["max_position_embeddings"] = 64
        d["dims"]["future_dim"] = 3
        d["generation"]["unknown_option"] = "x"
        return d
    assert BlipRuntime.load(copy_bundle(models["vqa"][2], tmp_path / "n", newer)).max_positions == 64


# -- 9. blip-run: JSON failures and --version -------------------------------------------------------
BAD_COMMAND_LINES = [
    (["{caption}", "caption", "{img}", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["{caption}", "caption"], 2, "the following arguments are required: IMAGE"),
    (["{caption}", "caption", "{img}", "--num-beams", "2.5"], 2, "--num-beams: '2.5' is not a valid int"),
    (["{caption}", "caption", "{img}", "--num-return-sequences", "0"], 2, "--num-return-sequences: must be at least 1"),
    (["{caption}", "caption", "{img}", "--temperature", "0.5"], 2, "--temperature: only with --sample"),
    (["{vqa}", "vqa", "{img}"], 2, "--question"),
    (["{caption}", "caption", "{img}", "--num-return-sequences", "2"], 1, "num_return_sequences=2"),
    (["{caption}", "caption", "{img}", "--max-new-tokens", "99"], 1, "max_new_tokens <= 64"),
    (["{caption}", "vqa", "{img}", "-q", "what"], 1, "'vqa'"),
    (["{caption}/nowhere", "caption", "{img}"], 1, "no such bundle folder"),
    (["{caption}", "caption", "{caption}/manifest.json"], 1, "cannot read image"),
]


@pytest.mark.parametrize("argv, code, words", BAD_COMMAND_LINES)
def test_json_failures(capsys, models, image_files, argv, code, words):
    argv = [a.format(img=image_files[0], **{k: str(m[2]) for k, m in models.items()}) for a in argv]
    for json_flag in ([], ["--json"]):
        capsys.readouterr()
        try:
            rc = cli.main(json_flag + argv)
        except SystemExit as e:
            rc = e.code
        out, err = capsys.readouterr()
        assert rc == code, err
        assert words in err and "Traceback" not in err, err
        if json_flag:
            doc = json.loads(out)
            assert doc["exit_code"] == code and words in doc["error"], doc
        else:
            assert out == ""
        if code == 1:
            one_line(err, words)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"blip-run {version('blip-trt')}"


def test_file_names_that_are_not_utf8(capsys, models, image_files, tmp_path):
    """A file name with bytes that are not UTF-8 is a valid path: it runs, and --json stays valid
    UTF-8 with the name as \\u escapes that json.loads turns back into the same str."""
    import os

    odd = os.fsdecode(bytes(tmp_path) + b"/\xff.png")
    shutil.copy(image_files[0], odd)
    rc, out, err = run(capsys, "--json", models["caption"][2], "caption", odd)
    assert rc == 0, err
    out.encode("utf-8")
    doc = json.loads(out)
    assert doc["results"][0]["image"] == odd
    assert doc["results"][0]["caption"] == BlipRuntime.load(models["caption"][2]).caption(image_files[0])[0]
