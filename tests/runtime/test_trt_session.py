"""TrtSession and build_engines on CPU stand-ins for CUDA and TensorRT (tests/fake_trt.py): the
engine bundle, binding by name, kept outputs fed back without host copies, row gathers on the
device, profile errors, and captions/answers through BlipRuntime equal to the ONNX bundle's.
Real engines are tested in tests/export/test_trt.py (gpu-marked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fake_trt
from blip_export.bundle import export_bundle
from blip_export.trt_build import build_engines
from blip_runtime import BlipRuntime
from blip_runtime.device import DeviceTensor
from blip_runtime.graphs import BATCH, ENC, PAST, TEXT, Limits, random_feeds
from blip_runtime.manifest import BundleError, load_manifest
from blip_runtime.session import OrtSession
from oracle import make_full_checkpoint

LIMITS = Limits(max_batch=4, max_text_len=16, max_new_tokens=20, num_beams=3)


@pytest.fixture(scope="module")
def onnx_bundles(tmp_path_factory):
    out = {}
    for i, arch in enumerate(("BlipForConditionalGeneration", "BlipForQuestionAnswering")):
        root = tmp_path_factory.mktemp(arch)
        make_full_checkpoint(arch, root / "ckpt", seed=5 + i, std=0.3)
        export_bundle(root / "ckpt", root / "bundle")
        out[arch] = root / "bundle"
    return out


@pytest.fixture
def cuda(monkeypatch):
    return fake_trt.install(monkeypatch)


def engines(onnx_bundles, arch, tmp_path, limits=LIMITS):
    build_engines(onnx_bundles[arch], tmp_path / "trt", limits, tmp_path / "timing.cache")
    return load_manifest(tmp_path / "trt")


def test_engine_bundle(onnx_bundles, cuda, tmp_path):
    manifest = engines(onnx_bundles, "BlipForConditionalGeneration", tmp_path)
    data, source = manifest.data, load_manifest(onnx_bundles["BlipForConditionalGeneration"]).data
    assert data["target"] == "trt" and data["limits"]["num_beams"] == 3
    assert sorted(p.name for p in manifest.folder.iterdir()) == [
        "cross_kv.engine", "decoder_step.engine", "manifest.json", "tokenizer.json", "vision.engine"]
    info = data["build"]["tensorrt"]
    assert (info["version"], info["gpu"], info["compute_capability"]) == (fake_trt.VERSION, fake_trt.GPU, list(fake_trt.CC))
    assert info["timing_cache"].endswith("timing.cache") and data["build"]["source"] == source["build"]["source"]
    for name, entry in data["graphs"].items():
        assert entry["io"] == source["graphs"][name]["io"] and entry["onnx_sha256"] == source["graphs"][name]["sha256"]
        assert set(entry["profile"]) == {t["name"] for t in entry["io"]["inputs"]}
    assert data["graphs"]["decoder_step"]["profile"]["past_key.0"][2][0] == 12  # rows = 4 x 3 beams
    for key in ("tokenizer", "image", "special_tokens", "generation", "dims", "tasks"):
        assert data[key] == source[key]


def test_failed_build_leaves_nothing(onnx_bundles, cuda, tmp_path, monkeypatch):
    import blip_export.trt_build as trt_build

    def boom(*a):
        raise RuntimeError("builder failed")

    monkeypatch.setattr(trt_build, "_compile", boom)
    with pytest.raises(RuntimeError, match="builder failed"):
        build_engines(onnx_bundles["BlipForConditionalGeneration"], tmp_path / "trt", LIMITS, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_session_matches_onnxruntime(onnx_bundles, cuda, tmp_path, arch):
    from blip_runtime.trt_session import TrtSession

    ort = OrtSession(load_manifest(onnx_bundles[arch]))
    with TrtSession(engines(onnx_bundles, arch, tmp_path)) as trt:
        for graph, spec in trt.manifest.graphs.items():
            for i, sizes in enumerate([{BATCH: 1, TEXT: 1, PAST: 0, ENC: 3}, {BATCH: 4, TEXT: 16, PAST: 20, ENC: 9}]):
                if graph not in ("cross_kv", "decoder_step"):
                    sizes = {**sizes, ENC: trt.manifest.dims.num_image_tokens}
                feeds = random_feeds(spec, sizes, seed=i)
                ours, ref = trt.run(graph, feeds), ort.run(graph, feeds)
                assert list(ours) == list(ref)
                for name in ref:
                    assert isinstance(ours[name], np.ndarray) and ours[name].dtype == ref[name].dtype
                    np.testing.assert_array_equal(ours[name], ref[name], err_msg=f"{graph} {name} {sizes}")
    assert cuda.live == 0, "close() and dropped tensors must free every device buffer"


def test_kept_outputs_stay_on_the_device(onnx_bundles, cuda, tmp_path):
    """Three decoding steps with beam reordering: only the logits come to the host; the result
    equals ONNX Runtime fed with numpy arrays."""
    from blip_runtime.trt_session import TrtSession

    manifest = engines(onnx_bundles, "BlipForConditionalGeneration", tmp_path)
    ort, d = OrtSession(load_manifest(onnx_bundles["BlipForConditionalGeneration"])), manifest.dims
    rows, n = 3, d.num_image_tokens
    states = np.random.default_rng(0).standard_normal((rows, n, d.vision_hidden)).astype(np.float32)
    with TrtSession(manifest) as trt:
        cross = trt.run("cross_kv", {"encoder_states": states}, keep=("cross_*",))
        ref_cross = ort.run("cross_kv", {"encoder_states": states})
        assert all(isinstance(v, DeviceTensor) for v in cross.values())
        gather = np.array([2, 0, 1, 1])  # beam expansion / reordering on the device
        np.testing.assert_array_equal(cross["cross_key.0"][gather].numpy(), ref_cross["cross_key.0"][gather])
        empty = np.zeros((rows, d.num_heads, 0, d.head_dim), np.float32)
        past = {f"past_{k}.{i}": empty for i in range(d.num_layers) for k in ("key", "value")}
        ref_past = dict(past)
        mask = np.ones((rows, 1), np.int64)
        before = dict(cuda.copied)
        for step in range(3):
            beam = np.array([1, 0, 2]) if step else np.arange(rows)
            feeds = {"input_ids": np.full((rows, 1), 7 + step, np.int64), "attention_mask": mask,
                     "position_ids": np.full((rows, 1), step, np.int64), "encoder_attention_mask": np.ones((rows, n), np.int64),
                     "beam_idx": beam}
            out = trt.run("decoder_step", {**feeds, **past, **cross}, keep=("present_*",))
            ref = ort.run("decoder_step", {**feeds, **ref_past, **ref_cross})
            np.testing.assert_array_equal(out["logits"], ref["logits"])
            assert isinstance(out["logits"], np.ndarray) and isinstance(out["present_key.0"], DeviceTensor)
            past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
            ref_past = {k.replace("present_", "past_"): v for k, v in ref.items() if k.startswith("present_")}
            mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        np.testing.assert_array_equal(past["past_value.1"].numpy(), ref_past["past_value.1"])
        logits_bytes = 3 * rows * d.vocab_size * 4
        assert cuda.copied["D2H"] - before.get("D2H", 0) == logits_bytes + past["past_value.1"].nbytes
    assert cuda.live == 4 * d.num_layers  # left to the tensors still held (cross, past): freed when dropped
    del cross, past, out
    assert cuda.live == 0


def test_device_tensor_rows_and_pool(cuda):
    from blip_runtime.device import BufferPool

    pool = BufferPool()
    x = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    t = DeviceTensor.from_numpy(x, pool)
    for rows in ([4, 0, 1, 2, 2], [3], np.array([-1, 0]), np.repeat(np.arange(5), 3)):
        np.testing.assert_array_equal(t[rows].numpy(), x[np.asarray(rows)])
    copies = cuda.copies["D2D"]
    t[np.repeat(np.arange(5), 1)]  # consecutive rows: one copy
    assert cuda.copies["D2D"] == copies + 1
    with pytest.raises(IndexError):
        t[[5]]
    with pytest.raises(TypeError):
        t[1:3]
    allocated = cuda.allocations
    for size in range(10, 30):  # a cache growing by one token per step reuses pooled buffers
        DeviceTensor.empty((12, 12, size, 64), np.float32, pool)
    assert cuda.allocations - allocated <= 5
    del t
    pool.close()
    assert cuda.live == 0


def test_shapes_outside_the_profile(onnx_bundles, cuda, tmp_path):
    from blip_runtime.trt_session import TrtSession

    with TrtSession(engines(onnx_bundles, "BlipForConditionalGeneration", tmp_path)) as trt:
        rt = BlipRuntime(trt.manifest, trt)
        with pytest.raises(ValueError, match=r"outside the shapes these engines were built for .*--num-beams 3"):
            rt.caption([np.zeros((32, 32, 3), np.uint8)] * 3, num_beams=5)  # 15 rows > 4 x 3


def test_refuses_engines_of_another_machine(onnx_bundles, cuda, tmp_path, monkeypatch):
    import blip_runtime.trt_session as trt_session

    manifest = engines(onnx_bundles, "BlipForConditionalGeneration", tmp_path)
    monkeypatch.setattr(trt_session, "device_info", lambda: ("NVIDIA Jetson AGX Orin", (8, 7)))
    loaded = []
    monkeypatch.setattr(fake_trt._Engine, "__init__", lambda *a: loaded.append(a))
    with pytest.raises(BundleError, match=r"compute capability 8\.9 \(this GPU has 8\.7\).*blip-export .* --target trt"):
        trt_session.TrtSession(manifest)
    assert loaded == [], "compatibility is checked before any engine is deserialized"
    data = json.loads((manifest.folder / "manifest.json").read_text())
    assert data["build"]["tensorrt"]["version"] == fake_trt.VERSION


class KeepingSession:
    """What DecoderInference does after the integration (keep= on cross_kv and decoder_step):
    the cache and cross K/V reach DecoderInference as DeviceTensors, which it passes along."""

    def __init__(self, session):
        self.session, self.kept = session, 0

    def run(self, graph, feeds, keep=()):
        out = self.session.run(graph, feeds, keep=("present_*", "cross_*", *keep))
        self.kept += sum(isinstance(v, DeviceTensor) for v in out.values())
        return out


@pytest.mark.parametrize("keep", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("arch", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_generation_equals_onnx_bundle(onnx_bundles, cuda, tmp_path, arch, keep):
    from blip_runtime.trt_session import TrtSession

    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40 + 5 * i, 36, 3), dtype=np.uint8) for i in range(3)]
    ref = BlipRuntime.load(onnx_bundles[arch])
    with TrtSession(engines(onnx_bundles, arch, tmp_path)) as trt:
        session = KeepingSession(trt) if keep else trt
        ours = BlipRuntime(trt.manifest, session)
        for gen in ({}, {"num_beams": 3, "max_new_tokens": 12}, {"do_sample": True, "top_k": 5, "seed": 3}):
            if arch == "BlipForQuestionAnswering":
                q = ["what color is it?", "is there a circle", "what"]
                assert ours.answer_tokens(imgs, q, **gen) == ref.answer_tokens(imgs, q, **gen), gen
            else:
                assert ours.caption_tokens(imgs, **gen) == ref.caption_tokens(imgs, **gen), gen
                assert ours.caption_tokens(imgs, "a picture of", **gen) == ref.caption_tokens(imgs, "a picture of", **gen)
        assert not keep or session.kept > 0
    assert cuda.live == 0


def test_blip_runtime_load_keeps_the_cache_on_the_device(onnx_bundles, cuda, tmp_path):
    """Once BlipRuntime.load opens engine bundles with TrtSession and DecoderInference asks for
    keep=("present_*",) / ("cross_*",), only the logits (and the image embeddings, once per request)
    come back to the host. Skipped until runtime.py does both."""
    manifest = engines(onnx_bundles, "BlipForConditionalGeneration", tmp_path)
    try:
        ours = BlipRuntime.load(manifest.folder)
    except BundleError as e:
        pytest.skip(f"BlipRuntime.load does not open engine bundles yet ({e})")
    ref = BlipRuntime.load(onnx_bundles["BlipForConditionalGeneration"])
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (44, 36, 3), dtype=np.uint8) for _ in range(3)]
    d = manifest.dims
    for gen, steps, rows in (({"max_new_tokens": 9, "min_new_tokens": 9}, 9, 3),
                             ({"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 6}, 6, 9)):
        before = cuda.copied["D2H"]
        assert ours.caption_tokens(imgs, **gen) == ref.caption_tokens(imgs, **gen)
        embeds = 3 * d.num_image_tokens * d.vision_hidden * 4
        assert cuda.copied["D2H"] - before == steps * rows * d.vocab_size * 4 + embeds, gen


def test_retrieve_batches_within_the_engines_limits(cuda, tmp_path):
    """retrieve's default batch (16) is above an engine bundle's max_batch (4 here): its batches are
    capped at the engines' limit, and the similarities equal the ONNX bundle's."""
    make_full_checkpoint("BlipForImageTextRetrieval", tmp_path / "ckpt", seed=9, std=0.3)
    export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    build_engines(tmp_path / "bundle", tmp_path / "trt", LIMITS, None)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(6)]
    texts = ["a red circle", "a blue square at the top", "two", "a green triangle", "nothing here"]
    want = BlipRuntime.load(tmp_path / "bundle").retrieve(imgs, texts)
    ours = BlipRuntime.load(tmp_path / "trt")
    assert ours.manifest.data["limits"]["max_batch"] == 4
    got = ours.retrieve(imgs, texts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want.shape == (6, 5) and np.ptp(want) > 1e-3  # the similarities vary
    ours.session.close()
