"""TrtSession over BLIP-2 engine bundles, on the CPU stand-ins for CUDA and TensorRT (tests/fake_trt.py).

Every graph's engine against ONNX Runtime; generation (OPT and Flan-T5; greedy, 3 beams and sampling;
captions with and without a prompt, VQA) through the engine bundle equal to the ONNX bundle's tokens,
while the LM's KV cache (each step's present_* fed back as the next step's past_*) and T5's cross K/V
stay DeviceTensors: per step only the logits come to the host and only the small int inputs go to the
device; the beam moves ride in the step graphs' beam_idx. Real engines: tests/export/blip2/test_blip2_trt.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import fake_trt
from blip2_oracle import hf_config, make_checkpoint
from blip_export.bundle import export_bundle
from blip_export.families.blip2.export import random_feeds, verify_sizes
from blip_export.trt_build import build_engines
from blip_runtime import BlipRuntime
from blip_runtime.device import DeviceTensor
from blip_runtime.graphs import Limits
from blip_runtime.manifest import load_manifest
from blip_runtime.session import OrtSession

LIMITS = Limits(max_batch=4, max_text_len=32, max_new_tokens=12, num_beams=3)
STEPS = {"opt": "opt_step", "t5": "t5_step"}
QUESTIONS = ["what color", "what shape is it", "two"]
GENERATIONS = {"greedy": {"max_new_tokens": 8}, "beams": {"num_beams": 3, "max_new_tokens": 8},
               "sample": {"do_sample": True, "top_k": 5, "seed": 3, "max_new_tokens": 6}}


@pytest.fixture(scope="module")
def onnx_bundles(tmp_path_factory):
    """fp32 ONNX bundles of tiny re-randomized Blip2ForConditionalGeneration checkpoints (OPT, Flan-T5
    style), spread so that different images give different tokens."""
    out = {}
    for lm in STEPS:
        root = tmp_path_factory.mktemp(lm)
        if lm == "opt":  # an untied head: tied to its spread-out embeddings, a tiny LM repeats its input
            config = hf_config("opt", True, text_overrides={"tie_word_embeddings": False})
            make_checkpoint("Blip2ForConditionalGeneration", root / "ckpt", config, seed=7, std=0.2)
        else:
            make_checkpoint("Blip2ForConditionalGeneration", root / "ckpt", hf_config("t5", True), seed=8, std=0.1,
                            untie_head=True)
        export_bundle(root / "ckpt", root / "bundle")
        out[lm] = root / "bundle"
    return out


@pytest.fixture
def cuda(monkeypatch):
    return fake_trt.install(monkeypatch)


def engines(onnx_bundles, lm, tmp_path):
    build_engines(onnx_bundles[lm], tmp_path / "trt", LIMITS, tmp_path / "timing.cache")
    return load_manifest(tmp_path / "trt")


def images(n: int = 3, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 5 * i, 36, 3), dtype=np.uint8) for i in range(n)]


@dataclass
class Run:
    """One session.run as the runtime made it: what each feed and output was, and the bytes that
    crossed between host and device during it."""

    graph: str
    feeds: dict  # name -> the value fed (DeviceTensors of this session, numpy arrays)
    outputs: dict
    h2d: int
    d2h: int
    d2d_before: int  # device-to-device copies so far (bytes), at the start and the end of the run
    d2d_after: int
    host_feed_bytes: int = field(init=False)

    def __post_init__(self):
        self.host_feed_bytes = sum(v.nbytes for v in self.feeds.values() if isinstance(v, np.ndarray))


class Recorder:
    """The Session the runtime talks to: passes every call to the TrtSession and records it."""

    def __init__(self, session, cuda: fake_trt.FakeCuda):
        self.session, self.cuda, self.runs = session, cuda, []

    def run(self, graph, feeds, keep=()):
        before = dict(self.cuda.copied)
        out = self.session.run(graph, feeds, keep=keep)
        moved = {k: self.cuda.copied[k] - before.get(k, 0) for k in ("H2D", "D2H")}
        self.runs.append(Run(graph, dict(feeds), dict(out), moved["H2D"], moved["D2H"], before.get("D2D", 0),
                             self.cuda.copied["D2D"]))
        return out


def _check_device_loop(runs: list[Run], lm: str, beams: bool) -> None:
    """What crossed between host and device in one request's runs (from the first vision run on)."""
    step = STEPS[lm]
    steps = [r for r in runs if r.graph == step]
    assert steps, [r.graph for r in runs]
    if lm == "opt":  # the prompt's call is the step graph's first run (an empty cache), then the steps
        source, steps = steps[0], steps[1:]
        assert source.feeds["image_prefix"].shape[1] > 0 and all(r.feeds["image_prefix"].shape[1] == 0 for r in steps)
        assert all(v.nbytes == 0 for k, v in source.feeds.items() if k.startswith("past_"))
    else:
        (source,) = [r for r in runs if r.graph == "t5_cross_kv"]
    assert all(isinstance(v, DeviceTensor) for k, v in source.outputs.items() if k != "logits"), source.graph
    if lm == "opt":
        assert source.d2h == source.outputs["logits"].nbytes, "the prompt call's cache must stay on the device"
    else:
        assert source.d2h == 0, "the cross K/V must stay on the device"
    previous = source
    for r in steps:
        for name, value in r.feeds.items():
            if name.startswith("past_") and lm == "t5" and r is steps[0]:
                assert value.nbytes == 0, name  # T5's first step: an empty cache, no bytes
            elif name.startswith("past_"):  # fed back as is: the very buffer the last run wrote
                assert isinstance(value, DeviceTensor), f"{step} {name}: {type(value).__name__}"
                assert value is previous.outputs[name.replace("past_", "present_")], name
            elif name.startswith("cross_"):
                assert isinstance(value, DeviceTensor), f"{step} {name}: {type(value).__name__}"
        assert isinstance(r.outputs["logits"], np.ndarray)
        assert all(isinstance(v, DeviceTensor) for k, v in r.outputs.items() if k.startswith("present_"))
        assert r.d2h == r.outputs["logits"].nbytes, \
            f"{step}: {r.d2h} bytes to the host, the logits are {r.outputs['logits'].nbytes}"
        assert r.h2d == r.host_feed_bytes, f"{step}: {r.h2d} bytes to the device, the host feeds are {r.host_feed_bytes}"
        previous = r
    identity = [np.array_equal(r.feeds["beam_idx"], np.arange(len(r.feeds["beam_idx"]))) for r in steps]
    # beam search reorders rows on some step (the graph's beam_idx gather); greedy and sampling never do
    assert (not all(identity)) == beams, identity
    if lm == "t5":
        # each request's cross K/V go to its 3 beams once, before the first step, by device-to-device copies
        expanded = steps[0].feeds["cross_key.0"].shape[0] != source.outputs["cross_key.0"].shape[0]
        between = steps[0].d2d_before - source.d2d_after
        assert expanded == beams and (between > 0) == expanded, (expanded, between)


@pytest.mark.parametrize("how", list(GENERATIONS))
@pytest.mark.parametrize("lm", list(STEPS))
def test_generation_keeps_the_cache_on_the_device(onnx_bundles, cuda, tmp_path, lm, how):
    from blip_runtime.trt_session import TrtSession

    gen, imgs = GENERATIONS[how], images()
    ref = BlipRuntime.load(onnx_bundles[lm])
    manifest = engines(onnx_bundles, lm, tmp_path)
    with TrtSession(manifest) as trt:
        recorder = Recorder(trt, cuda)
        ours = BlipRuntime(manifest, recorder)
        calls = (("caption_tokens", (imgs,)), ("caption_tokens", (imgs, "a photo of")), ("answer_tokens", (imgs, QUESTIONS)))
        for method, args in calls:
            start = len(recorder.runs)
            got, want = getattr(ours, method)(*args, **gen), getattr(ref, method)(*args, **gen)
            print(f"{lm} {how} {method}{'' if len(args) == 1 else ' ' + repr(args[1])}: {got}")
            assert got == want, (method, args[1:])
            if how == "greedy" and len(args) == 1:  # the comparison means something: the images lead to
                assert len({tuple(t) for t in want}) > 1, want  # different tokens (no prompt: no tokenizer in it)
            _check_device_loop(recorder.runs[start:], lm, beams=how == "beams")
        if lm == "opt":  # the prompt calls ran on opt_step's prompt profile, every later step on the first
            step = trt._engines["opt_step"]
            prompts = sum(1 for r in recorder.runs if r.graph == "opt_step" and r.feeds["image_prefix"].shape[1])
            steps = sum(1 for r in recorder.runs if r.graph == "opt_step") - prompts
            assert [c.profile for c in step.contexts] == [0, 1]
            assert [c.executed for c in step.contexts] == [steps, prompts] and prompts == len(calls), (steps, prompts)
        del recorder, ours
    assert cuda.live == 0, "close() and dropped tensors must free every device buffer"


def test_runtime_load_opens_the_engine_bundle(onnx_bundles, cuda, tmp_path):
    """BlipRuntime.load on an engine bundle gives the BLIP-2 runtime over a TrtSession."""
    from blip_runtime.families.blip2.runtime import Blip2FamilyRuntime
    from blip_runtime.trt_session import TrtSession

    manifest = engines(onnx_bundles, "t5", tmp_path)
    ours = BlipRuntime.load(manifest.folder)
    assert isinstance(ours, Blip2FamilyRuntime) and isinstance(ours.session, TrtSession)
    ref = BlipRuntime.load(onnx_bundles["t5"])
    assert ours.answer_tokens(images(2), QUESTIONS[:2], num_beams=3, max_new_tokens=5) == \
        ref.answer_tokens(images(2), QUESTIONS[:2], num_beams=3, max_new_tokens=5)
    ours.session.close()


@pytest.mark.parametrize("lm", list(STEPS))
def test_every_engine_matches_onnxruntime(onnx_bundles, cuda, tmp_path, lm):
    """Each graph's engine at the exporter's verification sizes (prompts of 1..11 text tokens, past 0..9,
    several new tokens once, more rows than requests once): outputs, names and dtypes as ONNX Runtime's."""
    from blip_runtime.trt_session import TrtSession

    ort = OrtSession(load_manifest(onnx_bundles[lm]))
    with TrtSession(engines(onnx_bundles, lm, tmp_path)) as trt:
        d = trt.manifest.dims
        for graph, spec in trt.manifest.graphs.items():
            for i, sizes in enumerate(verify_sizes(d)):
                feeds = random_feeds(spec, d, sizes, seed=i)
                ours, want = trt.run(graph, feeds), ort.run(graph, feeds)
                assert list(ours) == list(want)
                for name in want:
                    assert isinstance(ours[name], np.ndarray) and ours[name].dtype == want[name].dtype
                    np.testing.assert_array_equal(ours[name], want[name], err_msg=f"{graph} {name} {sizes}")
    assert cuda.live == 0


def test_rows_beyond_the_profile(onnx_bundles, cuda, tmp_path):
    """3 images x 5 beams = 15 decoder rows, over the 4 x 3 the engines were built for: one line naming
    the input, the built range and the rebuild command."""
    from blip_runtime.trt_session import TrtSession

    with TrtSession(engines(onnx_bundles, "opt", tmp_path)) as trt:
        rt = BlipRuntime(trt.manifest, trt)
        with pytest.raises(ValueError, match=r"opt_step: input 'input_ids' has shape \(15, .*outside the shapes "
                                             r"these engines were built for .*--num-beams 3") as e:
            rt.caption_tokens(images(), num_beams=5, max_new_tokens=4)
        assert "\n" not in str(e.value)
