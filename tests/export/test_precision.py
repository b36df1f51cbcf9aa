"""fp16, int8-qdq (Q/DQ) and int8-cpu bundles converted from tiny fp32 bundles: they load in BlipRuntime
and run every task on ONNX Runtime CPU; their graphs stay within measured error bounds of fp32, have
a type for every tensor, and (int8) carry symmetric int8 Q/DQ with per-channel weight scales.

The checkpoints are tiny and random (std 0.1), so the numbers say how the conversion behaves, not
how accurate a trained BLIP is in int8: random logits have small margins, which makes greedy text
agreement a harsh measure here. Every error is printed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blip_export.bundle import ExportError, export_bundle, sha256
from blip_export.calibration import calibration_feeds
from blip_export.measure import check_typed, graph_errors, ort_session, run_all
from blip_export.precision import convert_bundle, to_fp16
from blip_export.quantize import INT8_BOUND, INT8_MIN_TOP1, search_exclusions
from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest
from oracle import make_full_checkpoint

MODELS = {"caption": ("BlipForConditionalGeneration", 1), "vqa": ("BlipForQuestionAnswering", 2),
          "itr": ("BlipForImageTextRetrieval", 3)}
CASES = [(m, p) for m in MODELS for p in ("fp16", "int8-qdq")] + [("caption", "int8-cpu")]
TEXTS = ["a red circle on the left", "what color is the shape?", "two blue squares", "is there a triangle",
         "a", "a picture of a green square on the top right", "what", "the small dog"]

# Relative error bounds (max|a-b| / max|b|, worst output) of each graph against fp32 on feeds from
# fresh images, i.e. not the held-out ones the int8 exclusion search looked at. Measured on these
# tiny models: fp16 3e-4..7e-4, so 5e-3 keeps ~7x margin (fp16 has a 5e-4 relative step; errors
# in the 1e-2 range would mean an fp32 island is missing). int8 1e-2..4e-2 on the held-out feeds the
# search bounds at INT8_BOUND = 0.05; fresh feeds may land a little higher, so twice the bound.
GRAPH_BOUND = {"fp16": 5e-3, "int8-qdq": 2 * INT8_BOUND, "int8-cpu": 2 * INT8_BOUND}


def images(n, seed, size=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size + 5 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


class Bundles:
    """Tiny checkpoints -> fp32 bundles -> converted bundles, each built once, on first use."""

    def __init__(self, root: Path):
        self.root, self.made, self.manifests = root, {}, {}

    def __call__(self, model: str, precision: str = "fp32") -> Path:
        key = (model, precision)
        if key not in self.made:
            dst = self.root / f"{model}-{precision}"
            if precision == "fp32":
                arch, seed = MODELS[model]
                make_full_checkpoint(arch, self.root / f"{model}-ckpt", seed=seed, std=0.1)
                export_bundle(self.root / f"{model}-ckpt", dst)
            elif precision == "fp32-ort":  # what blip-export converts int8-cpu from
                self(model)
                export_bundle(self.root / f"{model}-ckpt", dst, ort_attention=True)
            else:
                # Calibrate on 8 images, measure on 4 others; int8-cpu and fp16 calibrate nothing.
                source = self(model, "fp32-ort" if precision == "int8-cpu" else "fp32")
                self.manifests[key] = convert_bundle(
                    source, dst, precision, images(8, seed=10), TEXTS,
                    holdout_images=images(4, seed=20), holdout_texts=TEXTS[::-1][:4],
                )
            self.made[key] = dst
        return self.made[key]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("precision"))


@pytest.mark.parametrize("model,precision", CASES)
def test_bundle_runs_every_task(bundles, model, precision):
    rt = BlipRuntime.load(bundles(model, precision))
    assert rt.manifest.data["precision"] == precision
    imgs = images(2, seed=30)
    if "caption" in rt.tasks:
        caps = rt.caption(imgs, max_new_tokens=6) + rt.caption(imgs, ["a picture of", "a"], max_new_tokens=6)
        assert all(isinstance(c, str) for c in caps)
        print(f"{model} {precision} captions: {caps}")
    if "vqa" in rt.tasks:
        answers = rt.answer(imgs, ["what color is it?", "how many"], max_new_tokens=5)
        assert len(answers) == 2
        print(f"{model} {precision} answers: {answers}")
    if "itm" in rt.tasks:
        p = rt.match(imgs, ["a red circle", "two squares"])
        assert p.shape == (2,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    if "itc" in rt.tasks:
        sim = rt.retrieve(imgs, ["a red circle", "two squares", "a dog"])
        assert sim.shape == (2, 3) and np.isfinite(sim).all()
        assert np.allclose(np.linalg.norm(rt.image_features(imgs), axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("model,precision", CASES)
def test_graph_errors_against_fp32(bundles, model, precision):
    """Each graph against its fp32 source on feeds recorded from fresh images (decoder_step: every
    step of the fp32 greedy loop), and the manifest's accuracy entry from the held-out images.
    int8-cpu's source is the fp32 bundle in ONNX Runtime's form (its cross-attention key layout)."""
    source = bundles(model, "fp32-ort" if precision == "int8-cpu" else "fp32")
    fp32, ours = load_manifest(source), load_manifest(bundles(model, precision))
    feeds = calibration_feeds(source, images(3, seed=40), TEXTS[2:5], max_new_tokens=8)
    for name in ours.graphs:
        err = graph_errors(run_all(ort_session(ours.graph_path(name)), feeds[name]),
                           run_all(ort_session(fp32.graph_path(name)), feeds[name]))
        held = ours.data["accuracy"]["graphs"][name]
        top1 = f", top-1 agreement {err['top1']:.3f}" if "top1" in err else ""
        print(f"{model} {precision} {name}: max abs {err['max_abs']:.3e}, relative {err['rel']:.3e}{top1} "
              f"(held-out: max abs {held['max_abs']:.3e}, relative {held['rel']:.3e})")
        assert np.isfinite(err["max_abs"]), f"{name}: non-finite outputs"
        assert err["rel"] < GRAPH_BOUND[precision], f"{name}: relative error {err['rel']:.3e} (max abs {err['max_abs']:.3e})"
        if precision == "int8-qdq":
            # The exclusion search guarantees its bounds on the held-out feeds it measured.
            assert held["rel"] <= INT8_BOUND and held.get("top1", 1.0) >= INT8_MIN_TOP1, held


@pytest.mark.parametrize("model,precision", CASES)
def test_end_to_end_agreement(bundles, model, precision):
    """Identical greedy text on held-out images, ITM / ITC differences: measured and printed. Bounds
    are loose for int8 (tiny random models have logit margins of ~0.1: one flipped token changes a
    whole caption), tight for fp16 (which agreed on every held-out request when measured)."""
    e2e = load_manifest(bundles(model, precision)).data["accuracy"]["end_to_end"]
    print(f"{model} {precision} end to end on {e2e['images']} held-out images: {json.dumps(e2e)}")
    for key in ("caption", "caption_prompted", "vqa"):
        if key in e2e:
            assert e2e[key]["identical"] >= (0.75 if precision == "fp16" else 0.25), (key, e2e[key])
    if "itm" in e2e:
        assert e2e["itm"]["max_abs"] < (1e-3 if precision == "fp16" else 0.05), e2e["itm"]
    if "itc" in e2e:
        assert e2e["itc"]["max_abs"] < (1e-3 if precision == "fp16" else 0.05), e2e["itc"]


@pytest.mark.parametrize("model,precision", CASES)
def test_every_tensor_typed_and_io_unchanged(bundles, model, precision):
    manifest = load_manifest(bundles(model, precision))
    for name, spec in manifest.graphs.items():
        path = manifest.graph_path(name)
        check_typed(path)  # checker + strict shape inference; no tensor of undefined type
        graph = onnx.load(str(path), load_external_data=False).graph
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                  for v in (*graph.input, *graph.output)}
        assert dtypes == {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}, name


@pytest.mark.parametrize("model", MODELS)
def test_int8_graphs_carry_symmetric_per_channel_qdq(bundles, model):
    manifest = load_manifest(bundles(model, "int8-qdq"))
    for name in manifest.graphs:
        graph = onnx.load(str(manifest.graph_path(name))).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert any(n.op_type == "QuantizeLinear" for n in qdq) and any(n.op_type == "DequantizeLinear" for n in qdq)
        for n in qdq:
            zero = inits[n.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), f"{name}: {n.name} zero point {zero.dtype} {zero}"
        weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        activations = [n for n in qdq if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
        assert weights and activations, f"{name}: {len(weights)} weight DQ, {len(activations)} activation Q"
        for n in weights:
            w, scale = inits[n.input[0]], inits[n.input[1]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert w.dtype == np.int8 and scale.ndim == 1 and scale.size == w.shape[axis] > 1, (name, n.name)
        info = manifest.data["graphs"][name]["precision"]
        softmax = sum(n.op_type == "Softmax" for n in graph.node)
        assert len(info["excluded_by_rule"]) == softmax, "every probabilities @ V MatMul stays float"
        dq_out = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
        quantized = {c.name for c in graph.node if c.op_type in ("MatMul", "Gemm", "Conv") and set(c.input) & dq_out}
        print(f"{model} {name}: {len(quantized)} int8 GEMMs, kept in fp32: {info['excluded_groups']}")
        assert not quantized & set(info["excluded_nodes"]), "an excluded node was quantized"


def test_int8_cpu_is_dynamic_quantization(bundles):
    manifest = load_manifest(bundles("caption", "int8-cpu"))
    assert manifest.data["attention_op"] == "com.microsoft.MultiHeadAttention"
    for name in manifest.graphs:
        nodes = onnx.load(str(manifest.graph_path(name))).graph.node
        ops = {n.op_type for n in nodes}
        assert ("MultiHeadAttention" in ops) == (name in ("vision", "decoder_step")), (name, ops)
        if name == "decoder_step":  # a few rows per call: 8-bit MatMulNBits, int8 compute
            nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
            attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
            assert nbits and all(a["bits"] == 8 and a["accuracy_level"] == 4 and a["block_size"] == 128 for a in attrs)
            assert manifest.data["graphs"][name]["precision"]["format"] == "ort-matmulnbits-int8"
        else:
            assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "DynamicQuantizeLinear" in ops, (name, ops)


@pytest.mark.parametrize("model", ["caption", "itr"])
def test_ort_attention_export(bundles, model):
    """export_bundle(ort_attention=True): the vision graph's attention, and a decoder step's self- and
    cross-attention, are one com.microsoft node each per layer, with the cross-attention keys in that
    operator's [.., enc, Dh] layout; every graph's outputs equal the standard graph's on fresh feeds
    (keys transposed between the two); TensorRT's operator check refuses those graphs."""
    from blip_export.trt_onnx_support import problems

    std, ort_ = load_manifest(bundles(model)), load_manifest(bundles(model, "fp32-ort"))
    assert ort_.data["attention_op"] == "com.microsoft.MultiHeadAttention" and "attention_op" not in std.data
    vision = onnx.load(str(ort_.graph_path("vision")))
    mha = [n for n in vision.graph.node if n.op_type == "MultiHeadAttention"]
    layers = json.loads((bundles.root / f"{model}-ckpt" / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    assert len(mha) == layers and all(n.domain == "com.microsoft" for n in mha)
    assert not [n for n in vision.graph.node if n.op_type == "Softmax"], "no attention left in standard ops"
    assert any("MultiHeadAttention" in p for p in problems(vision))
    if "decoder_step" in ort_.graphs:  # self-attention with past/present K/V, and cross-attention
        step_model = onnx.load(str(ort_.graph_path("decoder_step")))
        step = step_model.graph
        text_layers = json.loads((bundles.root / f"{model}-ckpt" / "config.json").read_text())["text_config"]["num_hidden_layers"]
        mha = [n for n in step.node if n.op_type == "MultiHeadAttention"]
        cached = [n for n in mha if len(n.output) == 3]  # self-attention: past in, present out
        assert len(cached) == text_layers and all(len(n.input) == 8 for n in cached)
        assert {o for n in cached for o in n.output[1:]} == {t.name for t in ort_.graphs["decoder_step"].outputs[1:]}
        cross = {n.input[1] for n in mha if len(n.output) == 1}
        assert cross == {f"cross_key.{i}" for i in range(text_layers)}
        assert not [n for n in step.node if n.op_type == "Softmax"], "no attention left in standard ops"
        assert any("MultiHeadAttention" in p for p in problems(step_model))
        key_std = next(t for t in std.graphs["decoder_step"].inputs if t.name == "cross_key.0").shape
        key_ort = next(t for t in ort_.graphs["decoder_step"].inputs if t.name == "cross_key.0").shape
        assert key_ort == (*key_std[:2], key_std[3], key_std[2])
    swap = lambda d: {k: np.swapaxes(v, -1, -2) if k.startswith("cross_key") else v for k, v in d.items()}  # noqa: E731
    feeds = calibration_feeds(bundles(model), images(3, seed=41), TEXTS[:3], max_new_tokens=4)
    for name in std.graphs:
        ort_feeds = [swap(f) for f in feeds[name]]
        err = graph_errors([swap(o) for o in run_all(ort_session(ort_.graph_path(name)), ort_feeds)],
                           run_all(ort_session(std.graph_path(name)), feeds[name]))
        print(f"{model} {name} ort attention vs standard: max abs {err['max_abs']:.2e}, relative {err['rel']:.2e}")
        assert err["rel"] < 1e-5, (name, err)


@pytest.mark.parametrize("precision", ["fp16", "int8-qdq"])
def test_manifest_describes_the_conversion(bundles, precision):
    folder = bundles("caption", precision)
    data = json.loads((folder / "manifest.json").read_text())
    fp32 = json.loads((bundles("caption") / "manifest.json").read_text())
    assert data["precision"] == precision and data["tasks"] == fp32["tasks"]
    for name, entry in data["graphs"].items():
        assert entry["sha256"] == sha256(folder / entry["file"]) != fp32["graphs"][name]["sha256"]
        assert entry["io"] == fp32["graphs"][name]["io"]
        assert entry["precision"]["precision"] == precision
        assert set(data["accuracy"]["graphs"][name]) >= {"max_abs", "rel"}
    if precision == "fp16":
        kept = data["graphs"]["decoder_step"]["precision"]["kept_fp32"]
        assert kept["op_type"] and kept["attention_mask"], kept
    else:
        assert "excluded_nodes" in data["graphs"]["decoder_step"]["precision"]
    assert not list(folder.parent.glob(f".{folder.name}.*")), "temporary folder left behind"


def test_fp16_masked_rows_stay_finite(bundles, tmp_path):
    """Left-padded prompts in a batch give query rows with every key masked. With the mask in fp16
    (float32 min -> -inf) those rows softmax to NaN, and NaN in the cached keys/values of padding
    poisons every later step; fp16_islands keeps the mask in fp32."""
    fp32 = load_manifest(bundles("caption"))
    feeds = calibration_feeds(bundles("caption"), images(2, seed=50), ["a", "a picture of the"], tasks=["caption"],
                              max_new_tokens=3)["decoder_step"]
    padded = [f for f in feeds if (f["attention_mask"][:, 0] == 0).any() and f["input_ids"].shape[1] > 1]
    assert padded, "no left-padded prompt step was recorded"
    out = tmp_path / "decoder_step.onnx"
    to_fp16(fp32.graph_path("decoder_step"), out, "decoder_step")
    got = run_all(ort_session(out), padded)
    assert all(np.isfinite(v).all() for o in got for v in o.values())
    err = graph_errors(got, run_all(ort_session(fp32.graph_path("decoder_step")), padded))
    print(f"fp16 decoder_step on left-padded prompts: max abs {err['max_abs']:.3e}, relative {err['rel']:.3e}")
    assert err["rel"] < GRAPH_BOUND["fp16"]


def test_calibration_feeds_cover_the_decoding_loop(bundles):
    feeds = calibration_feeds(bundles("vqa"), images(2, seed=60), ["what is it", "how many"],
                              max_new_tokens=5, min_new_tokens=5)
    assert len(feeds["vision"]) == 1 and len(feeds["text_encoder"]) == 1 and len(feeds["cross_kv"]) == 1
    past = sorted({f["past_key.0"].shape[2] for f in feeds["decoder_step"]})
    assert past[0] == 0 and len(past) >= 4, past  # every step of the greedy loop, from the empty cache
    assert feeds["cross_kv"][0]["encoder_states"].shape[1] == feeds["text_encoder"][0]["input_ids"].shape[1]


def test_int8_needs_calibration_images(bundles, tmp_path):
    with pytest.raises(ExportError, match="calibration images"):
        convert_bundle(bundles("caption"), tmp_path / "x", "int8-qdq")
    with pytest.raises(ExportError, match="expected one of"):
        convert_bundle(bundles("caption"), tmp_path / "x", "int2")
    assert not (tmp_path / "x").exists()


def test_search_excludes_the_most_sensitive_groups(tmp_path):
    """search_exclusions on a fake graph whose error is the sum of its quantized groups' errors."""
    cost = {"a": 0.04, "b": 0.01, "c": 0.03, "d": 0.001}
    groups = {g: [f"{g}/MatMul"] for g in cost}
    state = {}

    def quantize(exclude, path):
        state[path] = sum(c for g, c in cost.items() if f"{g}/MatMul" not in exclude)

    def evaluate(path):
        return {"max_abs": state[path], "rel": state[path]}

    result = search_exclusions(quantize, evaluate, groups, bound=0.035, workdir=tmp_path)
    # All: 0.081. Sensitivities a > c > b > d; excluding a leaves 0.041, then c leaves 0.011;
    # quantizing a again would give 0.051 > bound, so a and c stay excluded.
    assert result["excluded_groups"] == ["a", "c"] and result["error"]["rel"] == pytest.approx(0.011)
    assert list(result["sensitivity"]) == ["a", "c", "b", "d"]
    assert search_exclusions(quantize, evaluate, groups, bound=0.1, workdir=tmp_path)["excluded_groups"] == []
    # bound None (--quantize-all): no search even far out of bounds.
    none = search_exclusions(quantize, evaluate, groups, bound=None, workdir=tmp_path)
    assert none["excluded_groups"] == [] and none["error"]["rel"] == pytest.approx(0.081)


def test_quantize_all_keeps_no_layer_in_fp32(bundles, tmp_path):
    """--quantize-all: every const-weight MatMul is int8 whatever the error, and the manifest says so."""
    data = convert_bundle(bundles("caption"), tmp_path / "all", "int8-cpu", holdout_images=images(2, seed=20),
                          bound=None)
    for name, entry in data["graphs"].items():
        info = entry["precision"]
        assert info["excluded_nodes"] == [] and info["exclusion_search"].startswith("off"), (name, info)
        graph = onnx.load(str(tmp_path / "all" / entry["file"])).graph
        consts = {i.name for i in graph.initializer}
        fp32_weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in consts]
        assert not fp32_weight_matmuls, (name, fp32_weight_matmuls)
    searched = bundles.manifests.get(("caption", "int8-cpu")) or load_manifest(bundles("caption", "int8-cpu")).data
    assert all(e["precision"]["exclusion_search"] == "on" for e in searched["graphs"].values())


def test_cli_quantize_all_needs_an_int8_precision(capsys, tmp_path):
    from blip_export.cli import main

    assert main(["caption", "--precision", "fp16", "--quantize-all", "-o", str(tmp_path / "b")]) == 2
    assert "--quantize-all applies to --precision int8, int8-cpu, int8-qdq or int4" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()



def test_nbits_quantizer_import_leaves_logging_alone():
    """onnxruntime's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) on import; ours
    must not turn on INFO logging in the host process (fresh interpreter: pytest has its own handlers)."""
    import subprocess
    import sys

    code = ("import logging; from blip_export.weight_only import _nbits_quantizer; _nbits_quantizer(); "
            "root = logging.getLogger(); print(len(root.handlers), root.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out == ["0", str(logging.WARNING)], out
