"""BlipRuntime.load(backend="openvino" | "auto") against ONNX Runtime and transformers, on tiny
re-randomized BLIP (caption, VQA, retrieval) and BLIP-2 (OPT, Flan-T5) bundles: every
graph's outputs equal OrtSession's within a printed tolerance (names, order, dtypes, fresh arrays);
generated tokens equal transformers' (BLIP captions greedy without a prompt and 3 beams with
prompts, VQA greedy and 3 beams, batches of 2; BLIP-2 OPT and T5 captions, greedy and 3 beams);
ITM / ITC scores close; auto's routing; blip-run --backend; and the errors: a bad backend name, an
engine bundle, providers with OpenVINO, a graph file OpenVINO cannot parse, OpenVINO missing."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent / "blip2"))  # test_blip2_runtime's helpers
from blip2_oracle import generation_checkpoint  # noqa: E402
from oracle import assert_close, errors  # noqa: E402
from test_blip2_runtime import _export, _images, _theirs  # noqa: E402
from test_e2e import PROMPTS, QUESTIONS, Pair, check_rows, hf_answer, hf_caption, images  # noqa: E402

from blip_export.families import family  # noqa: E402
from blip_runtime import BlipRuntime, BundleError, cli  # noqa: E402
from blip_runtime.graphs import ROLE_LOOP, GraphSpec, TensorSpec  # noqa: E402
from blip_runtime.manifest import load_manifest  # noqa: E402
from blip_runtime.openvino_session import BACKENDS, INSTALL, OvSession, auto_routes  # noqa: E402
from blip_runtime.session import feeds_loop_only  # noqa: E402
from blip_runtime.session import OrtSession  # noqa: E402

BACKEND_IDS = ["openvino", "auto"]
REL = 1e-4  # fp32 graphs in f32 on both engines: the worst measured is ~2e-6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{model: SimpleNamespace(bundle, and the transformers side)} for the five tiny checkpoints."""
    out = {}
    for name, arch, kw in (("caption", "BlipForConditionalGeneration", {}),
                           ("vqa", "BlipForQuestionAnswering", dict(seed=2)),
                           ("itr", "BlipForImageTextRetrieval", dict(seed=3, std=0.1))):
        folder = tmp_path_factory.mktemp(name)
        out[name] = SimpleNamespace(pair=Pair(arch, folder, **kw), bundle=folder / "bundle")
    for lm in ("opt", "t5"):  # the `<image>`-token convention, as test_blip2_runtime's gen fixture builds them
        folder = tmp_path_factory.mktemp(lm)
        theirs = generation_checkpoint(lm, folder / "ckpt")
        _export(folder / "ckpt", folder / "bundle")
        import transformers

        out[lm] = SimpleNamespace(lm=lm, legacy=False, theirs=theirs, cfg=theirs.config, bundle=folder / "bundle",
                                  proc=transformers.Blip2Processor.from_pretrained(folder / "ckpt"))
    return out


@pytest.fixture(scope="module")
def runtime(bundles):
    """runtime(model, backend): one BlipRuntime per pair for the module (OpenVINO compiles at load)."""
    loaded = {}

    def get(model: str, backend: str):
        if (model, backend) not in loaded:
            loaded[model, backend] = BlipRuntime.load(bundles[model].bundle, backend=backend)
        return loaded[model, backend]

    return get


@pytest.fixture(scope="module")
def theirs():
    """theirs(key, compute): transformers' result, computed once for both backends (generate is the
    slow part of this module)."""
    done = {}

    def get(key, compute):
        if key not in done:
            done[key] = compute()
        return done[key]

    return get


@pytest.mark.parametrize("model", ["caption", "vqa", "itr", "opt", "t5"])
@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_every_graph_matches_onnxruntime(backend, model, runtime):
    """At the exporter's verification sizes (the family's), each output: the same name, order and
    dtype as ONNX Runtime's, values within REL, and arrays that a later run does not overwrite."""
    rt = runtime(model, backend)
    manifest = rt.manifest
    loop_inputs = feeds_loop_only(manifest)  # auto keeps these on ONNX Runtime (auto_routes)
    expected = {g: "openvino" if backend == "openvino" or not (spec.has(ROLE_LOOP) or g in loop_inputs)
                else "onnxruntime" for g, spec in manifest.graphs.items()}
    assert rt.session.backends == expected
    ort, fam = OrtSession(load_manifest(manifest.folder)), family(manifest.data["family"])
    for graph, spec in manifest.graphs.items():
        sizes = fam.verify_sizes(spec, manifest.dims)
        kept, copies = None, None
        for i, size in enumerate(sizes):
            feeds = fam.feeds(spec, manifest.dims, size, seed=i)
            ours, want = rt.session.run(graph, feeds), ort.run(graph, feeds)
            assert list(ours) == [t.name for t in spec.outputs] == list(want)
            for name in want:
                assert isinstance(ours[name], np.ndarray) and ours[name].dtype == want[name].dtype, (graph, name)
                assert_close(ours[name], want[name], REL, f"{backend} {model} {graph} {name} {size}")
            if kept is None:
                kept, copies = ours, {k: v.copy() for k, v in ours.items()}
        for name in kept:  # the request's buffers were reused by the later sizes: ours must be copies
            np.testing.assert_array_equal(kept[name], copies[name], err_msg=f"{graph} {name} changed after a later run")
        assert len(sizes) > 1


CAPTION = {"greedy": (None, dict(max_new_tokens=12)), "beam3-prompts": (PROMPTS[2:0:-1], dict(max_new_tokens=12, num_beams=3))}
VQA = {"greedy": dict(max_new_tokens=8), "beam3": dict(max_new_tokens=8, num_beams=3)}


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_blip_caption_and_vqa_tokens_equal_transformers(bundles, backend, runtime, theirs):
    caption, vqa = bundles["caption"].pair, bundles["vqa"].pair
    rt_caption, rt_vqa = runtime("caption", backend), runtime("vqa", backend)
    imgs = images(2, seed=7)  # a batch: each row must be its request alone
    for case, (prompts, gen) in CAPTION.items():
        want = theirs(("caption", case), lambda: [hf_caption(caption, im, p, **gen)
                                                  for im, p in zip(imgs, prompts or [None] * 2)])
        check_rows(rt_caption.caption_tokens(imgs, prompts, **gen), want, f"{backend} caption {case}")
        assert len({tuple(t) for t in want}) > 1, "the random model must caption images differently"
    for case, gen in VQA.items():
        want = theirs(("vqa", case), lambda: [hf_answer(vqa, im, q, **gen) for im, q in zip(imgs, QUESTIONS)])
        check_rows(rt_vqa.answer_tokens(imgs, QUESTIONS[:2], **gen), want, f"{backend} vqa {case}")


@pytest.mark.parametrize("backend", BACKEND_IDS)
@torch.no_grad()
def test_blip_itm_and_itc_scores_close_to_transformers(bundles, backend, runtime):
    itr, rt = bundles["itr"].pair, runtime("itr", backend)
    imgs, texts = images(3, seed=21), ["a red circle", "two blue squares on the left", "what"]
    enc = itr.processor(images=imgs, text=texts, padding=True, return_tensors="pt")
    itm = itr.model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1]
    sim = itr.model(**enc, use_itm_head=False).itm_score
    ours = rt.match(imgs, texts)
    assert_close(ours, itm, 1e-4, f"{backend} ITM probability")
    assert_close(rt.similarity(rt.image_features(imgs), rt.text_features(texts)), sim, 1e-4, f"{backend} ITC similarity")
    assert float(np.ptp(ours)) > 1e-3, "ITM probabilities must differ between pairs"


@pytest.mark.parametrize("lm", ["opt", "t5"])
@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_blip2_caption_tokens_equal_transformers(bundles, backend, lm, runtime, theirs):
    m, rt = bundles[lm], runtime(lm, backend)
    image = _images(1)[0]
    for options in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        for prompt in ([None, "a photo of the"] if lm == "opt" else ["a photo of the"]):
            ref, _, _ = theirs((lm, str(options), prompt), lambda: _theirs(m, image, prompt, **options))
            ours = rt._generate([image], None if prompt is None else [prompt], options)[0]
            print(f"{backend} {lm} {options} prompt={prompt!r}: transformers {ref}, ours {ours}")
            assert ours == ref
            assert len(set(sum(ref, []))) > 2, "a tiny LM that repeats one token proves little"


def test_auto_keeps_onnxruntime_where_openvino_was_not_measured_faster(bundles):
    manifest = load_manifest(bundles["caption"].bundle)
    assert auto_routes(manifest) == {"vision": "openvino", "cross_kv": "onnxruntime", "decoder_step": "onnxruntime"}
    for form in ("fp16", "int8-cpu", "int8-qdq", "int4"):
        other = dataclasses.replace(manifest, data={**manifest.data, "precision": form})
        assert set(auto_routes(other).values()) == {"onnxruntime"}, form
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert set(auto_routes(manifest, cuda).values()) == {"onnxruntime"}
    assert auto_routes(manifest, ["CPUExecutionProvider"]) == auto_routes(manifest)


def test_blip_run_backend_flag(bundles, capsys, theirs):
    assert cli.BACKENDS == BACKENDS
    pair, bundle = bundles["caption"].pair, str(bundles["caption"].bundle)
    path = str(bundle) + "-image.png"
    from PIL import Image

    Image.fromarray(images(1, seed=3)[0]).save(path)
    for backend in BACKEND_IDS:
        assert cli.main([bundle, "caption", path, "--backend", backend, "--max-new-tokens", "6", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        want = theirs(("blip-run", 3), lambda: [pair.processor.decode(
            hf_caption(pair, images(1, seed=3)[0], None, max_new_tokens=6), skip_special_tokens=True)])
        assert [r["caption"] for r in doc["results"]] == want
    assert cli.main([bundle, "caption", path, "--backend", "openvino", "--providers", "cuda", "--json"]) == 1
    assert "takes none" in json.loads(capsys.readouterr().out)["error"]
    with pytest.raises(SystemExit):
        cli.main([bundle, "caption", path, "--backend", "ov"])
    assert "invalid choice: 'ov'" in capsys.readouterr().err


def _one_line(excinfo, *parts):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)


def test_errors(bundles, tmp_path, runtime):
    bundle = bundles["caption"].bundle
    with pytest.raises(ValueError) as e:
        BlipRuntime.load(bundle, backend="tensorrt")
    _one_line(e, "backend='tensorrt'", "'onnxruntime', 'openvino', 'auto'")
    with pytest.raises(ValueError) as e:
        BlipRuntime.load(bundle, backend="openvino", providers=["CPUExecutionProvider"])
    _one_line(e, "providers=", "backend 'openvino'")
    engine = tmp_path / "engine-bundle"  # target "trt": the check comes before any engine is opened
    shutil.copytree(bundle, engine)
    data = json.loads((engine / "manifest.json").read_text())
    (engine / "manifest.json").write_text(json.dumps({**data, "target": "trt"}))
    for backend in BACKEND_IDS:
        with pytest.raises(BundleError) as e:
            BlipRuntime.load(engine, backend=backend, verify=False)
        _one_line(e, "TensorRT engine bundle", repr(backend))
    broken = tmp_path / "broken-bundle"  # a graph file OpenVINO cannot parse: one line naming it
    shutil.copytree(bundle, broken)
    (broken / "vision.onnx").write_bytes((bundle / "vision.onnx").read_bytes()[:3000])
    with pytest.raises(BundleError) as e:
        BlipRuntime.load(broken, backend="openvino", verify=False)
    _one_line(e, str(broken / "vision.onnx"), "OpenVINO cannot compile graph 'vision'")
    session = runtime("caption", "openvino").session
    with pytest.raises(BundleError) as e:
        session.run("decoder", {})
    _one_line(e, "'decoder'", "decoder_step")
    with pytest.raises(ValueError) as e:
        session.run("vision", {"pixels": np.zeros((1, 3, 32, 32), np.float32)})
    _one_line(e, "pixel_values", "pixels")
    manifest = load_manifest(bundle)  # an I/O table edited apart from its graph fails at load, as on ONNX Runtime
    spec = manifest.graphs["vision"]
    renamed = GraphSpec(spec.name, spec.inputs, (TensorSpec("embeds", "float32", spec.outputs[0].shape), *spec.outputs[1:]))
    with pytest.raises(BundleError) as e:
        OvSession(dataclasses.replace(manifest, graphs={**manifest.graphs, "vision": renamed}))
    _one_line(e, "'embeds'", "re-export")


def test_openvino_missing(bundles, monkeypatch):
    """openvino not importable: backend "openvino" says how to install it; "auto" runs every graph on
    ONNX Runtime, with the same tokens."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    bundle = bundles["caption"].bundle
    with pytest.raises(BundleError) as e:
        BlipRuntime.load(bundle, backend="openvino")
    _one_line(e, INSTALL)
    rt = BlipRuntime.load(bundle, backend="auto")
    assert set(rt.session.backends.values()) == {"onnxruntime"}
    imgs = images(2, seed=9)
    assert rt.caption_tokens(imgs, max_new_tokens=6) == bundles["caption"].pair.rt.caption_tokens(imgs, max_new_tokens=6)
    assert errors(rt.vision(imgs)["image_embeds"], bundles["caption"].pair.rt.vision(imgs)["image_embeds"])[0] == 0.0
