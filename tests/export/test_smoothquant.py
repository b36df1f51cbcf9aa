"""SmoothQuant smoothing (blip_export.smoothquant): an exact re-parametrisation of the fp32 graph (outputs
equal to ~1e-6 relative) on a hand-built graph with shared initializers, a Gemm, a residual LayerNorm
and a shape-only reader, and on a tiny BLIP-2 OPT bundle (weights inside the file and beside it); on that
OPT with injected outlier channels, plain int8 Q/DQ loses the greedy tokens while smoothing
then Q/DQ keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blip_export import files
from blip_export.measure import graph_errors, ort_session, run_all
from blip_export.smoothquant import smooth_graph
from oracle import assert_close

C = 8  # channels of the hand-built graph


def _hand_graph(path: Path) -> dict[str, np.ndarray]:
    """x (B, S, C) -> ln1 -> MatMul wa, MatMul wb, Shape; relu(x) -> MatMul wb (wb shared outside the
    group); ln2 (gamma shared with ln1) -> Add x (a residual: not smoothable); z (N, C) -> ln3 -> Gemm
    transB (weight (6, C)). Returns the initializers."""
    rng = np.random.default_rng(0)
    w = {"g1": 1 + 0.1 * rng.standard_normal(C), "b1": 0.1 * rng.standard_normal(C), "wa": rng.standard_normal((C, 5)),
         "wb": rng.standard_normal((C, 4)), "b2": 0.1 * rng.standard_normal(C), "g3": 1 + 0.1 * rng.standard_normal(C),
         "b3": 0.1 * rng.standard_normal(C), "wg": rng.standard_normal((6, C)), "bg": rng.standard_normal(6)}
    for k in ("g1", "b1", "g3", "b3"):  # channel 2 of the LayerNorm outputs ~50x the rest: an outlier channel
        w[k][2] *= 50.0
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["h1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h1", "wa"], ["ya"], name="mm_a"),
        helper.make_node("MatMul", ["h1", "wb"], ["yb"], name="mm_b"),
        helper.make_node("Shape", ["h1"], ["shape"], name="shape"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wb"], ["yr"], name="mm_r"),
        helper.make_node("LayerNormalization", ["x", "g1", "b2"], ["h2"], name="ln2", axis=-1),
        helper.make_node("Add", ["h2", "x"], ["res"], name="residual"),
        helper.make_node("LayerNormalization", ["z", "g3", "b3"], ["h3"], name="ln3", axis=-1),
        helper.make_node("Gemm", ["h3", "wg", "bg"], ["yg"], name="gemm", transB=1),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", f, ["B", "S", C]), helper.make_tensor_value_info("z", f, ["N", C])],
        [helper.make_tensor_value_info(n, f, None) for n in ("ya", "yb", "yr", "res", "yg")]
        + [helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def _hand_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, C)).astype(np.float32),
             "z": rng.standard_normal((4, C)).astype(np.float32)} for _ in range(n)]


def _compare(src: Path, dst: Path, feeds: list[dict], what: str, rel: float = 1e-5) -> dict:
    ours, ref = run_all(ort_session(dst), feeds), run_all(ort_session(src), feeds)
    for name in ref[0]:
        assert_close(np.concatenate([o[name].ravel() for o in ours]), np.concatenate([r[name].ravel() for r in ref]),
                     rel, f"{what} {name}")
    return graph_errors(ours, ref)


def test_hand_graph_smoothed_exactly_and_shared_initializers_kept(tmp_path):
    src, dst = tmp_path / "hand.onnx", tmp_path / "smooth.onnx"
    w = _hand_graph(src)
    info = smooth_graph(src, dst, _hand_feeds(3, 0), alpha=0.5)
    assert sorted(info["smoothed"]) == ["ln1", "ln3"], info
    assert "Add" in info["skipped"]["ln2"], info["skipped"]
    assert info["smoothed"]["ln1"]["linears"] == ["mm_a", "mm_b"]
    for name in ("ln1", "ln3"):  # the outlier channel's range is what s balances
        s = info["smoothed"][name]
        print(f"{name}: s in [{s['min_scale']:.3f}, {s['max_scale']:.3f}], spread {s['spread_before']:.1f} -> "
              f"{s['spread_after']:.1f}")
        assert s["spread_before"] > 20 and s["spread_after"] < s["spread_before"] / 3, s
    _compare(src, dst, _hand_feeds(3, 1), "hand graph")  # held-out inputs: the function, not the feeds
    model = onnx.load(str(dst))
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # Readers outside the smoothed groups keep the original tensors; the groups read copies.
    assert nodes["mm_r"].input[1] == "wb" and np.array_equal(inits["wb"], w["wb"])
    assert nodes["ln2"].input[1] == "g1" and np.array_equal(inits["g1"], w["g1"])
    assert nodes["mm_b"].input[1] != "wb" and nodes["ln1"].input[1] != "g1"
    # Private tensors change in place (no copy left behind).
    assert nodes["mm_a"].input[1] == "wa" and not np.allclose(inits["wa"], w["wa"])
    assert nodes["gemm"].input[1] == "wg" and "wg/smoothed" not in inits


def test_unnamed_nodes(tmp_path):
    """Node names are optional in ONNX: groups are found by position, reported by op type and output."""
    src = tmp_path / "hand.onnx"
    _hand_graph(src)
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.name = ""
    onnx.save_model(model, str(src))
    info = smooth_graph(src, tmp_path / "out.onnx", _hand_feeds(3, 0))
    assert sorted(info["smoothed"]) == ["LayerNormalization->h1", "LayerNormalization->h3"], info
    assert info["smoothed"]["LayerNormalization->h1"]["linears"] == ["MatMul->ya", "MatMul->yb"]
    _compare(src, tmp_path / "out.onnx", _hand_feeds(3, 1), "unnamed hand graph")


def test_bad_input_is_one_clear_line(tmp_path):
    src = tmp_path / "hand.onnx"
    _hand_graph(src)
    with pytest.raises(ValueError, match=r"^alpha 1.5: expected a number in \[0, 1\]$"):
        smooth_graph(src, tmp_path / "o.onnx", _hand_feeds(1, 0), alpha=1.5)
    with pytest.raises(ValueError, match="^feeds: expected at least one dict"):
        smooth_graph(src, tmp_path / "o.onnx", [], alpha=0.5)


# -- a tiny BLIP-2 OPT bundle --------------------------------------------------------------------


def _images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 2 * i, 44, 3), dtype=np.uint8) for i in range(n)]


def _bundle(root: Path, outliers=None) -> tuple[Path, dict, dict]:
    """Export a tiny BLIP-2 OPT checkpoint (benchmarks.smoothquant's builder, at the tests' width)
    and record calibration and held-out feeds on disjoint images."""
    from benchmarks.smoothquant import LmShape, build_checkpoint
    from blip_export.calibration import calibration_feeds
    from blip_export.pipeline import export

    build_checkpoint(root / "ckpt", outliers, LmShape(hidden_size=64, ffn_dim=96, num_hidden_layers=2))
    export(root / "ckpt", root / "fp32")
    calib = calibration_feeds(root / "fp32", _images(4, 0), max_new_tokens=6)
    held = calibration_feeds(root / "fp32", _images(4, 1), max_new_tokens=6)
    return root / "fp32", calib, held


@pytest.fixture(scope="module")
def opt_bundle(tmp_path_factory):
    """With outlier channels injected as benchmarks.smoothquant's "reparam": LayerNorm gamma/beta x60 on 3
    channels and the Linear rows reading them / 60, so the fp32 function is the un-injected model's while
    the Linears' inputs carry 60x channels (smoothing then has real work to do)."""
    from benchmarks.smoothquant import Outliers

    return _bundle(tmp_path_factory.mktemp("smooth-opt"), Outliers("reparam", (3, 17, 40), 60.0))


LM_NORMS = 2 * 2 + 1  # two per decoder layer and the final one (before lm_head)


@pytest.mark.parametrize("graph", ["opt_step"])
def test_opt_graphs_smoothed_exactly(opt_bundle, graph, tmp_path):
    bundle, calib, held = opt_bundle
    src, dst = bundle / f"{graph}.onnx", tmp_path / f"{graph}.onnx"
    info = smooth_graph(src, dst, calib[graph], alpha=0.5)
    assert len(info["smoothed"]) == LM_NORMS and not info["skipped"], info
    readers = sorted(tuple(sorted(n.split("/")[-2] for n in v["linears"])) for v in info["smoothed"].values())
    assert readers == [("fc1",), ("fc1",), ("k_proj", "q_proj", "v_proj"), ("k_proj", "q_proj", "v_proj"),
                       ("lm_head",)], readers
    assert info["max_scale"] > 1.5, info["max_scale"]  # the weights really changed
    err = _compare(src, dst, held[graph], graph)
    assert err["top1"] == 1.0


def test_only_pre_layernorms_of_the_image_side_are_smoothed(opt_bundle, tmp_path):
    bundle, calib, held = opt_bundle
    vision = smooth_graph(bundle / "vision.onnx", tmp_path / "vision.onnx", calib["vision"])
    assert len(vision["smoothed"]) == 4 and list(vision["skipped"].values()) == ["its output is a graph output"]
    _compare(bundle / "vision.onnx", tmp_path / "vision.onnx", held["vision"], "vision")
    # the Q-Former is post-LayerNorm: every LayerNorm output also feeds a residual (or the output)
    qformer = smooth_graph(bundle / "qformer.onnx", tmp_path / "qformer.onnx", calib["qformer"])
    assert not qformer["smoothed"] and qformer["skipped"]


def test_weights_beside_the_graph(opt_bundle, tmp_path, monkeypatch):
    """Graphs over the threshold keep their weights in `<graph>.onnx.data`: read from beside the
    source, written beside the destination."""
    bundle, calib, held = opt_bundle
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 10_000)
    src, dst = tmp_path / "in" / "opt_step.onnx", tmp_path / "out" / "opt_step.onnx"
    src.parent.mkdir()
    dst.parent.mkdir()
    files.save_graph(onnx.load(str(bundle / "opt_step.onnx")), src)
    assert files.graph_data_files(src)
    info = smooth_graph(src, dst, calib["opt_step"][:4])
    assert len(info["smoothed"]) == LM_NORMS
    assert files.graph_data_files(dst) == [files.data_file(dst)]
    _compare(bundle / "opt_step.onnx", dst, held["opt_step"], "opt_step (external data)")


def test_outlier_channels_break_plain_qdq_and_smoothing_fixes_it(opt_bundle, tmp_path):
    """Plain W8A8 Q/DQ's one scale per activation tensor is set by the outlier channels; smoothed first,
    the same Q/DQ keeps the greedy tokens."""
    from blip_export.quantize import to_int8

    bundle, calib, held = opt_bundle
    src = bundle / "opt_step.onnx"
    ref = run_all(ort_session(src), held["opt_step"])
    to_int8(src, tmp_path / "plain.onnx", "opt_step", calib["opt_step"], held["opt_step"], bound=None)
    smooth_graph(src, tmp_path / "smoothed.onnx", calib["opt_step"], alpha=0.5)
    to_int8(tmp_path / "smoothed.onnx", tmp_path / "smooth-qdq.onnx", "opt_step", calib["opt_step"], held["opt_step"],
            bound=None)
    plain = graph_errors(run_all(ort_session(tmp_path / "plain.onnx"), held["opt_step"]), ref)
    smooth = graph_errors(run_all(ort_session(tmp_path / "smooth-qdq.onnx"), held["opt_step"]), ref)
    print(f"plain int8 Q/DQ: rel {plain['rel']:.3e}, top-1 {plain['top1']:.3f}; "
          f"smoothed + Q/DQ: rel {smooth['rel']:.3e}, top-1 {smooth['top1']:.3f}")
    assert smooth["rel"] < plain["rel"] / 4, (plain, smooth)
    assert smooth["top1"] >= 0.9 and plain["top1"] < smooth["top1"] - 0.2, (plain["top1"], smooth["top1"])


def test_a_layernorm_read_inside_a_subgraph_is_left_alone(tmp_path):
    """A branch of an If that reads the LayerNorm output from the outer scope would see X / s."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["b"], name="pass")], "branch", [],
                               [helper.make_tensor_value_info("b", f, None)])
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch, else_branch=branch)]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
             {"g": 1 + rng.standard_normal(C), "beta": rng.standard_normal(C), "w": rng.standard_normal((C, 3))}.items()]
    graph = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info("x", f, ["B", C]),
                                             helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info(n, f, None) for n in ("y", "z")], inits)
    src = tmp_path / "sub.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = [{"x": rng.standard_normal((4, C)).astype(np.float32), "cond": np.array(True)}]
    info = smooth_graph(src, tmp_path / "out.onnx", feeds)
    assert not info["smoothed"] and "subgraph" in info["skipped"]["ln"], info
    _compare(src, tmp_path / "out.onnx", feeds, "subgraph graph")


def test_choose_alpha_keeps_the_best_measured(opt_bundle, tmp_path):
    """Each candidate (the graph itself, then each alpha) scored by the error of the Q/DQ graph quantized
    from it (quantize.badness on held-out feeds, as to_int8 judges a graph); on the outlier model a
    smoothed graph wins, the kept graph is the lowest-scored, and the others are gone."""
    from blip_export.quantize import badness, to_int8
    from blip_export.smoothquant import SMOOTH_ALPHAS, choose_alpha

    bundle, calib, held = opt_bundle
    src = bundle / "opt_step.onnx"
    ref = run_all(ort_session(src), held["opt_step"])

    def score(path: Path) -> float:
        to_int8(path, tmp_path / "probe.onnx", "opt_step", calib["opt_step"], held["opt_step"], bound=None)
        return badness(graph_errors(run_all(ort_session(tmp_path / "probe.onnx"), held["opt_step"]), ref), 0.05)

    info = choose_alpha(src, tmp_path / "work", calib["opt_step"], score)
    print("unsmoothed:", info["unsmoothed_score"], "by alpha:", info["scores"])
    assert list(info["scores"]) == list(SMOOTH_ALPHAS)
    assert info["alpha"] in SMOOTH_ALPHAS and info["scores"][info["alpha"]] == min(info["scores"].values())
    assert info["scores"][info["alpha"]] < info["unsmoothed_score"]
    assert info["path"].is_file() and sorted(p.name for p in (tmp_path / "work").iterdir()) == [info["path"].name]
    assert len(info["smoothed"]) == LM_NORMS
    # the graph itself kept when no alpha scores lower: nothing left in work
    kept = choose_alpha(src, tmp_path / "w2", calib["opt_step"][:2], lambda p: 0.0 if p == src else 1.0,
                        alphas=(0.5,))
    assert kept["path"] is None and kept["alpha"] is None and not any((tmp_path / "w2").iterdir())
    # nothing to smooth: nothing written, no alpha scored
    qformer = choose_alpha(bundle / "qformer.onnx", tmp_path / "q", calib["qformer"], lambda p: 0.0, unsmoothed=False)
    assert qformer["path"] is None and qformer["scores"] == {} and qformer["skipped"]
