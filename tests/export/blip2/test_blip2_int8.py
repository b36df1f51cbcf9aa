"""BLIP-2 int8 bundles, int8-qdq (calibrated on images and the fp32 model's own generated text) and
int8-cpu: every graph quantized (the Q-Former's too) but the layer groups the measured search keeps,
errors against fp32 on fresh feeds printed and bounded, the held-out bound the search guarantees,
end-to-end agreement in the manifest and printed by blip-export, and layer groups that name one role
across the layers for every BLIP-2 graph (T5's node names included)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from blip2_precision_bundles import KINDS, TEXTS, Bundles, images
from blip_export.calibration import calibration_feeds
from blip_export.families import family
from blip_export.measure import graph_errors, ort_session, run_all
from blip_export.quant_search import INT8_BOUND, INT8_MIN_TOP1, layer_group, quantizable_nodes
from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest

QDQ = {"QuantizeLinear", "DequantizeLinear"}
ORT_INT8 = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulNBits"}
CASES = [(k, p) for k in KINDS for p in ("int8-qdq", "int8-cpu")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("blip2-int8"))


@pytest.mark.parametrize("kind,precision", CASES)
def test_int8_graphs_against_fp32(bundles, kind, precision):
    """Fresh images (not the held-out ones the search measured): within twice the bound, as BLIP's."""
    fp32, ours = load_manifest(bundles(kind)), load_manifest(bundles(kind, precision))
    assert ours.data["precision"] == precision
    feeds = calibration_feeds(bundles(kind), images(3, seed=40), TEXTS[2:5], max_new_tokens=6)
    # int8-cpu adds opt_step's prompt twin (its step is 8-bit MatMulNBits, made for one row per beam)
    twins = {"opt_prefill"} if precision == "int8-cpu" and "opt_step" in fp32.graphs else set()
    assert set(ours.graphs) == set(fp32.graphs) | twins, sorted(ours.graphs)
    for name in twins:  # the many-row form: DynamicQuantizeLinear + MatMulInteger, no 8-bit MatMulNBits
        ops = {n.op_type for n in onnx.load(str(ours.graph_path(name))).graph.node}
        assert "MatMulInteger" in ops and "MatMulNBits" not in ops, (name, sorted(ops))
        assert "MatMulNBits" in {n.op_type for n in onnx.load(str(ours.graph_path("opt_step"))).graph.node}
    for name in ours.graphs:
        info = ours.data["graphs"][name]["precision"]
        path = ours.graph_path(name)
        of = ours.data["graphs"][name].get("prompt_twin_of", name)  # the fp32 graph it was converted from
        err = graph_errors(run_all(ort_session(path), feeds[of]), run_all(ort_session(fp32.graph_path(of)), feeds[of]))
        held = ours.data["accuracy"]["graphs"][name]
        top1 = f", top-1 {err['top1']:.3f}" if "top1" in err else ""
        print(f"{kind} {precision} {name}: max abs {err['max_abs']:.3e}, relative {err['rel']:.3e}{top1} (held-out "
              f"relative {held['rel']:.3e}); kept fp32: {info['excluded_groups']}")
        assert np.isfinite(err["max_abs"]) and err["rel"] < 2 * INT8_BOUND, (name, err["rel"])
        assert info["exclusion_search"] == "on" and info["precision"] == precision
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        groups = len(info["sensitivity"]) or 1
        if len(info["excluded_groups"]) < groups:  # something is quantized: every graph, the Q-Former's too
            assert set(ops) & (QDQ if precision == "int8-qdq" else ORT_INT8), (name, dict(ops))
        if precision == "int8-qdq":
            assert held["rel"] <= INT8_BOUND and held.get("top1", 1.0) >= INT8_MIN_TOP1, held
            assert info["calibration"]["feeds"] > 0
            assert len(info["excluded_by_rule"]) == ops["Softmax"], "every probabilities @ V MatMul stays float"


@pytest.mark.parametrize("kind,precision", CASES)
def test_int8_end_to_end(bundles, kind, precision):
    """Generated text, ITM, ITC, features against fp32 on the held-out images (the manifest's accuracy),
    printed; loose bounds, as for BLIP: tiny random models have logit margins of ~0.1, so one flipped
    token changes a whole sequence."""
    e2e = load_manifest(bundles(kind, precision)).data["accuracy"]["end_to_end"]
    print(f"{kind} {precision} end to end on {e2e['images']} held-out images: {json.dumps(e2e)}")
    expected = {"opt": {"caption", "caption_prompted", "vqa"}, "t5": {"caption", "caption_prompted", "vqa"},
                "itm": {"itm", "itc"}, "model": {"caption", "features", "text_states"}}[kind]
    assert expected <= set(e2e), sorted(e2e)
    generated = [e2e[k]["identical"] for k in ("caption", "caption_prompted", "vqa") if k in e2e]
    assert not generated or max(generated) >= 0.25, generated
    for key in ("itm", "itc"):
        if key in e2e:
            assert e2e[key]["max_abs"] < 0.05, e2e[key]
    rt = BlipRuntime.load(bundles(kind, precision))
    if "generate" in rt.tasks:
        assert all(isinstance(t, int) for seq in rt.caption_tokens(images(1, seed=3), max_new_tokens=3) for t in seq)


def _groups(bundle: Path, graph: str) -> Counter:
    data = json.loads((bundle / "manifest.json").read_text())
    policy = family("blip-2").precision_policy(graph, data)
    nodes = quantizable_nodes(bundle / data["graphs"][graph]["file"], ("MatMul", "Gemm"), True)
    return Counter(policy.layer_groups(nodes) if policy.layer_groups else [layer_group(n) for n in nodes])


@pytest.mark.parametrize("kind", KINDS)
def test_layer_groups_are_roles_across_layers(bundles, kind):
    """Each group of a layer's MatMuls holds that role of every layer (vision, Q-Former, OPT or T5
    blocks); the heads are groups of one. T5's node names carry the block as a scope suffix, which
    the family's grouping removes (the core's alone would give one group per block)."""
    bundle = bundles(kind)
    config = json.loads((bundles.checkpoint(kind) / "config.json").read_text())
    layers = {"vision": config["vision_config"]["num_hidden_layers"], "qformer": config["qformer_config"]["num_hidden_layers"]}
    lm = config.get("text_config", {})
    for graph in load_manifest(bundle).graphs:
        groups = _groups(bundle, graph)
        print(f"{kind} {graph}: {dict(groups)}")
        sizes = {n for g, n in groups.items() if "head" not in g and g != "/MatMul"}
        if graph == "vision":
            assert sizes == {layers["vision"]}, groups
        elif graph in ("qformer", "itm", "text_features"):
            # cross-attention every cross_attention_frequency layers, and the text branch of the
            # retrieval graphs: every group holds one role, across the layers that have it
            assert all("layer.*" in g for g in groups if "head" not in g and "projection" not in g
                       and "proj" not in g), groups
            assert max(sizes) == layers["qformer"], groups
        elif lm.get("model_type") == "t5" or graph.startswith("t5"):
            assert sizes == {lm["num_layers"]}, groups
            assert not [g for g in groups if any(p.rsplit("_", 1)[-1].isdigit() and not p.startswith("wi_")
                                                  for p in g.split("/")[:-1])], groups
        else:  # OPT
            assert sizes == {lm["num_hidden_layers"]}, groups
    if kind == "t5":  # what the core's naming alone would do to T5
        data = json.loads((bundle / "manifest.json").read_text())
        nodes = quantizable_nodes(bundle / data["graphs"]["t5_step"]["file"], ("MatMul",), True)
        core = Counter(layer_group(n) for n in nodes)
        assert [g for g in core if "/k_1/" in g] and core["/layer.*/q/MatMul"] == 2, core  # per block; q's mixed


def test_blip_export_prints_the_accuracy_report(bundles, tmp_path, capsys):
    """blip-export --precision int8 on a BLIP-2 checkpoint: int8-cpu from the standard fp32 graphs (BLIP-2
    has no ONNX Runtime attention form), per-graph errors and end-to-end agreement printed."""
    from blip_export.cli import main

    capsys.readouterr()
    assert main([str(bundles.checkpoint("opt")), "--precision", "int8", "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    print(out)
    manifest = load_manifest(tmp_path / "b")
    assert manifest.data["precision"] == "int8-cpu" and "attention_op" not in manifest.data
    for graph in manifest.graphs:
        assert f"  {graph:<14} max abs error" in out and "(int8-cpu vs fp32)" in out, graph
    for task in ("caption", "caption_prompted", "vqa"):
        assert f"end to end {task}: " in out, task


@pytest.mark.parametrize("precision", ["int8-qdq", "int8-cpu"])
def test_opt_graphs_try_smoothquant(bundles, precision):
    """OPT's graphs are quantized with and without SmoothQuant smoothing (alpha 0.5) and keep the one
    with the smaller measured error; the manifest records both; the other graphs are not smoothed."""
    from blip_export.quant_search import badness

    data = load_manifest(bundles("opt", precision)).data
    for name, entry in data["graphs"].items():
        record = entry["precision"].get("smoothing")
        if not name.startswith("opt_"):
            assert record is None, name
            continue
        print(f"opt {precision} {name} smoothing: {json.dumps(record)}")
        scores = {float(a): v for a, v in record["scores"].items()}  # JSON keys are strings
        assert record["tried"] == [0.5] and record["smoothed_norms"] > 0 and set(scores) == {0.5}
        assert record["kept"] == (scores[0.5] < record["unsmoothed_score"]), record
        assert record["alpha"] == (0.5 if record["kept"] else None)
        chosen = scores[0.5] if record["kept"] else record["unsmoothed_score"]
        assert badness(entry["precision"]["error"], INT8_BOUND) == pytest.approx(chosen), (entry["precision"]["error"], record)


def test_a_bundle_with_its_own_opt_prefill_gets_no_twin(bundles, tmp_path):
    """An fp32 bundle that has a graph named opt_prefill already (the earlier layout had one) converts it
    as its own graph: no twin overwrites it. Here a copy of opt_step under that name."""
    import shutil

    from blip_export.precision import convert_bundle
    from blip_runtime import BlipRuntime

    src = tmp_path / "fp32"
    shutil.copytree(bundles("opt"), src)
    data = json.loads((src / "manifest.json").read_text())
    shutil.copy(src / "opt_step.onnx", src / "opt_prefill.onnx")
    step = data["graphs"]["opt_step"]
    data["graphs"] = {"vision": data["graphs"]["vision"], "qformer": data["graphs"]["qformer"],
                      "opt_prefill": {**step, "file": "opt_prefill.onnx", "io": {**step["io"], "name": "opt_prefill",
                                                                                  "roles": []}},
                      "opt_step": step}
    (src / "manifest.json").write_text(json.dumps(data, indent=2))
    out = convert_bundle(src, tmp_path / "int8", "int8-cpu", holdout_images=images(2, seed=21),
                         holdout_texts=TEXTS[:2], bound=None)
    assert list(out["graphs"]) == ["vision", "qformer", "opt_prefill", "opt_step"]
    assert "prompt_twin_of" not in out["graphs"]["opt_prefill"], out["graphs"]["opt_prefill"]
    feeds = out["accuracy"]["held_out"]["feeds"]
    assert feeds["opt_prefill"] == feeds["qformer"] < feeds["opt_step"], feeds  # each fed by the runtime itself
    tokens = BlipRuntime.load(tmp_path / "int8").caption_tokens(images(1, seed=22), max_new_tokens=3)[0]
    assert 1 < len(tokens) <= 4, tokens  # OPT's BOS, then up to 3 new tokens
