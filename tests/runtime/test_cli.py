"""blip-run end to end: tiny checkpoints -> blip-export -> blip-run, whose results must equal what
BlipRuntime returns for the same inputs; plus exit codes and the no-torch promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blip_runtime import cli
from blip_runtime.runtime import BlipRuntime

pytest.importorskip("torch")
pytest.importorskip("transformers")
from oracle import make_full_checkpoint  # noqa: E402

from blip_export.cli import main as export_main  # noqa: E402

ARCHS = {
    "caption": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
    "ret": "BlipForImageTextRetrieval",
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One bundle per architecture (std=0.3 so that greedy captions vary), exported once."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name, arch in ARCHS.items():
        make_full_checkpoint(arch, root / f"ckpt_{name}", std=0.3)
        assert export_main([str(root / f"ckpt_{name}"), "-o", str(root / name), "-q"]) == 0
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def runtimes(bundles):
    return {name: BlipRuntime.load(path) for name, path in bundles.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 50), (64, 30)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def run(capsys, *argv):
    """`blip-run argv` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv):
    rc, out, err = run(capsys, "--json", *argv)
    assert rc == 0, err
    doc = json.loads(out)
    assert isinstance(doc["seconds"], float) and doc["seconds"] >= 0
    assert isinstance(doc["results"], list)
    return doc


def human_lines(out, n):
    """The n result lines and a last line with the time taken."""
    lines = out.splitlines()
    assert len(lines) == n + 1, out
    assert lines[-1].endswith(" s)"), lines[-1]
    return lines[:n]


# -- results equal BlipRuntime's ------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, kwargs",
    [
        ([], {}),
        (["--prompt", "a picture of"], {"prompt": "a picture of"}),
        (["--prompt", "a picture of", "--prompt", "the", "--num-beams", "3", "--max-new-tokens", "6"],
         {"prompt": ["a picture of", "the"], "num_beams": 3, "max_new_tokens": 6}),
        (["--min-new-tokens", "4", "--max-new-tokens", "8", "--repetition-penalty", "1.5", "--num-beams", "2",
          "--length-penalty", "0.5"],
         {"min_new_tokens": 4, "max_new_tokens": 8, "repetition_penalty": 1.5, "num_beams": 2, "length_penalty": 0.5}),
        (["--sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"],
         {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3}),
    ],
)
def test_caption(capsys, bundles, runtimes, images, flags, kwargs):
    expected = runtimes["caption"].caption(images, **kwargs)
    assert len(set(expected)) > 1 or "seed" in kwargs  # varied tokens: a stub could not pass

    rc, out, err = run(capsys, bundles["caption"], "caption", *images, *flags)
    assert rc == 0, err
    assert human_lines(out, 2) == [f"{p}: {c}" for p, c in zip(images, expected)]

    doc = run_json(capsys, bundles["caption"], "caption", *images, *flags)
    assert doc["task"] == "caption" and doc["bundle"] == bundles["caption"]
    assert [r["image"] for r in doc["results"]] == images
    assert [r["caption"] for r in doc["results"]] == expected
    if "prompt" in kwargs:
        prompts = kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]] * 2
        assert [r["prompt"] for r in doc["results"]] == prompts
    assert doc["options"] == {k: v for k, v in kwargs.items() if k != "prompt"}


def test_batch_size_does_not_change_results(capsys, bundles, runtimes, images):
    expected = runtimes["caption"].caption(images, num_beams=2)
    doc = run_json(capsys, bundles["caption"], "caption", *images, "--num-beams", "2", "--batch-size", "1")
    assert [r["caption"] for r in doc["results"]] == expected


def test_global_flags_before_or_after_the_task(capsys, bundles, images):
    a = run_json(capsys, "--threads", "1", "--providers", "cpu", bundles["caption"], "caption", images[0])
    capsys.readouterr()
    assert cli.main([bundles["caption"], "caption", images[0], "--threads", "1", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["results"] == b["results"]


@pytest.mark.parametrize("questions", [["what color is it?"], ["what color is it?", "how many cats are there"]])
def test_vqa(capsys, bundles, runtimes, images, questions):
    per_image = questions * 2 if len(questions) == 1 else questions
    expected = runtimes["vqa"].answer(images, per_image)
    flags = [x for q in questions for x in ("--question", q)]

    rc, out, err = run(capsys, bundles["vqa"], "vqa", *images, *flags)
    assert rc == 0, err
    assert human_lines(out, 2) == [f"{p}: {q} -> {a}" for p, q, a in zip(images, per_image, expected)]

    doc = run_json(capsys, bundles["vqa"], "vqa", *images, *flags, "--num-beams", "2")
    assert [r["answer"] for r in doc["results"]] == runtimes["vqa"].answer(images, per_image, num_beams=2)
    assert [(r["image"], r["question"]) for r in doc["results"]] == list(zip(images, per_image))


def test_itm(capsys, bundles, runtimes, images):
    texts = ["a red circle", "two cats on a table"]
    expected = runtimes["ret"].match(images, texts)

    rc, out, err = run(capsys, bundles["ret"], "itm", *images, "--text", texts[0], "--text", texts[1])
    assert rc == 0, err
    assert human_lines(out, 2) == [f'{p}: {x:.4f}  "{t}"' for p, x, t in zip(images, expected, texts)]

    doc = run_json(capsys, bundles["ret"], "itm", *images, "-t", texts[0], "-t", texts[1])
    assert [(r["image"], r["text"]) for r in doc["results"]] == list(zip(images, texts))
    np.testing.assert_array_equal(np.float32([r["probability"] for r in doc["results"]]), expected)

    one = run_json(capsys, bundles["ret"], "itm", *images, "--text", texts[0])
    np.testing.assert_array_equal(np.float32([r["probability"] for r in one["results"]]),
                                  runtimes["ret"].match(images, texts[0]))


def test_embed(capsys, bundles, runtimes, images):
    rt = runtimes["ret"]
    texts = ["a cat", "two dogs running", "x"]
    img, txt = rt.image_features(images), rt.text_features(texts)
    sim = rt.similarity(img, txt)
    flags = [x for p in images for x in ("--image", p)] + [x for t in texts for x in ("--text", t)]

    doc = run_json(capsys, bundles["ret"], "embed", *flags)
    got_img = np.float32([r["features"] for r in doc["results"] if "image" in r])
    got_txt = np.float32([r["features"] for r in doc["results"] if "text" in r])
    assert [r.get("image", r.get("text")) for r in doc["results"]] == images + texts
    np.testing.assert_array_equal(got_img, img)
    np.testing.assert_array_equal(got_txt, txt)
    np.testing.assert_array_equal(np.float32(doc["similarity"]), sim)

    rc, out, err = run(capsys, bundles["ret"], "embed", *flags)
    assert rc == 0, err
    lines = out.splitlines()
    for path, row in zip(images, sim):  # the image x text table
        line = next(x for x in lines if x.startswith(path))
        assert line.split()[1:] == [f"{v:.4f}" for v in row]
    assert f'text 2: "{texts[1]}"' in lines

    rc, out, err = run(capsys, bundles["ret"], "embed", "--text", texts[0])  # texts only: shape and norm
    assert rc == 0, err
    assert human_lines(out, 1) == [f'"{texts[0]}": {txt.shape[1]} features, norm {np.linalg.norm(txt[0]):.4f}']
    doc = run_json(capsys, bundles["ret"], "embed", "-i", images[0])
    assert "similarity" not in doc and len(doc["results"]) == 1


# -- errors ---------------------------------------------------------------------------------------
def one_line_error(rc, out, err, *words):
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("blip-run: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_missing_bundle(capsys, tmp_path, images):
    one_line_error(*run(capsys, tmp_path / "nowhere", "caption", images[0]), str(tmp_path / "nowhere"))
    one_line_error(*run(capsys, tmp_path, "caption", images[0]), "manifest.json")  # a folder, not a bundle


def test_corrupt_graph(capsys, bundles, images, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundles["caption"], broken)
    (broken / "vision.onnx").write_bytes(b"not a protobuf")
    one_line_error(*run(capsys, broken, "caption", images[0]), str(broken / "vision.onnx"), "SHA-256", "re-export")


def test_changed_file_is_refused_unless_verify_is_off(bundles, tmp_path):
    """A file that differs from the manifest's digest stops the load with its name; verify=False
    runs it anyway (here a tokenizer.json with extra whitespace, which still parses)."""
    import shutil

    from blip_runtime.manifest import BundleError

    changed = tmp_path / "changed"
    shutil.copytree(bundles["caption"], changed)
    (changed / "tokenizer.json").write_text((changed / "tokenizer.json").read_text() + "\n")
    with pytest.raises(BundleError, match=r"tokenizer\.json: SHA-256 .* differs from the manifest"):
        BlipRuntime.load(changed)
    assert BlipRuntime.load(changed, verify=False).tasks == ["caption"]


def test_task_the_bundle_lacks(capsys, bundles, images):
    one_line_error(*run(capsys, bundles["caption"], "vqa", images[0], "-q", "what?"), "'vqa'", "caption")
    one_line_error(*run(capsys, bundles["caption"], "embed", "-t", "a cat"), "'itc'")
    one_line_error(*run(capsys, bundles["ret"], "caption", images[0]), "'caption'")


def test_unreadable_image(capsys, bundles, images, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    one_line_error(*run(capsys, bundles["caption"], "caption", images[0], junk), str(junk))
    missing = tmp_path / "missing.jpg"
    one_line_error(*run(capsys, bundles["ret"], "embed", "-i", missing), str(missing))


def test_broken_image_body(capsys, bundles, images, tmp_path):
    """A PNG whose header opens but whose data is cut: the runtime's decode reports it."""
    cut = tmp_path / "cut.png"
    cut.write_bytes(Path(images[0]).read_bytes()[:80])
    one_line_error(*run(capsys, bundles["caption"], "caption", images[0], cut), str(cut))


@pytest.mark.parametrize(
    "argv",
    [
        ["{caption}", "caption", "{img}", "--bogus"],
        ["{caption}", "caption"],  # no image
        ["{caption}", "translate", "{img}"],
        ["{caption}", "caption", "{img}", "--num-beams", "0"],
        ["{caption}", "caption", "{img}", "--top-p", "1.5", "--sample"],
        ["{caption}", "caption", "{img}", "--temperature", "0.5"],  # without --sample
        ["{caption}", "caption", "{img}", "--providers", "tpu"],
        ["{vqa}", "vqa", "{img}"],  # no question
        ["{vqa}", "vqa", "{img}", "{img}", "{img}", "-q", "a", "-q", "b"],  # 2 questions, 3 images
        ["{ret}", "itm", "{img}", "{img}", "-t", "a", "-t", "b", "-t", "c"],
        ["{ret}", "embed"],
    ],
)
def test_bad_command_line(capsys, bundles, images, argv):
    argv = [a.format(img=images[0], **bundles) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "blip-run" in capsys.readouterr().err


# -- imports --------------------------------------------------------------------------------------
def test_no_torch(bundles, images):
    """`blip-run` loads ONNX Runtime only once it runs, and never imports torch."""
    code = (
        "import sys; import blip_runtime.cli as c\n"
        "heavy = [m for m in ('onnxruntime', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        f"rc = c.main([{bundles['caption']!r}, 'caption', {images[0]!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        "assert 'onnxruntime' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["image"] == images[0]

    proc = subprocess.run([sys.executable, "-m", "blip_runtime.cli", "--help"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0 and "usage: blip-run" in proc.stdout
