"""Graphs with their weights beside them (ONNX external data, what graphs over 2 GB need) through
every stage: export, fp16 and int8-cpu conversion, the manifest's checksums, ONNX Runtime and the
TensorRT build path (tests/fake_trt.py), and moving the bundle folder.

files.EXTERNAL_DATA_THRESHOLD is lowered to a few KB so the tiny BLIP graphs take the path graphs
over 2 GB take; the same checkpoint exported with the default threshold (weights inside the
graph file) is the reference, and the two must give the same tokens and the same graph outputs.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import fake_trt
from blip_export import files
from blip_export.bundle import export_bundle
from blip_export.calibration import calibration_feeds
from blip_export.measure import run_all
from blip_export.precision import convert_bundle
from blip_export.trt_build import build_engines, engine_loader
from blip_runtime import BlipRuntime
from blip_runtime.graphs import Limits
from blip_runtime.manifest import BundleError, load_manifest
from oracle import make_full_checkpoint

THRESHOLD = 4096  # bytes: every tiny graph's weights are above it, so every graph stores them beside it
PRECISIONS = ("fp32", "fp16", "int8-cpu")
PROMPTS = [None, "a picture of"]


def images(n, seed, size=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size + 4 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


class Bundles:
    """The tiny caption checkpoint's bundles, inline (the default threshold) and external (lowered),
    in each of PRECISIONS; each made once, on first use."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}
        make_full_checkpoint("BlipForConditionalGeneration", root / "ckpt", seed=7, std=0.1)

    def __call__(self, precision: str, external: bool) -> Path:
        key = (precision, external)
        if key not in self.made:
            dst = self.root / f"{precision}-{'external' if external else 'inline'}"
            with pytest.MonkeyPatch.context() as mp:
                if external:
                    mp.setattr(files, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)
                if precision == "fp32":
                    export_bundle(self.root / "ckpt", dst)
                else:
                    source = self("fp32", external)
                    # same held-out images for both forms: the int8 exclusion search sees the same errors
                    convert_bundle(source, dst, precision, images(3, seed=11))
            self.made[key] = dst
        return self.made[key]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("external"))


def tokens(runtime: BlipRuntime) -> list:
    imgs = images(2, seed=21)
    return [runtime.caption_tokens(imgs, prompt, max_new_tokens=8) for prompt in PROMPTS] + [
        runtime.caption_tokens(imgs, num_beams=3, max_new_tokens=6)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_graph_stores_its_weights_beside_it(bundles, precision):
    folder = bundles(precision, external=True)
    manifest = load_manifest(folder)
    manifest.verify_files()
    listed = {"manifest.json", manifest.data["tokenizer"]["file"]}
    for name, entry in manifest.data["graphs"].items():
        graph = manifest.graph_path(name)
        assert [d["file"] for d in entry["data"]] == [f"{graph.name}.data"], entry.get("data")
        assert entry["sha256"] == files.sha256(graph) and entry["data"][0]["sha256"] == files.sha256(graph.with_suffix(".onnx.data"))
        proto = onnx.load(str(graph), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{graph.name}.data"}  # one data file, named relative to the graph
        inline = bundles(precision, external=False) / graph.name
        print(f"{precision} {name}: graph file {graph.stat().st_size} B + data {graph.with_suffix('.onnx.data').stat().st_size} B"
              f" (inline {inline.stat().st_size} B)")
        assert graph.stat().st_size < inline.stat().st_size
        assert "data" not in load_manifest(inline.parent).data["graphs"][name]
        onnx.checker.check_model(str(graph), full_check=True)
        listed |= {entry["file"], *(d["file"] for d in entry["data"])}
    assert sorted(p.name for p in folder.iterdir()) == sorted(listed)  # nothing left over (torch's files, .part)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_results_as_the_inline_bundle(bundles, precision):
    """Token for token (greedy, with a prompt, beam search), and every graph's outputs on the feeds
    the inline bundle recorded, bit for bit: the weights are the same bytes, stored elsewhere."""
    inline, external = BlipRuntime.load(bundles(precision, False)), BlipRuntime.load(bundles(precision, True))
    ours, theirs = tokens(external), tokens(inline)
    print(f"{precision} tokens: {ours[0]}")
    assert ours == theirs
    feeds = calibration_feeds(inline, images(2, seed=23), max_new_tokens=4)
    for name, graph_feeds in feeds.items():
        a = run_all(external.session.sessions[name], graph_feeds)
        b = run_all(inline.session.sessions[name], graph_feeds)
        for x, y in zip(a, b):
            for out in y:
                assert np.array_equal(x[out], y[out]), f"{precision} {name}.{out}: max abs {np.abs(x[out] - y[out]).max()}"


def test_int8_cpu_keeps_its_own_data(bundles):
    """The converted bundle's data files are the converted graphs', not copies of the fp32 ones."""
    fp32, int8 = bundles("fp32", True), bundles("int8-cpu", True)
    for data in int8.glob("*.onnx.data"):
        assert files.sha256(data) != files.sha256(fp32 / data.name), data.name


def test_moved_bundle_runs(bundles, tmp_path):
    source = bundles("fp16", True)
    shutil.copytree(source, tmp_path / "a" / "bundle")
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(tmp_path / "a" / "bundle", moved)
    assert not (tmp_path / "a" / "bundle").exists()
    assert tokens(BlipRuntime.load(moved)) == tokens(BlipRuntime.load(source))


@pytest.mark.parametrize("how", ["changed", "truncated", "deleted"])
def test_damaged_data_file_fails_by_name(bundles, tmp_path, how):
    folder = tmp_path / "bundle"
    shutil.copytree(bundles("fp32", True), folder)
    data = folder / "decoder_step.onnx.data"
    if how == "changed":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:-4])
    else:
        data.unlink()
    with pytest.raises(BundleError) as err:
        BlipRuntime.load(folder)
    message = str(err.value)
    print(message)
    assert "decoder_step.onnx.data" in message
    assert ("missing" if how == "deleted" else "SHA-256") in message


def test_manifest_data_entry_without_file_is_refused(bundles, tmp_path):
    import json

    folder = tmp_path / "bundle"
    shutil.copytree(bundles("fp32", True), folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["graphs"]["vision"]["data"] = [{"sha256": "0" * 64}]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"graphs\.vision\.data\[0\]\.file"):
        load_manifest(folder)


def test_store_graph_gathers_one_file_per_tensor(tmp_path, monkeypatch):
    """torch.onnx.export writes a graph over 2 GB with one file per weight: store_graph concatenates
    them into `<graph>.onnx.data` (streamed, never loaded) and removes them; the outputs do not change."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal((24, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    def model():  # a fresh proto each time: save_model with external data rewrites the one it is given
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(model(), str(scratch / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert sorted(p.name for p in scratch.iterdir()) == ["g.onnx", "w1", "w2"]
    x = rng.standard_normal((3, 16)).astype(np.float32)
    want = ort.InferenceSession(str(scratch / "g.onnx")).run(None, {"x": x})[0]
    out = tmp_path / "bundle"
    out.mkdir()
    files.store_graph(scratch / "g.onnx", out / "g.onnx")
    assert sorted(p.name for p in scratch.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx.data"]
    assert [p.name for p in files.graph_data_files(out / "g.onnx")] == ["g.onnx.data"]
    got = ort.InferenceSession(str(out / "g.onnx")).run(None, {"x": x})[0]
    assert np.array_equal(got, want)
    # a graph with its weights inside goes over the threshold: stored beside; under it: moved as is
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 100)
    onnx.save_model(model(), str(scratch / "h.onnx"))
    files.store_graph(scratch / "h.onnx", out / "h.onnx")
    assert (out / "h.onnx.data").is_file() and np.array_equal(ort.InferenceSession(str(out / "h.onnx")).run(None, {"x": x})[0], want)
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 10**9)
    files.save_graph(onnx.load(str(out / "h.onnx")), out / "h.onnx")  # back inside: the old data file goes
    assert not (out / "h.onnx.data").exists() and np.array_equal(ort.InferenceSession(str(out / "h.onnx")).run(None, {"x": x})[0], want)


def test_trt_build_parses_from_the_path(bundles, tmp_path, monkeypatch):
    """The engine build hands TensorRT's parser the graph's PATH (NetworkFromOnnxPath), so the parser
    finds the data file beside it; the engines (ONNX Runtime behind the fake TensorRT, fed the whole
    graph as the parser would have read it) give the ONNX bundle's tokens."""
    import blip_export.trt_build as trt_build

    fake_trt.install(monkeypatch)
    folder = bundles("fp32", True)
    parsed = []

    def compile_from_path(onnx_path, profiles, timing_cache=None, tf32=False):
        loader = engine_loader(onnx_path, profiles, timing_cache, strongly_typed=True)
        assert loader._network.path == str(onnx_path)  # polygraphy's NetworkFromOnnxPath, not bytes
        parsed.append(Path(onnx_path).name)
        whole = onnx.load(str(onnx_path))  # what the parser reads: the graph and its data file
        return pickle.dumps({"onnx": whole.SerializeToString(), "profiles": profiles})

    monkeypatch.setattr(trt_build, "_compile", compile_from_path)
    limits = Limits(max_batch=4, max_text_len=16, max_new_tokens=20, num_beams=3)
    build_engines(folder, tmp_path / "trt", limits, tmp_path / "timing.cache")
    assert sorted(parsed) == sorted(f"{g}.onnx" for g in load_manifest(folder).graphs)
    trt = BlipRuntime.load(tmp_path / "trt")
    assert tokens(trt) == tokens(BlipRuntime.load(folder))


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_bundle_with_external_data(tmp_path, monkeypatch, lm):
    """A tiny BLIP-2 checkpoint exported with every graph's weights beside it generates the inline
    bundle's tokens (greedy, beam search, a prompt) and checks its data files."""
    from blip2_oracle import hf_config as blip2_config
    from blip2_oracle import make_checkpoint as blip2_checkpoint

    blip2_checkpoint("Blip2ForConditionalGeneration", tmp_path / "ckpt", blip2_config(lm, True), seed=4, std=0.3)
    export_bundle(tmp_path / "ckpt", tmp_path / "inline")
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)
    export_bundle(tmp_path / "ckpt", tmp_path / "external")
    manifest = load_manifest(tmp_path / "external")
    for name in manifest.graphs:
        assert [p.name for p in manifest.data_paths(name)] == [f"{name}.onnx.data"], name
    imgs = images(2, seed=31)

    def generated(folder):
        rt = BlipRuntime.load(folder)
        return [rt.caption_tokens(imgs, max_new_tokens=6), rt.caption_tokens(imgs, "a photo of", max_new_tokens=5),
                rt.caption_tokens(imgs, num_beams=2, max_new_tokens=5)]

    ours = generated(tmp_path / "external")
    print(f"BLIP-2 {lm} tokens: {ours[0]}")
    assert ours == generated(tmp_path / "inline")
    inline, external = BlipRuntime.load(tmp_path / "inline"), BlipRuntime.load(tmp_path / "external")
    feeds = calibration_feeds(inline, imgs, max_new_tokens=4)
    assert set(feeds) == set(manifest.graphs)
    for name, graph_feeds in feeds.items():  # bit for bit: the same weights, stored elsewhere
        for x, y in zip(run_all(external.session.sessions[name], graph_feeds), run_all(inline.session.sessions[name], graph_feeds)):
            assert all(np.array_equal(x[k], y[k]) for k in y), name
    (tmp_path / "external" / f"{next(iter(manifest.graphs))}.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"\.onnx\.data.*missing"):
        BlipRuntime.load(tmp_path / "external")
