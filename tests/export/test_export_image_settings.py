"""Image settings of checkpoints saved by the installed transformers: BlipProcessor.save_pretrained
(transformers 5) writes processor_config.json with the image processor nested and no
preprocessor_config.json. The bundle's settings must be the processor's, and the runtime's
pixel_values transformers' own, for every BLIP architecture; a checkpoint with neither file says so
in the export output and the manifest; a broken file is one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from blip_runtime.processor_config import image_processor_config
from oracle import TINY_TEXT, TINY_VISION, assert_close, hf_config, make_full_checkpoint, save_processor

ARCHS = ["BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel"]
SIZE = 48  # neither BlipImageProcessor's default (384) nor the tiny config's usual 32
MEAN, STD = (0.3, 0.5, 0.7), (0.15, 0.2, 0.35)  # not CLIP's


def images(n=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 50 - 4 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_bundle_image_settings_are_the_processors(arch, tmp_path):
    import transformers

    from blip_export.bundle import export_bundle
    from blip_runtime import BlipRuntime

    folder = tmp_path / "ckpt"
    make_full_checkpoint(arch, folder, hf_config(dict(TINY_VISION, image_size=SIZE)), seed=ARCHS.index(arch),
                         std=0.1, image_mean=MEAN, image_std=STD)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    processor = transformers.BlipProcessor.from_pretrained(folder)
    ip = processor.image_processor
    report = export_bundle(folder, tmp_path / "bundle")
    image = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["image"]
    assert image["source"] == "processor_config.json" and report.notes == []
    assert image["size"] == dict(ip.size) == {"height": SIZE, "width": SIZE}
    assert image["image_mean"] == list(ip.image_mean) == list(MEAN)
    assert image["image_std"] == list(ip.image_std) == list(STD)
    assert image["resample"] == int(ip.resample) and image["rescale_factor"] == ip.rescale_factor

    imgs = images()
    ours = BlipRuntime.load(tmp_path / "bundle").pixels(imgs)
    theirs = processor(images=imgs, return_tensors="np").pixel_values
    assert ours.shape == theirs.shape == (len(imgs), 3, SIZE, SIZE)
    assert_close(ours, theirs, 1e-6, f"{arch}: runtime pixel_values vs BlipProcessor")


def test_neither_file_uses_defaults_and_says_so(tmp_path):
    folder = tmp_path / "ckpt"
    make_full_checkpoint("BlipForConditionalGeneration", folder, std=0.1)
    (folder / "processor_config.json").unlink()
    r = subprocess.run([sys.executable, "-m", "blip_export.cli", str(folder), "-o", str(tmp_path / "b"), "-q"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"blip-export: note: {folder}: no processor_config.json or preprocessor_config.json" in r.stderr, r.stderr
    image = json.loads((tmp_path / "b" / "manifest.json").read_text())["image"]
    assert image["source"] == "defaults" and image["size"] == {"height": 32, "width": 32}
    assert image["image_mean"] == [0.48145466, 0.4578275, 0.40821073]


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON (line 1, column 2"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"image_processor": [1, 2]}', '"image_processor" must be a JSON object, got list'),
], ids=["bad-json", "not-an-object", "nested-not-an-object"])
def test_broken_processor_config_is_one_line(content, expected, tmp_path):
    folder = tmp_path / "ckpt"
    make_full_checkpoint("BlipForConditionalGeneration", folder, std=0.1)
    (folder / "processor_config.json").write_text(content)
    with pytest.raises(ValueError, match="processor_config.json: "):
        image_processor_config(folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "blip_export.cli", str(folder), "-o", str(tmp_path / "b")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(folder / "processor_config.json") in lines[0] and expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_which_file_wins(tmp_path):
    """As transformers reads them: processor_config.json's nested image processor first, the flat
    preprocessor_config.json (an image processor saved on its own) otherwise."""
    import transformers

    assert image_processor_config(tmp_path) == (None, None)
    flat = transformers.BlipImageProcessor(size={"height": 40, "width": 40}, image_mean=list(MEAN))
    flat.save_pretrained(tmp_path)
    data, path = image_processor_config(tmp_path)
    assert path == tmp_path / "preprocessor_config.json" and data["size"] == {"height": 40, "width": 40}
    assert transformers.BlipImageProcessor.from_pretrained(tmp_path).size == {"height": 40, "width": 40}

    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "BlipProcessor"}))
    assert image_processor_config(tmp_path)[1] == tmp_path / "preprocessor_config.json"  # nothing nested

    save_processor(tmp_path, TINY_TEXT["vocab_size"], 56, mean=STD, std=MEAN)  # now both files exist
    data, path = image_processor_config(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file() and path == tmp_path / "processor_config.json"
    theirs = transformers.BlipProcessor.from_pretrained(tmp_path).image_processor
    assert data["size"] == dict(theirs.size) == {"height": 56, "width": 56}
    assert data["image_mean"] == list(theirs.image_mean) == list(STD)


def test_image_size_mismatch_names_the_file(tmp_path):
    from blip_export.bundle import export_bundle
    from blip_export.errors import CheckpointError

    folder = tmp_path / "ckpt"
    make_full_checkpoint("BlipModel", folder, std=0.1, image_size=40)  # the vision config says 32
    with pytest.raises(CheckpointError, match=r"processor_config.json: size \(40, 40\) differs from config.json image_size 32"):
        export_bundle(folder, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_runtime_module_is_torch_free():
    code = "import sys, blip_runtime.processor_config; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
