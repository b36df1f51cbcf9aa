"""BLIP-2 fp16 bundles (blip_export.families.blip2.precision): every fp16 graph against its fp32 source
on feeds recorded from fresh images (printed), on ONNX Runtime and in fp16 arithmetic, no NaN/inf; the Q-Former graphs stay fp32 whole; T5's
wo, residual Adds and RMSNorms stay fp32 and the manifest says why; and a Flan-T5-style checkpoint
whose fp32 activations pass fp16's 65504 decodes the fp32 tokens in our fp16, where the core's rules
alone give NaN/inf or other tokens."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from blip2_oracle import hf_config, processor, rerandomize
from blip2_precision_bundles import KINDS, TEXTS, Bundles, images
from blip_export.calibration import calibration_feeds
from blip_export.families.blip2.precision import QFORMER_GRAPHS, t5_islands
from blip_export.measure import graph_errors, ort_session, run_all, tensor_types
from blip_export.bundle import export_bundle
from blip_export.precision import FP16_WHY, convert_bundle, to_fp16
from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest

FP16_MAX = 65504.0
# Relative error (max|a-b| / max|b|, worst output) of an fp16 graph against fp32 on fresh feeds.
# Measured on these tiny models: 2.5e-4..6.2e-4 on ONNX Runtime, 5.8e-4..1.0e-3 in fp16 arithmetic
# (Fp16Arithmetic), so 5e-3 keeps 5x margin; errors of 1e-2 and more would mean an fp32 island is missing.
FP16_BOUND = 5e-3


class Fp16Arithmetic:
    """A runtime Session that runs each graph in onnx's reference evaluator (numpy), where an fp16
    tensor is computed and stored in fp16, as a GPU (TensorRT, CUDA) computes it. ONNX Runtime's CPU
    provider has no fp16 kernels for most ops and runs them in fp32 between Casts it inserts and then
    removes in pairs, so an fp16 overflow never shows there. `files`: graph name -> path."""

    def __init__(self, files: dict):
        from onnx.reference import ReferenceEvaluator

        self.evaluators = {g: ReferenceEvaluator(str(p)) for g, p in files.items()}
        self.inputs = {g: {i.name for i in onnx.load(str(p), load_external_data=False).graph.input}
                       for g, p in files.items()}

    def run(self, graph, feeds, keep=()):
        ev = self.evaluators[graph]
        out = ev.run(None, {k: v for k, v in feeds.items() if k in self.inputs[graph]})
        return dict(zip(ev.output_names, out))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("blip2-fp16"))


def _float16_tensors(path) -> int:
    return sum(t == onnx.TensorProto.FLOAT16 for t in tensor_types(path).values())


@pytest.mark.parametrize("kind", [*KINDS, "model-t5"])
def test_fp16_graphs_against_fp32(bundles, kind):
    fp32, ours = load_manifest(bundles(kind)), load_manifest(bundles(kind, "fp16"))
    assert ours.data["precision"] == "fp16"
    feeds = calibration_feeds(bundles(kind), images(3, seed=40), TEXTS[2:5], max_new_tokens=6)
    assert set(feeds) == set(ours.graphs), "every graph fed"
    for name in ours.graphs:
        got = run_all(ort_session(ours.graph_path(name)), feeds[name])
        err = graph_errors(got, run_all(ort_session(fp32.graph_path(name)), feeds[name]))
        info = ours.data["graphs"][name]["precision"]
        top1 = f", top-1 {err['top1']:.3f}" if "top1" in err else ""
        print(f"{kind} fp16 {name} ({info['precision']}): max abs {err['max_abs']:.3e}, relative {err['rel']:.3e}{top1}")
        assert all(np.isfinite(v).all() for o in got for v in o.values()), f"{name}: NaN/inf in fp16"
        assert err["rel"] < FP16_BOUND, (name, err["rel"])
        # and in fp16 arithmetic, as a GPU computes the graph (ONNX Runtime's CPU runs most fp16 ops in fp32)
        true16 = Fp16Arithmetic({name: ours.graph_path(name)})
        got16 = [true16.run(name, f) for f in feeds[name]]
        err16 = graph_errors(got16, run_all(ort_session(fp32.graph_path(name)), feeds[name]))
        print(f"{kind} fp16 {name} in fp16 arithmetic: max abs {err16['max_abs']:.3e}, relative {err16['rel']:.3e}"
              + (f", top-1 {err16['top1']:.3f}" if "top1" in err16 else ""))
        assert all(np.isfinite(v).all() for o in got16 for v in o.values()), f"{name}: NaN/inf in fp16 arithmetic"
        assert err16["rel"] < FP16_BOUND, (name, err16["rel"])
        if name in QFORMER_GRAPHS:  # fp32 whole, and the manifest says why
            assert info["precision"] == "fp32" and info["kept_fp32"] == "whole graph" and "Q-Former" in info["reason"]
            assert _float16_tensors(ours.graph_path(name)) == 0 and err["max_abs"] == 0.0, name
        else:
            assert info["precision"] == "fp16" and info["fp16_nodes"] > 0, name
            if name != "t5_cross_kv":  # its two MatMuls per layer have nothing to keep
                assert info["kept_fp32"]["op_type"] or info["kept_fp32"].get("rms_norm"), name
            # the manifest says why for every reason with nodes: the core's in "why", the family's in "notes"
            used = {r for r, nodes in info["kept_fp32"].items() if nodes}
            assert used & set(FP16_WHY) <= set(info["why"]), (name, used, info["why"])
            assert not used - set(FP16_WHY) or info.get("notes"), (name, used)


def test_t5_islands_in_the_manifest(bundles):
    """t5_encoder / t5_step keep every wo MatMul, every residual Add and every RMSNorm in fp32; the
    other LM graphs keep T5 rules out; the graph files agree with what the manifest says."""
    data = load_manifest(bundles("t5", "fp16")).data
    layers = json.loads((bundles.checkpoint("t5") / "config.json").read_text())["text_config"]["num_layers"]
    for name, sublayers in (("t5_encoder", 2), ("t5_step", 3)):
        info = data["graphs"][name]["precision"]
        kept = info["kept_fp32"]
        print(f"{name}: kept fp32 {json.dumps({k: len(v) for k, v in kept.items()})}; {info['notes']}")
        wo = [n for n in kept["feed_forward_output"] if n.endswith("MatMul")]
        assert len(wo) == layers and all("/wo" in n for n in wo), wo
        assert len(kept["residual"]) == layers * sublayers, kept["residual"]
        assert sum(n.endswith("/Pow") for n in kept["rms_norm"]) == layers * sublayers + 1  # + the final norm
        assert "wo" in info["notes"] and "overflow" in info["notes"]
        path = bundles("t5", "fp16") / data["graphs"][name]["file"]
        types = tensor_types(path)
        nodes = {n.name: n for n in onnx.load(str(path)).graph.node}
        for n in (*wo, *kept["residual"]):
            assert types[nodes[n].output[0]] == onnx.TensorProto.FLOAT, f"{name}: {n} is not fp32"
    assert "rms_norm" not in data["graphs"]["t5_cross_kv"]["precision"]["kept_fp32"]
    kept = load_manifest(bundles("model-t5", "fp16")).data["graphs"]["text_states"]["precision"]["kept_fp32"]
    assert kept["rms_norm"] and kept["residual"] and kept["feed_forward_output"], kept  # T5's encoder, as text_states
    kept = load_manifest(bundles("model", "fp16")).data["graphs"]["text_states"]["precision"]["kept_fp32"]
    assert "rms_norm" not in kept and kept["op_type"], kept  # OPT's: LayerNormalization, the core's rule


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_end_to_end(bundles, kind):
    """Generated tokens, ITM and ITC of the fp16 bundle against fp32 on the held-out images (the manifest's
    accuracy, printed): fp16 agreed on every held-out request when measured; a quarter of slack for
    tiny random models whose logit margins can be ~1e-3."""
    e2e = load_manifest(bundles(kind, "fp16")).data["accuracy"]["end_to_end"]
    print(f"{kind} fp16 end to end: {json.dumps(e2e)}")
    for key in ("caption", "caption_prompted", "vqa"):
        if key in e2e:
            assert e2e[key]["identical"] >= 0.75, (key, e2e[key])
    for key in ("itm", "itc", "features", "text_states"):
        if key in e2e:
            assert e2e[key]["max_abs"] < 5e-3, (key, e2e[key])
    rt = BlipRuntime.load(bundles(kind, "fp16"))
    assert rt.manifest.data["precision"] == "fp16"


# -- Flan-T5's overflow ------------------------------------------------------------------------------

WO_SCALE = 2e4  # wo std 0.1 -> 2000 (still finite in fp16: the weights fit, the activations do not)
WI_SCALE = 4.0


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    """A Flan-T5-style tiny checkpoint with large feed-forward weights (wo x WO_SCALE, wi x WI_SCALE),
    its fp32 bundle and our fp16 bundle."""
    import transformers

    root = tmp_path_factory.mktemp("t5-overflow")
    config = hf_config("t5", True)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    head = model.language_model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied, as Flan-T5's files have it
    rerandomize(model, seed=11, std=0.1)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if name.endswith("DenseReluDense.wo.weight"):
                p.mul_(WO_SCALE)
            elif ".DenseReluDense.wi_" in name:
                p.mul_(WI_SCALE)
    model.save_pretrained(root / "ckpt")
    processor("t5", config.num_query_tokens, config.vision_config.image_size).save_pretrained(root / "ckpt")
    export_bundle(root / "ckpt", root / "fp32")
    convert_bundle(root / "fp32", root / "fp16", "fp16", holdout_images=images(4, seed=20),
                   holdout_texts=TEXTS[:4])
    return root


def _with_outputs(path, names, out):
    """A copy of the graph at `path` that also outputs the tensors `names` (float32, any shape)."""
    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out))
    return out


def _fp16_runtime(bundle, replace: dict | None = None):
    manifest = load_manifest(bundle)
    files = {g: manifest.graph_path(g) for g in manifest.graphs}
    return BlipRuntime(manifest, Fp16Arithmetic({**files, **(replace or {})}))


def test_fp16_overflow_of_flan_t5(overflow, tmp_path):
    """The fp32 residual stream passes 65504; in fp16 arithmetic the core's rules alone give NaN/inf
    (or other tokens) and ours the fp32 tokens; on ONNX Runtime's CPU ours matches fp32 too."""
    import warnings

    fp32 = load_manifest(overflow / "fp32")
    ours_manifest = load_manifest(overflow / "fp16")
    imgs = images(2, seed=21)
    feeds = calibration_feeds(overflow / "fp32", imgs, TEXTS[:2], tasks=["generate"], max_new_tokens=4)
    naive = {}
    for name in ("t5_encoder", "t5_step"):
        src = fp32.graph_path(name)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
        nodes = {n.name: n for n in model.graph.node}
        stream = [nodes[n].output[0] for n in t5_islands(model)["residual"]]
        probe = ort_session(_with_outputs(src, stream, tmp_path / f"{name}-probe.onnx"))
        peak = max(float(np.abs(o[s]).max()) for o in run_all(probe, feeds[name]) for s in stream)
        print(f"{name}: fp32 residual stream peaks at {peak:.3e} (fp16 max {FP16_MAX:.0f})")
        assert peak > FP16_MAX, f"{name}: the checkpoint must overflow fp16 for this test to mean anything"

        naive[name] = tmp_path / f"{name}-naive.onnx"
        to_fp16(src, naive[name], name)  # the core's islands alone: LayerNormalization, Softmax, the mask
        reference = run_all(ort_session(src), feeds[name])
        results = {}
        for label, path in (("core rules only", naive[name]), ("ours", ours_manifest.graph_path(name))):
            session = Fp16Arithmetic({name: path})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow warnings: what is tested
                got = [session.run(name, f) for f in feeds[name]]
            finite = all(np.isfinite(v).all() for o in got for v in o.values())
            err = graph_errors(got, reference) if finite else None
            results[label] = (finite, err)
            print(f"{name} in fp16 arithmetic ({label}): finite {finite}" + (
                f", relative {err['rel']:.3e}" + (f", top-1 {err['top1']:.3f}" if "top1" in err else "") if err else ""))
        finite, err = results["core rules only"]
        assert not finite or err["rel"] > 0.1 or err.get("top1", 1.0) < 1.0, "the naive conversion should fail here"
        finite, err = results["ours"]
        assert finite and err["rel"] < FP16_BOUND and err.get("top1", 1.0) == 1.0, err

    want = BlipRuntime.load(overflow / "fp32").caption_tokens(imgs, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = _fp16_runtime(overflow / "fp16").caption_tokens(imgs, max_new_tokens=4)
        bad = _fp16_runtime(overflow / "fp16", naive).caption_tokens(imgs, max_new_tokens=4)
    print(f"caption tokens: fp32 {want}, ours in fp16 arithmetic {got}, core rules only {bad}")
    assert got == want and any(len(t) > 1 for t in want), (got, want)
    assert bad != want
    e2e = ours_manifest.data["accuracy"]["end_to_end"]  # ONNX Runtime CPU, held-out images
    print(f"overflowing Flan-T5 fp16 end to end (ONNX Runtime): {json.dumps(e2e)}")
    for key in ("caption", "caption_prompted", "vqa"):  # a tiny random model's margins: one request may flip
        assert e2e[key]["identical"] >= 0.75, (key, e2e[key])
