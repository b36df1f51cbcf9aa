"""blip_runtime.image against transformers' BLIP image processor (the PIL backend, which is what
`BlipImageProcessor()` resolves to without torchvision; see the module docstring for the other)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_runtime.image import ImageSettings, load_image, preprocess

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the "falling back to BlipImageProcessorPil" notice
from transformers import BlipImageProcessor, BlipImageProcessorPil  # noqa: E402

TOL = 1e-5
SIZES = [(37, 91), (500, 333), (1, 1)]  # (height, width)
BLIP2 = dict(size={"height": 224, "width": 224})


def _image(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    """Noise over a gradient, in `mode`; alpha and 16-bit/int/float ranges are exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 // max(h - 1, 1) + xx * 255 // max(w - 1, 1)) // 2
    rgb = np.clip(base[..., None] + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    if mode == "I;16":  # full 16-bit range: PIL clips to 255 on the way to RGB
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":  # negative and > 255 values
        return Image.fromarray(rng.integers(-300, 600, (h, w), dtype=np.int32))
    if mode == "F":  # fractions, negatives and > 255
        return Image.fromarray(rng.normal(128, 120, (h, w)).astype(np.float32))
    if mode in ("RGBA", "LA", "PA"):
        rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
        return Image.fromarray(rgba).convert(mode)
    if mode == "P+transparency":
        p = im.convert("P")
        p.info["transparency"] = int(np.asarray(p)[0, 0])  # at least one pixel is transparent
        return p
    return im.convert(mode)


MODES = ["L", "RGB", "RGBA", "LA", "P", "P+transparency", "PA", "CMYK", "I;16", "I", "F", "1",
         "YCbCr", "LAB"]
HIGH_DEPTH = ["I;16", "I", "F"]  # scaled to 8 bits where transformers clips: a deliberate difference
EXACT_MODES = [m for m in MODES if m not in HIGH_DEPTH]


def _err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _ref(proc, images) -> np.ndarray:
    return proc(images, return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module")
def procs():
    return {"blip-384": BlipImageProcessorPil(), "blip2-224": BlipImageProcessorPil(**BLIP2)}


def test_modes_and_sizes_match_transformers(procs):
    worst = {}
    for name, proc in procs.items():
        settings = ImageSettings.from_preprocessor_config(proc.to_dict())
        for mode in EXACT_MODES:
            for h, w in SIZES:
                im = _image(mode, h, w)
                ours = preprocess([im], settings)
                assert ours.dtype == np.float32 and ours.shape == (1, 3, *settings.size)
                err = _err(ours, _ref(proc, im))
                worst[(name, mode)] = max(worst.get((name, mode), 0.0), err)
                assert err <= TOL, f"{name} mode {mode} {h}x{w}: max abs err {err:.3g}"
    print("max abs err per (settings, mode):", {f"{k[0]}/{k[1]}": v for k, v in worst.items()})


def test_default_processor_class(procs):
    """`BlipImageProcessor()` here: the PIL fallback, matched exactly. With torchvision installed it
    is the torchvision backend, whose antialiased bicubic is not bit-identical to PIL's."""
    proc = BlipImageProcessor()
    if proc.backend != "pil":
        pytest.skip(f"BlipImageProcessor() uses the {proc.backend} backend here; we follow the PIL one")
    im = _image("RGBA", 500, 333)
    err = _err(preprocess([im], ImageSettings()), _ref(proc, im))
    assert err <= TOL, f"max abs err {err:.3g}"


def test_batch_of_mixed_inputs(procs):
    proc = procs["blip-384"]
    images = [_image(m, h, w, seed=i) for i, (m, (h, w)) in enumerate(zip(EXACT_MODES, SIZES * 5))]
    ours = preprocess(images, ImageSettings())
    err = _err(ours, _ref(proc, images))
    assert ours.shape == (len(images), 3, 384, 384) and err <= TOL, f"max abs err {err:.3g}"


def test_numpy_inputs(procs):
    proc = procs["blip-384"]
    rgb = np.asarray(_image("RGB", 37, 91))
    err = _err(preprocess([rgb]), _ref(proc, rgb))
    assert err <= TOL, f"HxWx3 array: max abs err {err:.3g}"
    # transformers cannot take an (H, W) array (it reads it as a list of rows); we treat it as "L".
    gray = np.asarray(_image("L", 37, 91))
    err = _err(preprocess([gray]), _ref(proc, Image.fromarray(gray, "L")))
    assert err <= TOL, f"HxW array vs mode L: max abs err {err:.3g}"
    strided = np.asarray(_image("RGB", 80, 60))[::2, ::3]  # non-contiguous view
    err = _err(preprocess([strided]), _ref(proc, np.ascontiguousarray(strided)))
    assert err <= TOL, f"strided array: max abs err {err:.3g}"


def test_paths_follow_transformers_load_image(procs, tmp_path):
    """A path is decoded, EXIF-transposed and converted to RGB *without* white compositing."""
    proc = procs["blip-384"]
    png = tmp_path / "rgba.png"
    _image("RGBA", 37, 91).save(png)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    _image("RGB", 37, 91).save(jpg, exif=exif, quality=95)
    for path in (png, jpg):
        ref = _ref(proc, str(path))
        for given in (str(path), path):
            err = _err(preprocess([given]), ref)
            assert err <= TOL, f"{path.name} as {type(given).__name__}: max abs err {err:.3g}"
    assert load_image(jpg).size == (37, 91)  # (width, height): transposed from 91x37
    assert load_image(png).mode == "RGB"


@pytest.mark.parametrize("kwargs", [
    dict(resample=2),  # bilinear
    dict(rescale_factor=1 / 127.5, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    dict(do_normalize=False),
    dict(do_rescale=False),
    dict(do_resize=False),
    dict(size={"height": 96, "width": 160}),
])
def test_settings_variants(kwargs, tmp_path):
    proc = BlipImageProcessorPil(**kwargs)
    proc.save_pretrained(tmp_path)  # read the settings back as a checkpoint folder would give them
    d = json.loads((tmp_path / "preprocessor_config.json").read_text())
    settings = ImageSettings.from_preprocessor_config(d)
    images = [_image("RGBA", 50, 70, seed=1), _image("L", 50, 70, seed=2)]
    err = _err(preprocess(images, settings), _ref(proc, images).astype(np.float32))
    assert err <= TOL, f"{kwargs}: max abs err {err:.3g}"


def test_settings_config_forms():
    s = ImageSettings.from_preprocessor_config({"size": 224})
    assert s.size == (224, 224) and BlipImageProcessorPil(size=224).size.height == 224
    assert ImageSettings.from_preprocessor_config({}) == ImageSettings()
    s = ImageSettings.from_preprocessor_config({"size": [96, 128], "image_mean": 0.5, "do_normalize": False})
    assert s.size == (96, 128) and s.mean == (0.5,) * 3 and not s.do_normalize
    assert ImageSettings.from_preprocessor_config(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageSettings.from_preprocessor_config({"size": {"shortest_edge": 384}})
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageSettings.from_preprocessor_config({"do_center_crop": True})
    with pytest.raises(ValueError, match="std"):
        ImageSettings(std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        ImageSettings(resample=42)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="int"):
        load_image(123)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        load_image(str(junk))
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess([])
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess(_image("RGB", 4, 4))
    with pytest.raises(ValueError, match=r"images\[1\].*NoneType"):
        preprocess([_image("RGB", 4, 4), None])
    with pytest.raises(ValueError, match="differ in size"):
        preprocess([_image("RGB", 4, 4), _image("RGB", 5, 4)], ImageSettings(do_resize=False))
    with pytest.raises(ValueError, match="do_convert_rgb"):
        preprocess([_image("L", 4, 4)], ImageSettings(do_convert_rgb=False))


def test_runtime_imports_without_torch():
    code = "import blip_runtime.image, blip_runtime.text, sys; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kwargs", [{}, dict(do_rescale=False), dict(do_normalize=False),
                                    dict(rescale_factor=1 / 127.5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))])
def test_lookup_table_equals_per_pixel_arithmetic(kwargs):
    """preprocess looks pixels up in pixel_table; that must give the per-pixel float32 arithmetic
    (float64 rescale, float32 normalize, as transformers computes) bit for bit, for every uint8 value."""
    from blip_runtime.image import pixel_table

    s = ImageSettings(**kwargs)
    x = np.arange(256, dtype=np.uint8)
    v = (x.astype(np.float64) * s.rescale_factor).astype(np.float32) if s.do_rescale else x.astype(np.float32)
    want = np.stack([(v - np.float32(m)) / np.float32(d) for m, d in zip(s.mean, s.std)]) if s.do_normalize \
        else np.stack([v] * 3)
    assert pixel_table(s).dtype == np.float32 and np.array_equal(pixel_table(s), want)
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    got = preprocess([img], ImageSettings(**kwargs, do_resize=False))
    assert np.array_equal(got[0], want[np.arange(3)[:, None, None], img.transpose(2, 0, 1)])
