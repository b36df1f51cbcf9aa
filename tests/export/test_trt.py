"""TensorRT engines. Everywhere: every exported graph against TensorRT's ONNX operator list, the
optimization profiles from the I/O table, the engine compatibility check, lazy imports. On a GPU
with tensorrt (marked gpu): each graph's engine against ONNX Runtime, captions and answers of a
TensorRT bundle against the ONNX bundle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from blip_export.bundle import export_bundle
from blip_export.trt_build import TrtBuildError, build_engines, check_trt_available, engine_loader
from blip_export.trt_onnx_support import SUPPORTED, problems
from blip_runtime.families.blip.graphs import axes as blip_axes
from blip_runtime.graphs import BATCH, ENC, PAST, ROLE_GEMV, TEXT, Limits, profile_shapes, random_feeds
from blip_runtime.manifest import BundleError, load_manifest
from blip_runtime.trt_session import check_engine_compatible
from oracle import make_full_checkpoint

ARCHS = ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel")
LIMITS = [Limits(), Limits(max_batch=4, max_text_len=20, max_new_tokens=10, num_beams=3, opt_batch=2)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = {}
    for i, arch in enumerate(ARCHS):
        root = tmp_path_factory.mktemp(arch)
        make_full_checkpoint(arch, root / "ckpt", seed=i, std=0.3)
        export_bundle(root / "ckpt", root / "bundle")
        out[arch] = root / "bundle"
    return out


# -- (a) operators and data types ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_use_only_what_tensorrt_parses(bundles, arch):
    manifest = load_manifest(bundles[arch])
    for name in manifest.graphs:
        model = onnx.load(str(manifest.graph_path(name)))
        ops = sorted({n.op_type for n in model.graph.node})
        print(f"{arch} {name}: {ops}")
        assert set(ops) <= SUPPORTED.keys()
        assert problems(model) == [], f"{arch} {name}"


def _model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(graph, opset_imports=imports)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, values, elem=TensorProto.INT64):
    return helper.make_tensor(name, elem, [len(values)], values)


def test_checker_finds_what_tensorrt_refuses():
    x, y = _vi("x", TensorProto.FLOAT, [2, 3]), _vi("y", TensorProto.FLOAT, [2, 3])
    cases = {
        "operator not supported": _model([helper.make_node("Unique", ["x"], ["y"])], [x], [y]),
        "needs a TensorRT plugin": _model([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")],
                                          [x], [y], domains=["com.microsoft"]),
        "TensorRT 10 reads opsets": _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=21),
        "silently casts down": _model([helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
                                       helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)], [x], [y]),
        "`axes` must be an initializer": _model(
            [helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])],
            [x, _vi("a", TensorProto.INT64, [1])], [y], [_const("s", [0]), _const("e", [1])]),
        "only the first output": _model(
            [helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"]),
             helper.make_node("Relu", ["mean"], ["m"])],
            [x], [y, _vi("m", TensorProto.FLOAT, None)], [_const("g", [1.0, 1.0, 1.0], TensorProto.FLOAT)]),
        "must feed DequantizeLinear only": _model(
            [helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)], [x], [y],
            [helper.make_tensor("w", TensorProto.INT8, [2, 3], [1] * 6)]),
        "zero point must be a zero": _model(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [x], [y],
            [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [3])]),
        "is not used; TensorRT would drop it": _model([helper.make_node("Relu", ["x"], ["y"])],
                                                      [x, _vi("unused", TensorProto.FLOAT, [1])], [y]),
        "takes BF16, FP16, FP32": _model([helper.make_node("Softmax", ["i"], ["o"])],
                                         [_vi("i", TensorProto.INT32, [2])], [_vi("o", TensorProto.INT32, [2])]),
    }
    for expected, model in cases.items():
        found = problems(model)
        assert any(expected in p for p in found), f"{expected!r} not in {found}"


def test_checker_accepts_qdq_int8_and_fp16():
    """What the INT8 (Q/DQ, per-channel weights) and FP16 conversions produce must pass."""
    x = _vi("x", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["m"]),
        helper.make_node("Cast", ["m"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Softmax", ["h"], ["s"], axis=-1),
        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [helper.make_tensor("sx", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("zx", TensorProto.INT8, [], [0]),
             helper.make_tensor("w", TensorProto.INT8, [3, 4], list(range(12))),
             helper.make_tensor("sw", TensorProto.FLOAT, [4], [0.1] * 4), helper.make_tensor("zw", TensorProto.INT8, [4], [0] * 4)]
    model = _model(nodes, [x], [_vi("y", TensorProto.FLOAT, [2, 4])], inits)
    onnx.checker.check_model(model, full_check=True)
    assert problems(model) == []


@pytest.mark.parametrize("graph", ["vision", "decoder_step"])
def test_converted_precisions(bundles, tmp_path, graph):
    """The fp16 (fp32 islands) and int8 (Q/DQ) forms of a graph are strongly typed graphs TensorRT
    parses; the int8-cpu form (ONNX Runtime's own int8 operators) is not, and is refused."""
    from blip_export.precision import to_fp16
    from blip_export.quantize import to_int8, to_int8_cpu

    manifest = load_manifest(bundles["BlipForConditionalGeneration"])
    src, spec, d = manifest.graph_path(graph), manifest.graphs[graph], manifest.dims
    feeds = [random_feeds(spec, {BATCH: 2, TEXT: 3, PAST: 4, ENC: d.num_image_tokens}, seed=i) for i in range(4)]
    to_fp16(src, tmp_path / "fp16.onnx", graph)
    to_int8(src, tmp_path / "int8.onnx", graph, feeds, bound=10.0)
    to_int8_cpu(src, tmp_path / "int8-cpu.onnx", graph, feeds, bound=10.0, gemv=spec.has(ROLE_GEMV))
    fp16, int8 = onnx.load(str(tmp_path / "fp16.onnx")), onnx.load(str(tmp_path / "int8.onnx"))
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    assert problems(fp16) == [] and problems(int8) == []
    refused = problems(onnx.load(str(tmp_path / "int8-cpu.onnx")))
    # MatMulInteger (vision) is outside the parser's operator list; the decoder step's MatMulNBits is
    # ONNX Runtime's com.microsoft domain, which TensorRT reads only through a plugin
    why = "needs a TensorRT plugin" if graph == "decoder_step" else "operator not supported"
    assert refused and why in refused[0], refused[:3]


# -- (b) optimization profiles -------------------------------------------------------------------
def _fixed(name: str, d) -> dict[int, int]:
    """The model dimension each fixed axis must have, restated independently of graphs.py."""
    if name == "pixel_values":
        return {1: 3, 2: d.image_size, 3: d.image_size}
    if name == "image_embeds":
        return {1: d.num_image_tokens, 2: d.vision_hidden}
    if name == "encoder_states":
        return {}  # width checked below: vision (caption) or text (VQA) hidden size
    if name.startswith("cross_key"):  # transposed: [rows, H, Dh, enc]
        return {1: d.num_heads, 2: d.head_dim}
    if name.startswith(("past_", "cross_")):
        return {1: d.num_heads, 3: d.head_dim}
    return {}


@pytest.mark.parametrize("limits", LIMITS, ids=["default", "small"])
@pytest.mark.parametrize("arch", ARCHS)
def test_profiles_from_table(bundles, arch, limits):
    manifest = load_manifest(bundles[arch])
    d, L = manifest.dims, limits
    rows, past_max = L.max_batch * L.num_beams, L.max_text_len + L.max_new_tokens
    for graph, spec in manifest.graphs.items():
        prof = profile_shapes(spec, blip_axes(d, L))
        assert set(prof) == {t.name for t in spec.inputs}, graph
        seen: dict[str, tuple] = {}  # axis name -> (min, opt, max): one range per axis in a graph
        for t in spec.inputs:
            lo, opt, hi = prof[t.name]
            assert len(lo) == len(opt) == len(hi) == len(t.shape), (graph, t.name)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (graph, t.name, prof[t.name])
            for axis, size in _fixed(t.name, d).items():
                assert lo[axis] == opt[axis] == hi[axis] == size, (graph, t.name, axis)
            if t.name == "encoder_states":
                assert lo[2] == hi[2] in (d.vision_hidden, d.text_hidden)
            for i, axis in enumerate(t.shape):
                if isinstance(axis, int):
                    assert lo[i] == opt[i] == hi[i] == axis, (graph, t.name, i)
                    continue
                assert seen.setdefault(axis, (lo[i], opt[i], hi[i])) == (lo[i], opt[i], hi[i]), (graph, t.name, axis)
        first = {BATCH: (1, L.opt_batch, L.max_batch), "rows": (1, L.opt_batch, rows), TEXT: (1, min(8, L.max_text_len), L.max_text_len)}
        for axis, expected in first.items():
            if axis in seen:
                assert seen[axis] == expected, (graph, axis)
        if PAST in seen:
            assert seen[PAST][0] == 0 and seen[PAST][2] == past_max, seen[PAST]  # empty cache on the first step
            assert seen["total"] == tuple(p + t for p, t in zip(seen[PAST], seen[TEXT]))
            assert graph == "decoder_step" and seen["rows"][2] == rows  # rows = batch x beams
        if ENC in seen:
            assert seen[ENC] == (1, d.num_image_tokens, max(d.num_image_tokens, L.max_text_len))


def test_engine_loader_uses_the_table_profile(bundles, tmp_path):
    """The polygraphy loader chain is built without TensorRT: check what it would build with."""
    manifest = load_manifest(bundles["BlipForConditionalGeneration"])
    spec = manifest.graphs["decoder_step"]
    shapes = profile_shapes(spec, blip_axes(manifest.dims, LIMITS[1]))
    (tmp_path / "cache").write_bytes(b"")  # an existing cache is read before and merged after the build
    loader = engine_loader(manifest.graph_path("decoder_step"), [shapes], tmp_path / "cache", strongly_typed=True)
    (profile,) = loader._config.profiles
    assert {name: (tuple(s.min), tuple(s.opt), tuple(s.max)) for name, s in profile.items()} == shapes
    assert loader._network.strongly_typed and not loader._config.tf32
    assert loader._config.timing_cache_path == loader.timing_cache_path == str(tmp_path / "cache")


def test_builder_config_is_strongly_typed_without_precision_flags(bundles, tmp_path):
    """What TensorRT 11 removed (BuilderFlag FP16/INT8/BF16/FP8, OBEY/PREFER_PRECISION_CONSTRAINTS,
    DIRECT_IO, the INT8 calibrator, quantization flags, algorithm selectors) is never asked for:
    precision comes from the graph, the network is strongly typed and parsed from the graph's path."""
    manifest = load_manifest(bundles["BlipForConditionalGeneration"])
    for name, spec in manifest.graphs.items():
        shapes = profile_shapes(spec, blip_axes(manifest.dims, LIMITS[1]))
        loader = engine_loader(manifest.graph_path(name), [shapes], tmp_path / "cache", strongly_typed=True)
        config = loader._config
        assert (config.fp16, config.int8, config.bf16, config.fp8, config.tf32) == (False,) * 5, name
        assert config.calibrator is None and config.quantization_flags is None and config.precision_constraints is None
        assert config.algorithm_selector is None and not config.direct_io, name
        assert loader._network.strongly_typed and loader._network.path == str(manifest.graph_path(name))


@pytest.mark.parametrize("has_flag", [True, False], ids=["tensorrt-10-or-11", "without-the-flag"])
def test_strongly_typed_flag_by_feature(bundles, monkeypatch, has_flag):
    """_compile asks for NetworkDefinitionCreationFlag.STRONGLY_TYPED where the TensorRT has it (10: needed;
    11: deprecated, accepted and ignored) and builds without it where it is gone (strong typing is then
    the only mode)."""
    from types import SimpleNamespace

    import blip_export.trt_build as trt_build

    flags = SimpleNamespace(STRONGLY_TYPED=1) if has_flag else SimpleNamespace()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(NetworkDefinitionCreationFlag=flags))
    asked = []

    def loader(path, shapes, cache, *, strongly_typed, tf32=False):
        asked.append(strongly_typed)
        return lambda: b"engine"

    monkeypatch.setattr(trt_build, "engine_loader", loader)
    manifest = load_manifest(bundles["BlipForConditionalGeneration"])
    shapes = profile_shapes(manifest.graphs["decoder_step"], blip_axes(manifest.dims, Limits()))
    assert trt_build._compile(manifest.graph_path("decoder_step"), [shapes], None, False) == b"engine"
    assert asked == [has_flag]


# -- (c) engine compatibility --------------------------------------------------------------------
BUILT = {"target": "trt", "precision": "fp16", "tasks": ["caption"],
         "limits": {"max_batch": 4, "max_text_len": 20, "max_new_tokens": 10, "num_beams": 3},
         "build": {"source": "/models/blip-base",
                   "tensorrt": {"version": "10.13.3.9", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": [8, 9]}}}


def test_engine_compatibility():
    check_engine_compatible(BUILT, "10.13.3.9", "NVIDIA GeForce RTX 4090", (8, 9))  # the same machine
    rebuild = "blip-export /models/blip-base --target trt --precision fp16 --tasks caption --max-batch 4 " \
              "--max-text-len 20 --max-new-tokens 10 --num-beams 3 -o engines/x"
    with pytest.raises(BundleError) as e:
        check_engine_compatible(BUILT, "11.0.0.4", "NVIDIA GeForce RTX 4090", (8, 9), folder="engines/x")
    msg = str(e.value)
    assert "TensorRT 10.13.3.9 (this machine has TensorRT 11.0.0.4)" in msg and rebuild in msg
    assert "compute capability" not in msg and "\n" not in msg
    with pytest.raises(BundleError) as e:
        check_engine_compatible(BUILT, "10.13.3.9", "NVIDIA Jetson AGX Orin", (8, 7), folder="engines/x")
    msg = str(e.value)
    assert "compute capability 8.9 (this GPU has 8.7)" in msg and "'NVIDIA Jetson AGX Orin'" in msg and rebuild in msg
    assert "this machine has TensorRT" not in msg
    with pytest.raises(BundleError, match=r"the GPU 'NVIDIA GeForce RTX 4090' \(this machine has 'NVIDIA L4'\)"):
        check_engine_compatible(BUILT, "10.13.3.9", "NVIDIA L4", (8, 9))  # same architecture, other chip
    with pytest.raises(BundleError, match="not a TensorRT engine bundle"):
        check_engine_compatible({**BUILT, "target": "onnx"}, "10.13.3.9", "NVIDIA GeForce RTX 4090", (8, 9))


# -- (d) no TensorRT here ------------------------------------------------------------------------
def test_imports_without_tensorrt():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'polygraphy'):\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import blip_runtime.trt_session, blip_runtime.device\n"
        "assert 'torch' not in sys.modules\n"
        "import blip_export.trt_build, blip_export.trt_onnx_support\n"
        "assert 'tensorrt' not in sys.modules and 'polygraphy' not in sys.modules\n"
        "reason = blip_export.trt_build.check_trt_available()\n"
        "assert reason.startswith('tensorrt is not installed') and '\\n' not in reason, reason\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trt_build_stops_at_once_without_tensorrt(bundles, tmp_path):
    reason = check_trt_available()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here")
    assert isinstance(reason, str) and reason and "\n" not in reason
    with pytest.raises(TrtBuildError, match="use --target onnx"):
        build_engines(bundles["BlipForConditionalGeneration"], tmp_path / "trt", Limits(), None)
    assert list(tmp_path.iterdir()) == []


# -- on a GPU ------------------------------------------------------------------------------------
needs_trt = pytest.mark.skipif(check_trt_available() is not None,
                               reason=f"needs TensorRT and an NVIDIA GPU: {check_trt_available()}")
GPU_LIMITS = Limits(max_batch=4, max_text_len=16, max_new_tokens=20, num_beams=3)


@pytest.fixture(scope="module")
def engines(bundles, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"  # shared: later builds reuse timings
    for bundle in bundles.values():
        build_engines(bundle, bundle.parent / "trt", GPU_LIMITS, cache)
    return {arch: bundle.parent / "trt" for arch, bundle in bundles.items()}


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("arch", ARCHS)
def test_engines_match_onnxruntime(bundles, engines, arch):
    from blip_runtime.session import OrtSession
    from blip_runtime.trt_session import TrtSession

    ort, trt_manifest = OrtSession(load_manifest(bundles[arch])), load_manifest(engines[arch])
    assert trt_manifest.data["build"]["tensorrt"]["timing_cache"]
    with TrtSession(trt_manifest) as trt:
        d = trt_manifest.dims
        for graph, spec in trt_manifest.graphs.items():
            for i, sizes in enumerate([{BATCH: 1, TEXT: 1, PAST: 0, ENC: 5}, {BATCH: 4, TEXT: 16, PAST: 19, ENC: d.num_image_tokens},
                                       {BATCH: 3, TEXT: 5, PAST: 7, ENC: 9}]):
                if graph not in ("cross_kv", "decoder_step"):
                    sizes = {**sizes, ENC: d.num_image_tokens}
                feeds = random_feeds(spec, sizes, seed=i)
                ours, ref = trt.run(graph, feeds), ort.run(graph, feeds)
                for name, want in ref.items():
                    err = float(np.abs(ours[name] - want).max()) / max(float(np.abs(want).max()), 1e-30)
                    print(f"{arch} {graph} {name} {sizes}: relative error {err:.2e}")
                    assert err < 1e-3, f"{arch} {graph} {name} at {sizes}: relative error {err:.2e}"


class _Keeping:
    """The cache and cross K/V kept on the GPU whether or not DecoderInference asks for it yet."""

    def __init__(self, session):
        self.session = session

    def run(self, graph, feeds, keep=()):
        return self.session.run(graph, feeds, keep=("present_*", "cross_*", *keep))


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("keep", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("arch", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_generation_parity_with_onnx_bundle(bundles, engines, arch, keep):
    from blip_runtime import BlipRuntime
    from blip_runtime.trt_session import TrtSession

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40 + 5 * i, 36, 3), dtype=np.uint8) for i in range(3)]
    ref = BlipRuntime.load(bundles[arch])
    manifest = load_manifest(engines[arch])
    with TrtSession(manifest) as session:
        ours = BlipRuntime(manifest, _Keeping(session) if keep else session)
        for gen in ({}, {"num_beams": 3, "max_new_tokens": 12}):
            if arch == "BlipForQuestionAnswering":
                q = ["what color is it?", "is there a circle", "what"]
                assert ours.answer_tokens(imgs, q, **gen) == ref.answer_tokens(imgs, q, **gen)
            else:
                assert ours.caption_tokens(imgs, **gen) == ref.caption_tokens(imgs, **gen)
                assert ours.caption_tokens(imgs, "a picture of", **gen) == ref.caption_tokens(imgs, "a picture of", **gen)
