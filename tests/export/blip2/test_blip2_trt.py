"""TensorRT for BLIP-2 bundles. Everywhere: the optimization profiles of every graph (OPT, Flan-T5, ITM and
Blip2Model bundles) against what the limits imply; the engine build path by path for graphs with external
data (CPU stand-ins, tests/fake_trt.py); the fp16 and int8 (Q/DQ) forms of every graph typed, within
TensorRT's ONNX operators and through the build; blip-export --target trt in one command. On a GPU with
tensorrt (marked gpu): each engine against ONNX Runtime, and generation against the ONNX bundle. The
builder configuration TensorRT 10 and 11 both accept is tested family-neutrally in tests/export/test_trt.py."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest

import fake_trt
from blip2_oracle import bert_processor, hf_config, make_checkpoint
from blip_export import files
from blip_export.bundle import export_bundle
from blip_export.families.blip2.export import random_feeds, verify_sizes
from blip_export.measure import check_typed
from blip_export.trt_build import build_engines, check_trt_available
from blip_export.trt_onnx_support import problems
from blip_runtime import BlipRuntime
from blip_runtime.families.blip2 import more_profiles
from blip_runtime.families.blip2.graphs import BATCH, NEW, PAST, PREFIX, PROMPT, ROWS, TEXT, TOTAL, axes
from blip_runtime.graphs import Limits, axes_to_dict, profile_shapes
from blip_runtime.manifest import load_manifest

# architecture, LM, checkpoint settings (spread so that different images give different tokens)
KINDS = {
    "opt": ("Blip2ForConditionalGeneration", "opt", dict(seed=7, std=0.2)),
    "t5": ("Blip2ForConditionalGeneration", "t5", dict(seed=8, std=0.1, untie_head=True)),
    "itm": ("Blip2ForImageTextRetrieval", "opt", dict(seed=3)),
    "features": ("Blip2Model", "t5", dict(seed=2)),
}
LIMITS = [Limits(), Limits(max_batch=4, max_text_len=20, max_new_tokens=10, num_beams=3, opt_batch=2),
          Limits(max_batch=2, max_text_len=5, max_new_tokens=3, num_beams=1)]
BUILD_LIMITS = Limits(max_batch=4, max_text_len=32, max_new_tokens=12, num_beams=3)


def _checkpoint(folder, kind: str):
    arch, lm, settings = KINDS[kind]
    if kind == "itm":  # the Q-Former reads the texts: a BERT tokenizer beside the checkpoint
        proc = bert_processor(4)
        config = hf_config(lm, False, text_input=True)
        config.image_token_index = proc.tokenizer.convert_tokens_to_ids("<image>")
        make_checkpoint(arch, folder, config, with_processor=False, **settings)
        proc.save_pretrained(folder)
        return
    overrides = {"tie_word_embeddings": False} if lm == "opt" else None
    make_checkpoint(arch, folder, hf_config(lm, True, text_overrides=overrides), **settings)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """kind -> fp32 ONNX bundle, weights inside each graph file; made on first use."""
    made = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            _checkpoint(root / "ckpt", kind)
            export_bundle(root / "ckpt", root / "bundle")
            made[kind] = root / "bundle"
        return made[kind]

    return get


def images(n: int = 3, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 5 * i, 36, 3), dtype=np.uint8) for i in range(n)]


# -- (a) optimization profiles -------------------------------------------------------------------
def _implied(d, L: Limits) -> dict:
    """What the limits imply for each axis, restated from how the runtime uses it (not from graphs.py):
    {axis: (min, opt, max)} where the sizes are fixed by the limits, {axis: callable(bounds)} where a
    range is needed that covers every size the runtime feeds."""
    Q, text_opt = d.num_query_tokens, min(8, L.max_text_len)
    prompt_max = Q + L.max_text_len  # the image tokens count: OPT's prompt and T5's encoder length
    # the longest cache a step is fed: OPT's holds the prompt and every fed token (the last generated
    # token is never fed back); T5's only the decoder's own tokens (decoder_start_token_id first)
    needed_past = prompt_max + L.max_new_tokens - 2 if d.lm == "opt" else L.max_new_tokens - 1
    return {
        BATCH: (1, L.opt_batch, L.max_batch),
        ROWS: (1, L.opt_batch, L.max_batch * L.num_beams),  # requests x beams
        TEXT: (1, text_opt, L.max_text_len),
        PROMPT: (1, Q + text_opt, prompt_max),
        NEW: lambda b: b[0] == b[1] == 1,  # the loop feeds one token per step
        PREFIX: (0, 0, 0),  # no queries in the steps (OPT's prompt call has a profile of its own, below)
        # 0: T5's first step (an empty cache); a step's one new token never gets a position past OPT's
        # table; T5's cache never holds the prompt
        PAST: lambda b: b[0] == 0 and b[2] >= needed_past and (
            b[2] + 1 <= d.max_position_embeddings if d.lm == "opt" else b[2] <= L.max_new_tokens),
    }


def _fixed(name: str, d) -> dict[int, int]:
    """The model dimension of each fixed axis, by input name, restated independently of graphs.py."""
    return {
        "pixel_values": {1: 3, 2: d.image_size, 3: d.image_size},
        "image_embeds": {1: d.num_image_tokens, 2: d.vision_hidden},
        "image_prefix": {1: d.num_query_tokens, 2: d.lm_hidden} if d.lm == "t5" else {2: d.lm_hidden},
        "encoder_states": {2: d.lm_hidden},
    }.get(name, {1: d.lm_heads, 2: d.lm_head_dim} if name.startswith("cross_key") else
          {1: d.lm_heads, 3: d.lm_head_dim} if name.startswith(("past_", "cross_value")) else {})


ROW_GRAPHS = {"opt_step", "t5_step"}  # decoder rows; every other graph runs per request


@pytest.mark.parametrize("limits", LIMITS, ids=["default", "small", "tiny"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_profiles_from_table(bundles, kind, limits):
    manifest = load_manifest(bundles(kind))
    d, implied = manifest.dims, _implied(manifest.dims, limits)
    table = axes(d, limits)
    assert manifest.data["axes"] == axes_to_dict(axes(d, Limits()))  # the exporter recorded the default limits'
    for graph, spec in manifest.graphs.items():
        prof = profile_shapes(spec, table)
        assert set(prof) == {t.name for t in spec.inputs}, graph
        seen: dict[str, tuple] = {}  # axis -> (min, opt, max): one range per axis name in a graph
        for t in spec.inputs:
            lo, opt, hi = prof[t.name]
            print(f"{kind} {graph} {t.name}: min {lo} opt {opt} max {hi}")
            assert len(lo) == len(opt) == len(hi) == len(t.shape), (graph, t.name)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (graph, t.name, prof[t.name])
            for i, size in _fixed(t.name, d).items():
                assert lo[i] == opt[i] == hi[i] == size, (graph, t.name, i)
            for i, axis in enumerate(t.shape):
                if isinstance(axis, str):
                    assert seen.setdefault(axis, (lo[i], opt[i], hi[i])) == (lo[i], opt[i], hi[i]), (graph, t.name, axis)
        first = ROWS if graph in ROW_GRAPHS else BATCH
        assert seen[first] == implied[first], (graph, first, seen[first])
        assert not (ROWS in seen and BATCH in seen), graph
        for axis, want in implied.items():
            if axis in seen:
                assert want(seen[axis]) if callable(want) else seen[axis] == want, (graph, axis, seen[axis])
        if TOTAL in seen:
            assert seen[TOTAL] == tuple(p + n for p, n in zip(seen[PAST], seen[NEW])), graph
        if graph.endswith("_step"):
            assert prof["beam_idx"][2] == (limits.max_batch * limits.num_beams,), graph
    if "opt_step" in manifest.graphs:  # a second profile for the prompt call: the whole prompt, the queries, no past
        (prompt,) = more_profiles("opt_step", d, limits)
        prof = profile_shapes(manifest.graphs["opt_step"], prompt)
        Q = d.num_query_tokens
        assert prof["image_prefix"] == ((1, Q, d.lm_hidden), (limits.opt_batch, Q, d.lm_hidden),
                                        (limits.max_batch * limits.num_beams, Q, d.lm_hidden))
        assert prof["past_key.0"][2][2] == 0 and prof["input_ids"][2][1] == implied[PROMPT][2]
        assert prof["attention_mask"] == prof["input_ids"] and prof["input_ids"][1][1] == implied[PROMPT][1]
        assert more_profiles("vision", d, limits) == []
    if d.lm == "t5" and "t5_step" in manifest.graphs:  # T5's encoder length reaches the step through its mask
        step = profile_shapes(manifest.graphs["t5_step"], table)
        assert [s[1] for s in step["encoder_attention_mask"]] == [s[1] for s in profile_shapes(
            manifest.graphs["t5_encoder"], table)["attention_mask"]]


# The runtime's own check (_check_positions) asks P + N - 1 <= max_position_embeddings, the last
# generated token being never fed; the table's bound must be the same.
def test_limits_at_the_end_of_the_position_table(bundles):
    """OPT's limits may use every position the runtime itself allows (_check_positions)."""
    d = load_manifest(bundles("opt")).dims
    text = 40
    new = d.max_position_embeddings + 1 - d.num_query_tokens - text  # the longest prompt's last fed position is the table's last
    table = axes(d, Limits(max_text_len=text, max_new_tokens=new))
    assert table[PAST][2] + 1 <= d.max_position_embeddings


def test_limits_beyond_the_position_table(bundles, monkeypatch, tmp_path):
    """Refused in one line by the table and by the engine build, before anything is built or written."""
    from blip_export.trt_build import TrtBuildError

    d = load_manifest(bundles("opt")).dims
    new = d.max_position_embeddings + 2 - d.num_query_tokens - 40  # one position more than the table has
    limits = Limits(max_text_len=40, max_new_tokens=new)
    with pytest.raises(ValueError, match=rf"exceed OPT's {d.max_position_embeddings} positions") as e:
        axes(d, limits)
    assert "\n" not in str(e.value)
    cuda = fake_trt.install(monkeypatch)
    with pytest.raises(TrtBuildError, match=rf"max_new_tokens {new} exceed OPT's {d.max_position_embeddings} positions"):
        build_engines(bundles("opt"), tmp_path / "trt", limits, None)
    assert cuda.parsed == [] and list(tmp_path.iterdir()) == []


# -- (b) the engine build, path by path, with external data --------------------------------------
@pytest.fixture(scope="module")
def external(bundles):
    """kind -> ONNX bundle of the same checkpoint as bundles(kind), every graph's weights beside it (the
    path graphs over 2 GB take)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            root = bundles(kind).parent  # the same checkpoint (tiny tokenizers train differently each time)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(files, "EXTERNAL_DATA_THRESHOLD", 4096)  # below every tiny graph's weights
                export_bundle(root / "ckpt", root / "external")
            made[kind] = root / "external"
        return made[kind]

    return get


def _results(rt, kind: str) -> list:
    imgs = images()
    if kind == "itm":
        return [rt.match(imgs, ["a red circle", "two dogs", "a photo"]).tolist(),
                rt.text_features(["a red circle", "two"]).tolist()]
    out = [rt.caption_tokens(imgs, max_new_tokens=6), rt.answer_tokens(imgs, ["what color", "what", "two"], max_new_tokens=5),
           rt.caption_tokens(imgs, "a photo of", num_beams=3, max_new_tokens=5)]
    return out + [rt.qformer_features(imgs).tolist()] if kind == "features" else out


@pytest.mark.parametrize("kind", list(KINDS))
def test_external_data_builds_from_paths(bundles, external, monkeypatch, tmp_path, kind):
    cuda = fake_trt.install(monkeypatch)
    source = load_manifest(external(kind))
    for name in source.graphs:
        assert [p.name for p in source.data_paths(name)] == [f"{name}.onnx.data"], name
    build_engines(source.folder, tmp_path / "trt", BUILD_LIMITS, tmp_path / "timing.cache")
    # the parser was given each graph's path, never its bytes (the weights beside it resolve from there)
    parsed = [(type(loader._network).__name__, loader._network.path) for loader in cuda.parsed]
    assert parsed == [("NetworkFromOnnxPath", str(source.graph_path(name))) for name in source.graphs]
    assert all(loader._network.strongly_typed for loader in cuda.parsed)
    trt = load_manifest(tmp_path / "trt")
    trt.verify_files("full")
    listed = {"manifest.json", trt.data["tokenizer"]["file"], *(f"{name}.engine" for name in source.graphs)}
    assert sorted(p.name for p in trt.folder.iterdir()) == sorted(listed)  # no graph or data file copied
    table = axes(source.dims, BUILD_LIMITS)
    assert trt.data["axes"] == axes_to_dict(table) and trt.data["limits"] == asdict(BUILD_LIMITS)
    for (name, entry), loader in zip(trt.data["graphs"].items(), cuda.parsed):
        src = source.data["graphs"][name]
        assert entry["io"] == src["io"] and entry["onnx_sha256"] == src["sha256"], name
        shapes = profile_shapes(source.graphs[name], table)
        assert entry["profile"] == {k: [list(s) for s in v] for k, v in shapes.items()}, name
        wanted = [shapes] + [profile_shapes(source.graphs[name], a) for a in more_profiles(name, source.dims, BUILD_LIMITS)]
        assert [{k: (tuple(s.min), tuple(s.opt), tuple(s.max)) for k, s in p.items()} for p in loader._config.profiles] \
            == wanted, name
        assert entry["profiles"] == [{k: [list(s) for s in v] for k, v in w.items()} for w in wanted], name
        assert len(wanted) == (2 if name == "opt_step" else 1), name
    for key in ("family", "tasks", "dims", "tokenizer", "image", "special_tokens", "generation"):
        assert trt.data[key] == source.data[key], key
    # the engines hold the weights the parser read from beside each graph: the inline bundle's results
    ours = BlipRuntime.load(trt.folder)
    got, want = _results(ours, kind), _results(BlipRuntime.load(bundles(kind)), kind)
    print(f"{kind}: {got[0]}")
    assert got == want
    ours.session.close()


# -- (c) fp16 and int8 (Q/DQ) forms --------------------------------------------------------------
FORMS = ("fp16", "int8-qdq")


@pytest.fixture(scope="module")
def converted(bundles):
    """(kind, form) -> the fp32 bundle converted by convert_bundle (int8: every layer quantized, no
    exclusion search, calibrated on synthetic images at the checkpoint's size)."""
    from blip_export.precision import convert_bundle, synthetic_images

    made = {}

    def get(kind: str, form: str):
        if (kind, form) not in made:
            src = bundles(kind)
            size = load_manifest(src).dims.image_size
            made[kind, form] = src.parent / form
            convert_bundle(src, made[kind, form], form, calib_images=synthetic_images(8, size), bound=None)
        return made[kind, form]

    return get


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_precision_forms_are_typed_and_parse(converted, kind, form):
    """Every graph of the fp16 (fp32 islands) and int8 (symmetric Q/DQ) bundles: every node's output type
    is determined (a strongly typed network needs it) and TensorRT's ONNX parser takes every node."""
    manifest = load_manifest(converted(kind, form))
    assert manifest.data["precision"] == form
    kinds = set()
    for name, entry in manifest.data["graphs"].items():
        path = manifest.graph_path(name)
        check_typed(path)
        model = onnx.load(str(path))
        found = problems(model)
        held = entry["precision"]["precision"]  # the family keeps some graphs fp32 whole (the Q-Former)
        print(f"{kind} {form} {name}: {held}, {len(model.graph.node)} nodes, problems {found[:3]}")
        assert found == [], f"{kind} {form} {name}: " + "; ".join(found[:5])
        if held == "fp16":
            assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer), name
        elif held == "int8-qdq":
            assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}, name
        kinds.add(held)
    assert form in kinds and "vision" in manifest.graphs and \
        manifest.data["graphs"]["vision"]["precision"]["precision"] == form


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_precision_bundles_build_engines(converted, monkeypatch, tmp_path, kind, form):
    """The fp16 and int8 bundles go through the engine build (the parser check of every graph, a strongly
    typed network from each path, profiles from the table) and generate the ONNX bundle's tokens."""
    cuda = fake_trt.install(monkeypatch)
    source = converted(kind, form)
    build_engines(source, tmp_path / "trt", BUILD_LIMITS, None)
    assert len(cuda.parsed) == len(load_manifest(source).graphs)
    assert all(loader._network.strongly_typed for loader in cuda.parsed)
    trt = load_manifest(tmp_path / "trt")
    assert trt.data["precision"] == form and trt.data["target"] == "trt"
    for name, entry in load_manifest(source).data["graphs"].items():  # which layers stayed fp32, per graph
        assert trt.data["graphs"][name]["precision"] == entry["precision"], name
    ours = BlipRuntime.load(trt.folder)
    got, want = _results(ours, kind), _results(BlipRuntime.load(source), kind)
    print(f"{kind} {form}: {got[0]}")
    assert got == want
    ours.session.close()


def test_blip_export_target_trt(bundles, converted, monkeypatch, tmp_path):
    """`blip-export CKPT --target trt --precision fp16`: the checkpoint exported, converted and built in one
    command, the engine bundle generating what the fp16 ONNX bundle of the same checkpoint generates."""
    from blip_export.cli import main

    cuda = fake_trt.install(monkeypatch)
    L = BUILD_LIMITS
    args = [bundles("opt").parent / "ckpt", "--target", "trt", "--precision", "fp16", "-o", tmp_path / "trt", "-q",
            "--timing-cache", tmp_path / "timing.cache", "--max-batch", L.max_batch, "--max-text-len", L.max_text_len,
            "--max-new-tokens", L.max_new_tokens, "--num-beams", L.num_beams]
    assert main([str(a) for a in args]) == 0
    trt = load_manifest(tmp_path / "trt")
    assert (trt.data["target"], trt.data["precision"], trt.data["limits"]) == ("trt", "fp16", asdict(L))
    assert [Path(loader._network.path).name for loader in cuda.parsed] == [f"{g}.onnx" for g in trt.graphs]
    ours = BlipRuntime.load(trt.folder)
    assert _results(ours, "opt") == _results(BlipRuntime.load(converted("opt", "fp16")), "opt")
    ours.session.close()


# -- on a GPU ------------------------------------------------------------------------------------
needs_trt = pytest.mark.skipif(check_trt_available() is not None,
                               reason=f"needs TensorRT and an NVIDIA GPU: {check_trt_available()}")


@pytest.fixture(scope="module")
def engines(bundles, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"  # shared: later builds reuse timings
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = bundles(kind).parent / "trt"
            build_engines(bundles(kind), made[kind], BUILD_LIMITS, cache)
        return made[kind]

    return get


# fp32 with TF32 off computes as ONNX Runtime does; fp16 and int8 kernels round differently from ONNX
# Runtime's CPU (which runs many fp16 ops in fp32 and emulates Q/DQ), so those bounds only catch a wrong build
GPU_REL = {"fp32": 1e-3, "fp16": 2e-2, "int8-qdq": 1e-1}


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("form", list(GPU_REL))
@pytest.mark.parametrize("kind", list(KINDS))
def test_engines_match_onnxruntime(bundles, engines, converted, tmp_path, kind, form):
    """Every engine at the exporter's verification sizes against ONNX Runtime on the CPU, the same graphs."""
    from blip_runtime.session import OrtSession
    from blip_runtime.trt_session import TrtSession

    source = bundles(kind) if form == "fp32" else converted(kind, form)
    built = engines(kind) if form == "fp32" else tmp_path / "trt"
    if form != "fp32":
        build_engines(source, built, BUILD_LIMITS, None)
    ort, manifest = OrtSession(load_manifest(source)), load_manifest(built)
    with TrtSession(manifest) as trt:
        d = manifest.dims
        for graph, spec in manifest.graphs.items():
            for i, sizes in enumerate(verify_sizes(d)):
                feeds = random_feeds(spec, d, sizes, seed=i)
                ours, ref = trt.run(graph, feeds), ort.run(graph, feeds)
                for name, want in ref.items():
                    err = float(np.abs(ours[name] - want).max())
                    rel = err / max(float(np.abs(want).max()), 1e-30)
                    print(f"{kind} {form} {graph} {name} {sizes}: max abs {err:.2e}, relative {rel:.2e}")
                    assert rel < GPU_REL[form], f"{kind} {form} {graph} {name} at {sizes}: max abs {err:.2e}, relative {rel:.2e}"


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("kind", ["opt", "t5", "itm"])
def test_generation_parity_with_onnx_bundle(bundles, engines, kind):
    """BlipRuntime.load of the engine bundle (the cache and cross K/V kept on the GPU) against the ONNX
    bundle: the same tokens greedy and with 3 beams, ITM scores and text features within 1e-4."""
    from blip_runtime.trt_session import TrtSession

    ours, ref = BlipRuntime.load(engines(kind)), BlipRuntime.load(bundles(kind))
    assert isinstance(ours.session, TrtSession)
    got, want = _results(ours, kind), _results(ref, kind)
    if kind == "itm":
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    else:
        assert got == want
    ours.session.close()
