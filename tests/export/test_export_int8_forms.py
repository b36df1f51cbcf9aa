"""Which int8 a user gets: --precision int8 is ONNX Runtime's CPU form for --target onnx and Q/DQ for
--target trt; --precision int8-qdq asks for Q/DQ in an ONNX bundle; int8-cpu stays an accepted name;
the manifest says which form a bundle holds. Speed is the benchmarks' business: only the forms are
checked here (the graphs' operators), on a tiny caption checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from blip_export.files import ExportError
from blip_export.pipeline import output_for, resolve_precision
from blip_runtime.manifest import load_manifest
from oracle import make_full_checkpoint

QDQ = {"QuantizeLinear", "DequantizeLinear"}
ORT_CPU_INT8 = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                "MatMulNBits"}


@pytest.mark.parametrize("precision,target,form", [
    ("int8", "onnx", "int8-cpu"),
    ("int8", "trt", "int8-qdq"),
    ("int8-cpu", "onnx", "int8-cpu"),
    ("int8-qdq", "onnx", "int8-qdq"),
    ("int8-qdq", "trt", "int8-qdq"),
    ("fp16", "trt", "fp16"),
    ("fp32", "onnx", "fp32"),
])
def test_resolve_precision(precision, target, form, tmp_path):
    assert resolve_precision(precision, target) == form
    suffix = form if target == "onnx" else f"{form}-trt"
    assert output_for(tmp_path / "m", precision, target).name == f"m-{suffix}"


@pytest.mark.parametrize("precision,target,message", [
    ("int8-cpu", "trt", "--precision int8-cpu is ONNX Runtime's CPU form; TensorRT takes --precision int8"),
    ("int2", "onnx", "--precision int2: expected one of fp32, fp16, int8, int8-cpu, int8-qdq, int4"),
    ("int4", "trt", "--precision int4 is ONNX Runtime's CPU form; TensorRT takes --precision int8"),
    ("int8", "tflite", "--target tflite: expected onnx or trt"),
])
def test_resolve_precision_refuses(precision, target, message):
    with pytest.raises(ExportError, match=message):
        resolve_precision(precision, target)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8") / "caption"
    make_full_checkpoint("BlipForConditionalGeneration", folder, seed=5, std=0.1)
    return folder


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def op_types(bundle) -> set[str]:
    manifest = load_manifest(bundle)
    return {n.op_type for name in manifest.graphs for n in onnx.load(str(manifest.graph_path(name))).graph.node}


def test_int8_on_onnx_is_the_cpu_form(ckpt, tmp_path):
    """The CLI's int8 for --target onnx: ONNX Runtime's int8 operators, no Q/DQ pairs."""
    r = subprocess.run([sys.executable, "-m", "blip_export.cli", str(ckpt), "--precision", "int8", "--quantize-all",
                        "-o", str(tmp_path / "b"), "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "int8-cpu" in r.stdout, r.stdout
    manifest = load_manifest(tmp_path / "b")
    assert manifest.data["precision"] == "int8-cpu"
    assert manifest.data["attention_op"] == "com.microsoft.MultiHeadAttention"
    ops = op_types(tmp_path / "b")
    assert ops & ORT_CPU_INT8 and not ops & QDQ, sorted(ops)


def test_int8_qdq_in_an_onnx_bundle(ckpt, calib, tmp_path):
    from blip_export.pipeline import export

    report = export(ckpt, tmp_path / "b", precision="int8-qdq", calib_images=calib, quantize_all=True)
    assert report.precision == "int8-qdq" and report.accuracy["graphs"]
    manifest = load_manifest(tmp_path / "b")
    assert manifest.data["precision"] == "int8-qdq" and "attention_op" not in manifest.data
    assert all(g["precision"]["format"] == "qdq-symmetric-int8" for g in manifest.data["graphs"].values())
    ops = op_types(tmp_path / "b")
    assert QDQ <= ops and not ops & ORT_CPU_INT8, sorted(ops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "no staging folder left"


def test_int8_cpu_for_tensorrt_is_refused_before_any_work(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "blip_export.cli", str(ckpt), "--precision", "int8-cpu", "--target",
                        "trt", "-o", str(tmp_path / "b")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--precision int8-cpu is ONNX Runtime's CPU form" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
