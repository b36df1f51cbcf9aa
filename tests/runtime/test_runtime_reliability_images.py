"""Reliability of the runtime's image input and of a shared runtime: bad, odd, 16-bit and huge
images (each bad one gets one error naming it and what was expected), the pixel limit and the
reduced decode of large JPEGs, peak memory per image, threads sharing one runtime and memory over
many calls. Tiny bundles, exported once per module (fixtures from test_runtime_reliability)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_runtime import image as image_module
from blip_runtime.image import ImageSettings, load_image, preprocess

transformers = pytest.importorskip("transformers")
from test_runtime_reliability import ROOT, image_files, images, models, one_line, rt, run  # noqa: E402, F401

# -- 7./8. images ----------------------------------------------------------------------------------
def _truncated(folder: Path) -> str:
    path = folder / "cut.png"
    Image.fromarray(images(1)[0]).save(path)
    path.write_bytes(path.read_bytes()[:90])
    return str(path)


def _animated(folder: Path) -> str:
    path = folder / "anim.gif"
    frames = [Image.fromarray(im).convert("P") for im in images(3, seed=5)[:1] * 1 + images(2, seed=6)[:1]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return str(path)


def _huge(folder: Path, size=(10000, 10000), name="huge.png") -> str:
    path = folder / name
    Image.new("1", size).save(path)  # a few hundred KB on disk, size[0] * size[1] pixels decoded
    return str(path)


BAD_IMAGES = {
    "truncated": (_truncated, ["cut.png", "cannot"]),
    "junk": (lambda f: (f / "junk.jpg").write_bytes(b"not an image") and str(f / "junk.jpg"), ["junk.jpg", "cannot read"]),
    "missing": (lambda f: str(f / "missing.png"), ["missing.png", "cannot read"]),
    "huge": (_huge, ["images[1]: image file", "huge.png' has 10000x10000 pixels", "above the limit of 50 M pixels",
                     "MAX_IMAGE_PIXELS"]),
    "bomb": (lambda f: _huge(f, (20000, 10000), "bomb.png"), ["bomb.png", "too large to decode"]),
    "float array": (lambda f: np.zeros((4, 4, 3), np.float32), ["images[1]", "uint8", "float32"]),
    "empty array": (lambda f: np.zeros((0, 4, 3), np.uint8), ["images[1]", "empty"]),
    "number": (lambda f: 3, ["images[1]", "expected a file path", "int"]),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images(rt, tmp_path, capsys, models, case):
    make, words = BAD_IMAGES[case]
    bad = make(tmp_path)
    with pytest.raises(ValueError) as e:
        rt["caption"].caption([images(1)[0], bad])
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    if isinstance(bad, str):
        rc, out, err = run(capsys, "--json", models["caption"][2], "caption", bad)
        assert rc == 1 and json.loads(out)["exit_code"] == 1
        one_line(err, Path(bad).name)


def _odd(mode: str) -> Image.Image:
    rgb = Image.fromarray(images(1, seed=2)[0])
    if mode == "1x1":
        return Image.fromarray(np.full((1, 1, 3), 200, np.uint8))
    if mode == "LA":
        return rgb.convert("RGBA").convert("LA")
    return rgb.convert(mode)


@pytest.mark.parametrize("kind", ["P", "LA", "CMYK", "1", "1x1", "animated"])
def test_odd_images_match_transformers(rt, tmp_path, models, kind):
    """Odd modes, a 1x1 image and an animated GIF (its first frame), as PIL objects and as files."""
    processor = models["caption"][1].image_processor
    if kind == "animated":
        path = _animated(tmp_path)
        inputs = [path, Image.open(path)]
    else:
        im = _odd(kind)
        path = str(tmp_path / f"odd.{'jpg' if kind == 'CMYK' else 'png'}")
        im.save(path)
        inputs = [im, path]
    for x in inputs:
        ours = rt["caption"].pixels([x])
        ref = processor(x if not isinstance(x, str) else transformers.image_utils.load_image(x),
                        return_tensors="np")["pixel_values"]
        err = float(np.abs(ours - ref).max())
        print(f"{kind} {type(x).__name__}: max abs error {err:.2e}")
        assert err <= 1e-5
        assert isinstance(rt["caption"].caption([x], max_new_tokens=4)[0], str)


def test_16_bit_and_float_images_are_scaled(tmp_path):
    """I;16 / I / F data scaled to 8 bits (transformers clips them: a 16-bit photo goes white)."""
    ramp16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    expected = np.rint(ramp16 / 257.0).astype(np.uint8)
    cases = {
        "I;16": (Image.fromarray(ramp16), expected),
        "I 16-bit": (Image.fromarray(ramp16.astype(np.int32)), expected),
        "I 8-bit": (Image.fromarray(expected.astype(np.int32)), expected),
        "F [0, 1]": (Image.fromarray((ramp16 / 65535.0).astype(np.float32)), expected),
        "F [0, 255]": (Image.fromarray(expected.astype(np.float32)), expected),
        "F stretched": (Image.fromarray((ramp16 / 65535.0 * 2000 - 1000).astype(np.float32)), expected),
    }
    settings = ImageSettings(size=(32, 32))
    for name, (im, gray) in cases.items():
        ours = preprocess([im], settings)
        ref = preprocess([Image.fromarray(gray, "L")], settings)
        err = float(np.abs(ours - ref).max())
        assert err <= 1 / 255 / 0.26 + 1e-6, f"{name}: max abs error {err:.3g} against the scaled 8-bit image"
    path = tmp_path / "g16.png"
    Image.fromarray(ramp16).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (48, 64, 3) and abs(float(loaded.mean()) - float(expected.mean())) < 0.5
    assert loaded.mean() < 200, "a 16-bit ramp must not come out white"


def test_16_bit_files_through_the_runtime_and_cli(rt, models, capsys, tmp_path):
    """A 16-bit PNG file runs as its 8-bit scaling, in the API and in blip-run (not as white)."""
    data = np.random.default_rng(1).integers(0, 65536, (40, 50), dtype=np.uint16)
    path = tmp_path / "photo16.png"
    Image.fromarray(data).save(path)
    scaled = Image.fromarray(np.rint(data / 257.0).astype(np.uint8), "L")
    np.testing.assert_array_equal(rt["caption"].pixels([str(path)]), rt["caption"].pixels([scaled]))
    assert not np.array_equal(rt["caption"].pixels([str(path)]), rt["caption"].pixels([Image.new("L", (50, 40), 255)]))
    rc, out, err = run(capsys, "--json", models["caption"][2], "caption", path)
    assert rc == 0, err
    assert json.loads(out)["results"][0]["caption"] == rt["caption"].caption([scaled])[0]


def test_pixel_limit_is_configurable(monkeypatch, tmp_path):
    im = Image.fromarray(images(1)[0])  # 50 x 40 = 2000 pixels
    path = tmp_path / "small.png"
    im.save(path)
    for given in (im, str(path), np.asarray(im)):
        with pytest.raises(ValueError, match=r"images\[0\]: .*50x40 pixels .* above the limit"):
            preprocess([given], ImageSettings(max_image_pixels=1999))
        preprocess([given], ImageSettings(max_image_pixels=2000))
    with pytest.raises(ValueError, match=r"image: image file .*small.png' has 50x40 pixels"):
        load_image(path, max_image_pixels=100)
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"above the limit of 0.001 M pixels"):
        preprocess([im])


def test_large_jpegs_decode_reduced(monkeypatch, tmp_path):
    """A JPEG above the limit decodes by DCT scaling to >= DRAFT_MARGIN x the model's size per side;
    the resized result stays within what the module documents against a full decode."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float32)
    photo = np.stack([128 + 100 * np.sin(xx / 80 + c) * np.cos(yy / 60 - c) for c in range(3)], -1)
    photo += rng.normal(0, 12, photo.shape)
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, quality=90)
    settings = ImageSettings(size=(96, 96))
    full = preprocess([str(path)], settings)
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 1_000_000)  # 1600 x 1200 is above it
    reduced = preprocess([str(path)], settings)
    levels = np.abs(reduced - full) * 255 * min(settings.std)
    print(f"draft vs full decode: max {levels.max():.2f} grey levels, mean {levels.mean():.3f}")
    assert levels.max() <= 2.5 and levels.mean() < 0.5
    with Image.open(path) as im:
        im.draft(im.mode, (96 * image_module.DRAFT_MARGIN, 96 * image_module.DRAFT_MARGIN))
        assert im.size == (400, 300)  # 1/4: the smallest with both sides >= 2 x 96
    with pytest.raises(ValueError, match=r"image: image file .*photo.jpg' has 1600x1200 pixels"):
        load_image(path)  # 384 x 384 needs both sides >= 768: no reduction fits the limit
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 10_000)  # still above it after 1/8: refused
    with pytest.raises(ValueError, match=r"images\[0\]: image file .*photo.jpg' \(a 1600x1200 JPEG, decoded "
                                         r"reduced\) has 400x300 pixels"):
        preprocess([str(path)], settings)


RSS_SCRIPT = """
import resource, sys
import numpy as np
from PIL import Image
from blip_runtime.image import preprocess
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
preprocess([np.zeros((64, 64, 3), np.uint8)])  # imports and first-call allocations
before = peak()
try:
    preprocess([sys.argv[1]])
    outcome = "ok"
except ValueError as e:
    outcome = str(e)
print(peak() - before, outcome)
"""


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_memory_per_image_is_bounded(tmp_path):
    """Peak RSS of a fresh process for one image: a 10000x10000 PNG is refused before decoding; a
    63 M pixel JPEG decodes reduced (a full RGB decode alone would be 189 MB)."""
    big_jpeg = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)).resize(
        (9000, 7000), Image.Resampling.BILINEAR).save(big_jpeg, quality=85)
    cases = {"png": (_huge(tmp_path), "above the limit", 20e6), "jpeg": (str(big_jpeg), "ok", 60e6)}
    for name, (path, outcome, bound) in cases.items():
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        grown, result = proc.stdout.split(" ", 1)
        print(f"{name}: peak RSS grew by {int(grown) / 1e6:.1f} MB ({result.strip()[:60]})")
        assert outcome in result and int(grown) < bound


# -- kept as tests: threads, memory over many calls --------------------------------------------------
def test_threads_share_one_runtime(rt):
    """8 threads on one runtime give what serial calls give (captions with prompts, beams and
    sampling, VQA, ITM and ITC)."""
    imgs = images(8, seed=13)
    jobs = []
    for i, im in enumerate(imgs):
        jobs.append(("caption", lambda im=im, i=i: rt["caption"].caption([im], "a picture of " * (i % 3),
                                                                         num_beams=1 + i % 3, max_new_tokens=8)))
        jobs.append(("sample", lambda im=im, i=i: rt["caption"].caption([im], do_sample=True, seed=i, max_new_tokens=8)))
        jobs.append(("vqa", lambda im=im, i=i: rt["vqa"].answer([im, imgs[-1]], ["what is it", "two"][: 1 + i % 2] * (2 - i % 2))))
        # texts longer than the 64 positions: truncation (set per call on the shared tokenizer) must hold
        jobs.append(("itm", lambda im=im, i=i: rt["ret"].match([im], "a red circle " * (10 + 10 * i))))
        jobs.append(("itc", lambda i=i: rt["ret"].text_features(["a blue square"] * (1 + i) + ["x y " * 50])))
    serial = [f() for _, f in jobs]
    barrier = threading.Barrier(8)

    def work(k):
        barrier.wait()
        return [jobs[j][1]() for j in range(k, len(jobs), 8)]

    for _ in range(3):  # races show only now and then (without the tokenizer's lock: 4 of 240 ITM calls)
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(work, range(8)))
        for k, results in enumerate(parallel):
            for j, got in zip(range(k, len(jobs), 8), results):
                want = serial[j]
                if isinstance(want, np.ndarray):
                    np.testing.assert_array_equal(got, want, err_msg=jobs[j][0])
                else:
                    assert got == want, (jobs[j][0], got, want)


def test_rss_flat_over_many_calls(rt):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    imgs = images(2, seed=17)

    def calls(n):
        for i in range(n):
            rt["caption"].caption(imgs, "a picture of", num_beams=1 + i % 2, max_new_tokens=6)
            rt["ret"].match(imgs, "two")

    calls(50)  # warm-up: allocator pools and ONNX Runtime arenas settle
    before = process.memory_info().rss
    calls(300)
    grown = process.memory_info().rss - before
    print(f"RSS grew by {grown / 1e6:.2f} MB over 300 calls")
    assert grown < 15e6
