"""OrtSession's memory options: applied to every graph's session, and results unchanged token for
token (against ONNX Runtime's own defaults and against transformers, re-randomized weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_export.bundle import export_bundle
from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest
from blip_runtime.session import MEMORY_OPTIONS, OrtSession
from oracle import assert_close, make_full_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("memory")
    model = make_full_checkpoint("BlipForConditionalGeneration", folder / "ckpt", seed=5, std=0.3)
    processor = transformers.BlipProcessor.from_pretrained(folder / "ckpt")
    export_bundle(folder / "ckpt", folder / "bundle")
    return model, processor, load_manifest(folder / "bundle")


def images(n):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_options_reach_every_session(pair):
    manifest = pair[2]
    assert MEMORY_OPTIONS, "the runtime sets its memory options"
    session = OrtSession(manifest)
    for name, s in session.sessions.items():
        opts = s.get_session_options()
        for key, value in MEMORY_OPTIONS.items():
            got = opts.get_session_config_entry(key) if "." in key else getattr(opts, key)
            assert got == value, f"{name}: {key} = {got!r}, expected {value!r}"
    ort_defaults = OrtSession(manifest, memory={})
    assert all(s.get_session_options().enable_cpu_mem_arena for s in ort_defaults.sessions.values())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tokens_unchanged(pair, num_beams):
    model, processor, manifest = pair
    imgs = images(2)
    gen = dict(max_new_tokens=12, min_new_tokens=12, num_beams=num_beams)
    ours = BlipRuntime(manifest, OrtSession(manifest)).caption_tokens(imgs, **gen)
    ort_defaults = BlipRuntime(manifest, OrtSession(manifest, memory={})).caption_tokens(imgs, **gen)
    assert ours == ort_defaults
    for i, img in enumerate(imgs):
        with torch.inference_mode():
            ref = model.generate(**processor(images=[img], return_tensors="pt"), **gen)[0].tolist()
        assert list(ours[i]) == ref, f"row {i}: ours {list(ours[i])} vs transformers {ref}"
    assert len({tuple(r) for r in ours}) > 1 or len(set(ours[0])) > 2, "outputs vary: the comparison means something"


def test_graph_outputs_equal_ort_defaults(pair):
    manifest = pair[2]
    rt = BlipRuntime(manifest, OrtSession(manifest))
    pixels = rt.pixels(images(2))
    ours = rt.session.run("vision", {"pixel_values": pixels})
    theirs = OrtSession(manifest, memory={}).run("vision", {"pixel_values": pixels})
    for name in ours:
        assert_close(ours[name], theirs[name], 1e-6, f"vision {name}, memory options vs ONNX Runtime defaults")


def test_bad_option_is_one_clear_line(pair):
    with pytest.raises(ValueError, match="memory option 'no_such_option': expected a SessionOptions attribute"):
        OrtSession(pair[2], memory={"no_such_option": 1})
