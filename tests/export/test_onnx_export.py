"""Each exported graph against its reference module, the bundle and the blip-export CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from blip_export import load_model
from blip_export.bundle import export_bundle
from blip_export.cli import main as export_main
from blip_export.families import family
from blip_export.onnx_export import compare, reference_outputs
from blip_runtime.families.blip.graphs import axes as blip_axes
from blip_runtime.graphs import BATCH, ENC, PAST, TEXT, Limits, profile_shapes, random_feeds
from blip_runtime.manifest import load_manifest
from blip_runtime.session import OrtSession
from oracle import make_full_checkpoint

ARCHS = {
    "BlipForConditionalGeneration": ["caption"],
    "BlipForQuestionAnswering": ["vqa"],
    "BlipForImageTextRetrieval": ["itm", "itc"],
    "BlipModel": ["itc"],
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = {}
    for i, arch in enumerate(ARCHS):
        root = tmp_path_factory.mktemp(arch)
        make_full_checkpoint(arch, root / "ckpt", seed=i, std=0.1)
        export_bundle(root / "ckpt", root / "bundle")
        out[arch] = root
    return out


# Sizes other than those the exporter verified with, so this is an independent check.
SIZES = [
    {BATCH: 1, TEXT: 2, PAST: 0, ENC: 3},
    {BATCH: 3, TEXT: 1, PAST: 13, ENC: 17},
    {BATCH: 3, TEXT: 7, PAST: 4, ENC: 9},
]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_graph_matches_reference(bundles, arch):
    model, config = load_model(bundles[arch] / "ckpt")
    manifest = load_manifest(bundles[arch] / "bundle")
    assert manifest.tasks == ARCHS[arch]
    session = OrtSession(manifest)
    dims = manifest.dims
    for name, spec in manifest.graphs.items():
        for i, sizes in enumerate(SIZES):
            if name not in ("cross_kv", "decoder_step"):
                sizes = {**sizes, ENC: dims.num_image_tokens}
            feeds = random_feeds(spec, sizes, seed=100 + i)
            ours = session.run(name, feeds)
            wrapper = family("blip").wrapper(model, spec, manifest.tasks)
            max_abs, rel = compare(ours, reference_outputs(wrapper, spec, feeds))
            print(f"{arch} {name} {sizes}: max abs error {max_abs:.2e}, relative {rel:.2e}")
            assert rel < 1e-4, f"{arch} {name} at {sizes}: relative error {rel:.2e} (max abs {max_abs:.2e})"
        recorded = manifest.data["graphs"][name]["verification"]
        assert recorded["rel"] < 1e-4


def test_bundle_contents_and_metadata(bundles):
    folder = bundles["BlipForConditionalGeneration"] / "bundle"
    data = json.loads((folder / "manifest.json").read_text())
    assert sorted(data["graphs"]) == ["cross_kv", "decoder_step", "vision"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "vision.onnx", "cross_kv.onnx", "decoder_step.onnx"])
    assert data["special_tokens"] == {"bos_token_id": 97, "sep_token_id": 3, "pad_token_id": 0}
    assert data["image"]["size"] == {"height": 32, "width": 32}
    assert len(data["build"]["source_sha256"]) == 64
    meta = {p.key: p.value for p in onnx.load(str(folder / "decoder_step.onnx")).metadata_props}
    assert meta["num_layers"] == "2" and meta["bos_token_id"] == "97" and meta["graph"] == "decoder_step"
    # Every symbolic axis of the table is symbolic in the graph (nothing got baked in by tracing).
    graph = onnx.load(str(folder / "decoder_step.onnx")).graph
    for value in graph.input:
        spec = next(t for t in load_manifest(folder).graphs["decoder_step"].inputs if t.name == value.name)
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.shape):
            assert (dim.dim_param or dim.dim_value) == axis, (value.name, dim, axis)


def test_runtime_input_checks(bundles):
    manifest = load_manifest(bundles["BlipForConditionalGeneration"] / "bundle")
    session = OrtSession(manifest)
    with pytest.raises(ValueError, match="pixel_values.*float32"):
        session.run("vision", {"pixel_values": np.zeros((1, 3, 32, 32), np.float64)})
    with pytest.raises(ValueError, match="pixel_values.*expected"):
        session.run("vision", {"pixel_values": np.zeros((1, 3, 30, 32), np.float32)})
    with pytest.raises(ValueError, match="missing inputs"):
        session.run("decoder_step", {"input_ids": np.zeros((1, 1), np.int64)})


def test_profiles_from_table(bundles):
    manifest = load_manifest(bundles["BlipForConditionalGeneration"] / "bundle")
    limits = Limits(max_batch=4, max_text_len=20, max_new_tokens=10, num_beams=3)
    prof = profile_shapes(manifest.graphs["decoder_step"], blip_axes(manifest.dims, limits))
    lo, opt, hi = prof["past_key.0"]
    assert lo == (1, 4, 0, 8) and hi == (12, 4, 30, 8)  # rows = batch x beams; past up to text + new tokens
    assert prof["attention_mask"][2] == (12, 50)
    assert profile_shapes(manifest.graphs["vision"], blip_axes(manifest.dims, limits))["pixel_values"] == (
        (1, 3, 32, 32), (1, 3, 32, 32), (4, 3, 32, 32))


def test_cli_exit_codes_and_nothing_half_written(bundles, tmp_path, capsys):
    ckpt = bundles["BlipForConditionalGeneration"] / "ckpt"
    assert export_main([str(ckpt), "-o", str(tmp_path / "ok"), "-q"]) == 0
    assert (tmp_path / "ok" / "manifest.json").is_file()
    assert export_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "not a folder" in err and len(err.strip().splitlines()) == 1
    assert export_main([str(ckpt), "--tasks", "vqa", "-o", str(tmp_path / "y"), "-q"]) == 1
    assert "supports caption" in capsys.readouterr().err
    assert export_main([str(ckpt), "--tasks", "ocr", "-q"]) == 2
    assert export_main([str(ckpt), "--target", "trt", "-o", str(tmp_path / "z"), "-q"]) == 1
    assert "--target onnx" in capsys.readouterr().err
    assert export_main([str(ckpt), "--precision", "fp64"]) == 2
    assert "invalid choice: 'fp64'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"], "failed exports must leave nothing behind"


def test_interrupted_export_leaves_nothing(bundles, tmp_path, monkeypatch):
    import blip_export.bundle as bundle

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "verify", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(bundles["BlipForConditionalGeneration"] / "ckpt", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_runtime_never_imports_torch():
    code = "import sys, blip_runtime, blip_runtime.graphs, blip_runtime.session; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cross_key_layouts():
    """The standard graphs carry cross-attention keys transposed ([.., Dh, enc]); the ONNX Runtime forms
    ([.., enc, Dh], MultiHeadAttention's layout) differ in that tensor only, in both graphs that carry it."""
    from blip_runtime.families.blip.graphs import Dims, cross_keys_transposed, graphs as blip_graphs

    dims = Dims(image_size=32, num_image_tokens=5, vision_hidden=16, text_hidden=16, num_layers=2, num_heads=2,
                head_dim=8, vocab_size=50, itc_dim=0)
    std, ort_ = blip_graphs(dims, {"caption"}), blip_graphs(dims, {"caption"}, keys_transposed=False)
    for name in ("cross_kv", "decoder_step"):
        assert cross_keys_transposed(std[name]) and not cross_keys_transposed(ort_[name])
        tensors = lambda spec: {t.name: t for t in (*spec.inputs, *spec.outputs)}  # noqa: E731
        a, b = tensors(std[name]), tensors(ort_[name])
        assert a.keys() == b.keys()
        for n in a:
            if n.startswith("cross_key"):
                assert a[n].shape[-2:] == (8, ENC) and b[n].shape[-2:] == (ENC, 8) and a[n].shape[:2] == b[n].shape[:2]
            else:
                assert a[n] == b[n], n
    assert {k: v for k, v in std.items() if k not in ("cross_kv", "decoder_step")} == \
        {k: v for k, v in ort_.items() if k not in ("cross_kv", "decoder_step")}


def test_roles_high_and_axes_in_manifest(bundles):
    """Graph roles, token-id bounds and axis bounds travel in the manifest; an io entry without them
    (an older exporter's) reads as no roles and no bound."""
    from blip_runtime.graphs import ROLE_GEMV, ROLE_LOOP, GraphSpec, axes_from_dict

    manifest = load_manifest(bundles["BlipForConditionalGeneration"] / "bundle")
    step, vision = manifest.graphs["decoder_step"], manifest.graphs["vision"]
    assert step.has(ROLE_LOOP) and step.has(ROLE_GEMV) and vision.roles == ()
    ids = next(t for t in step.inputs if t.name == "input_ids")
    assert ids.high == manifest.dims.vocab_size
    assert all(t.high is None for t in step.inputs if t.name != "input_ids")
    assert axes_from_dict(manifest.data["axes"]) == blip_axes(manifest.dims, Limits())
    old = step.to_dict()
    del old["roles"]
    for t in old["inputs"]:
        del t["high"]
    again = GraphSpec.from_dict(old)
    assert again.roles == () and all(t.high is None for t in again.inputs)
    assert GraphSpec.from_dict(step.to_dict()) == step


def test_cross_kv_writes_each_output_from_its_own_matmul(bundles):
    """cross_kv has one MatMul per cross-attention K or V projection and no Slice: a fused
    [B, N, 2*L*D] product sliced apart cost an extra 42 MB per row and 24 copies at BLIP-base size."""
    import onnx

    manifest = load_manifest(bundles["BlipForConditionalGeneration"] / "bundle")
    ops = [n.op_type for n in onnx.load(str(manifest.graph_path("cross_kv")), load_external_data=False).graph.node]
    outputs = len(manifest.graphs["cross_kv"].outputs)
    assert ops.count("MatMul") == outputs == 2 * manifest.dims.num_layers, ops
    assert "Slice" not in ops and "Split" not in ops, ops
