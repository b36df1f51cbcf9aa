"""int4 bundles (--precision int4, --target onnx): the decoding loop's step graphs (ROLE_GEMV: opt_step,
t5_step, BLIP's decoder_step) with 4-bit MatMulNBits weights, the other graphs int8-cpu; errors against
fp32 printed and within the int4 bounds on the held-out feeds the search measured; the bundles run
in BlipRuntime; the block sizes' error and size; TensorRT refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from blip2_precision_bundles import TEXTS, Bundles, images
from blip_export.calibration import calibration_feeds
from blip_export.files import ExportError
from blip_export.measure import graph_errors, ort_session, run_all
from blip_export.pipeline import resolve_precision
from blip_export.weight_only import INT4_BLOCK, INT4_BLOCKS, INT4_BOUND, INT4_MIN_TOP1, to_int4
from blip_runtime import BlipRuntime
from blip_runtime.graphs import ROLE_GEMV
from blip_runtime.manifest import load_manifest

INT8_CPU_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("blip2-int4"))


def _nbits(path) -> list[dict]:
    return [{a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
            for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_int4_bundle(bundles, kind):
    manifest = load_manifest(bundles(kind, "int4"))
    fp32 = load_manifest(bundles(kind))
    assert manifest.data["precision"] == "int4"
    feeds = calibration_feeds(bundles(kind), images(3, seed=40), TEXTS[2:5], max_new_tokens=6)
    if kind == "opt":  # the prompt's twin of the int4 step: the same inputs, int8-cpu's many-row form
        assert manifest.data["graphs"]["opt_prefill"]["prompt_twin_of"] == "opt_step"
        assert manifest.graphs["opt_prefill"].inputs == manifest.graphs["opt_step"].inputs
        assert set(manifest.graphs) == set(fp32.graphs) | {"opt_prefill"}
        names = list(manifest.graphs)  # opened before the step: the smaller load peak (precision.convert_bundle)
        assert names.index("opt_prefill") == names.index("opt_step") - 1, names
        ops = {n.op_type for n in onnx.load(str(manifest.graph_path("opt_prefill"))).graph.node}
        assert "MatMulInteger" in ops and "MatMulNBits" not in ops, sorted(ops)  # int8-cpu's many-row form
        assert manifest.graphs["opt_prefill"].roles == ()  # once per request: no spinning pool
        # measured on the prompt calls it runs (the queries given), not on the steps: one per request
        measured = {g: manifest.data["accuracy"]["graphs"][g]["feeds"] for g in ("opt_prefill", "opt_step")}
        requests = manifest.data["accuracy"]["held_out"]["feeds"]["qformer"]
        assert measured["opt_prefill"] == requests < measured["opt_step"], (measured, requests)
    for name, spec in manifest.graphs.items():
        info = manifest.data["graphs"][name]["precision"]
        path = manifest.graph_path(name)
        of = manifest.data["graphs"][name].get("prompt_twin_of", name)  # the fp32 graph it was converted from
        err = graph_errors(run_all(ort_session(path), feeds[of]), run_all(ort_session(fp32.graph_path(of)), feeds[of]))
        held = manifest.data["accuracy"]["graphs"][name]
        top1 = f", top-1 {err['top1']:.3f}" if "top1" in err else ""
        print(f"{kind} int4 {name} ({info['format']}, kept out of 4/8 bits: {info['excluded_groups']}): max abs "
              f"{err['max_abs']:.3e}, relative {err['rel']:.3e}{top1} (held-out relative {held['rel']:.3e})")
        assert np.isfinite(err["max_abs"]), name
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        if ROLE_GEMV in spec.roles:
            assert info["format"] == "ort-matmulnbits-int4" and info["block_size"] == INT4_BLOCK
            bits = [a["bits"] for a in _nbits(path)]
            assert 4 in bits or len(info["excluded_groups"]) == len(info["sensitivity"]), bits
            graph = onnx.load(str(path)).graph
            inits = {t.name for t in graph.initializer}
            fp32_weights = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
            assert set(bits) <= {4, 8} and not fp32_weights, (bits, fp32_weights)  # kept groups: 8 bits
            # the search's guarantee, on the held-out feeds it measured
            assert held["rel"] <= INT4_BOUND and held.get("top1", 1.0) >= INT4_MIN_TOP1, held
        else:
            assert info["precision"] == "int8-cpu" and ops & INT8_CPU_OPS, (name, ops)
    e2e = manifest.data["accuracy"]["end_to_end"]
    print(f"{kind} int4 end to end: {json.dumps(e2e)}")
    assert {"caption", "caption_prompted", "vqa"} <= set(e2e)
    rt = BlipRuntime.load(bundles(kind, "int4"))
    tokens = rt.caption_tokens(images(2, seed=30), max_new_tokens=5)
    assert len(tokens) == 2 and all(isinstance(t, int) for seq in tokens for t in seq)


def test_int4_block_sizes(bundles, tmp_path):
    """Each block size ONNX Runtime takes: the error against fp32 and the file size (printed; at these
    widths, K of 32 and 48, the larger blocks are padding, so the sizes say little). The choice itself
    is measured on 512-wide LMs (see weight_only.INT4_BLOCK)."""
    fp32 = load_manifest(bundles("opt"))
    feeds = calibration_feeds(bundles("opt"), images(3, seed=41), TEXTS[:3], max_new_tokens=6)["opt_step"]
    sizes = {}
    for block in INT4_BLOCKS:
        out = tmp_path / f"b{block}.onnx"
        info = to_int4(fp32.graph_path("opt_step"), out, "opt_step", feeds, bound=None, block_size=block)
        sizes[block] = out.stat().st_size
        print(f"opt_step int4 block {block}: relative {info['error']['rel']:.3e}, top-1 {info['error']['top1']:.3f}, "
              f"{sizes[block]} bytes")
        assert {a["block_size"] for a in _nbits(out)} == {block} and {a["bits"] for a in _nbits(out)} == {4}
        assert 0 < info["error"]["rel"] < 1
    assert sizes[INT4_BLOCK] < fp32.graph_path("opt_step").stat().st_size
    with pytest.raises(ValueError, match="block_size 16: expected one of"):
        to_int4(fp32.graph_path("opt_step"), tmp_path / "x.onnx", "opt_step", feeds, block_size=16)


def test_int4_is_onnx_runtime_only():
    assert resolve_precision("int4", "onnx") == "int4"
    with pytest.raises(ExportError, match="--precision int4 is ONNX Runtime's CPU form"):
        resolve_precision("int4", "trt")


def test_blip_int4_through_the_cli(tmp_path):
    """BLIP's decoder_step the same way (from the ONNX Runtime attention form, as int8-cpu), through
    blip-export --precision int4."""
    from blip_export.cli import main
    from oracle import make_full_checkpoint

    make_full_checkpoint("BlipForConditionalGeneration", tmp_path / "ckpt", seed=5, std=0.1)
    assert main([str(tmp_path / "ckpt"), "--precision", "int4", "-o", str(tmp_path / "b"), "-q"]) == 0
    manifest = load_manifest(tmp_path / "b")
    assert manifest.data["precision"] == "int4"
    assert manifest.data["attention_op"] == "com.microsoft.MultiHeadAttention"
    step = [n for n, s in manifest.graphs.items() if ROLE_GEMV in s.roles]
    assert step and all(manifest.data["graphs"][n]["precision"]["format"] == "ort-matmulnbits-int4" for n in step)
    assert any(a["bits"] == 4 for a in _nbits(manifest.graph_path(step[0])))
    print(f"BLIP int4 end to end: {json.dumps(manifest.data['accuracy']['end_to_end'])}")
    caps = BlipRuntime.load(tmp_path / "b").caption(images(2, seed=3), max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
