"""The contenders, by name. Each loads one model's checkpoint or bundle and runs a case end to end
(preprocessing included), while a StageClock records where the time went.

Stages are measured from outside, without touching the code under test: for our runtime by
wrapping the session's `run(graph, feeds)` per graph name (and `pixels` for preprocessing); for
transformers by forward hooks on `vision_model`, `text_encoder` and `text_decoder` (one
text_decoder call per generated token, so the per-token decode time is measured, not inferred).

To add a contender, add a name to CONTENDERS with a class that has `needs` (the bundle kinds
benchmarks.models must build for it), `unavailable(scale, model)`, `load(scale, model)` and
`run(case, images)`.
"""

from __future__ import annotations

import importlib.util
import time
from collections import defaultdict

from . import models
from .cases import ARCH, BLIP2, QUESTION, TEXT

THREADS = 2  # every contender gets the same two threads


GRAPH_STAGES = {"itm": "text_encoder"}  # graph -> benchmark stage, where they differ


def graph_stage(graph: str, feeds: dict) -> str:
    """The benchmark stage of one graph run: OPT's prompt runs through opt_step (its queries given, a
    non-empty image_prefix), timed as the prefill stage it is."""
    from blip_runtime.families.blip2.graphs import prompt_call

    return "opt_prefill" if graph == "opt_step" and prompt_call(feeds) else GRAPH_STAGES.get(graph, graph)


class StageClock:
    """Seconds and calls per stage within one end-to-end call; `reset()` before each call."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return timed

    def hook(self, stage: str, module) -> None:
        """Time every forward of a torch module (pre/post forward hooks)."""
        start = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))

        def done(*_):
            self.seconds[stage] += time.perf_counter() - start.pop()
            self.calls[stage] += 1

        module.register_forward_hook(done)


class BundleContender:
    """BlipRuntime over one cached bundle kind: ONNX Runtime on the CPU with THREADS threads (fp32,
    int8 as `--precision int8` resolves, int8-cpu, int8-qdq, fp16), or TensorRT engines (trt-fp16,
    trt-int8). TensorRT runs asynchronously, so its stage times are launch times; its end-to-end
    times are exact (logits come to the host every step). `load` reports the bundle's form (its
    manifest's precision), so a row named for "int8" says which form it timed."""

    def __init__(self, kind: str):
        self.kind = kind
        source = models.TRT_SOURCE.get(kind)
        self.needs = [source, kind] if source else [kind]  # bundles to build, sources first
        self.clock = StageClock()

    def unavailable(self, scale: str, model: str) -> str | None:
        if model in BLIP2 and self.kind not in models.BLIP2_KINDS:
            return f"BLIP-2 runs the bundle kinds {', '.join(models.BLIP2_KINDS)}"
        if not (models.bundle(scale, model, self.kind) / "manifest.json").is_file():
            return f"no {self.kind} bundle (see the setup notes)"
        return None

    def load(self, scale: str, model: str) -> dict:
        import onnxruntime

        from blip_runtime import BlipRuntime

        self.rt = BlipRuntime.load(models.bundle(scale, model, self.kind), threads=THREADS)
        self._wrap()
        return {"onnxruntime": onnxruntime.__version__, "threads": THREADS, "session": type(self.rt.session).__name__,
                "kind": self.kind, "form": self.rt.manifest.data.get("precision", "fp32")}

    def _wrap(self) -> None:
        session = self.rt.session
        run = session.run
        # BLIP's itm graph is the multimodal text encoder plus its ITM head: the "text_encoder" stage,
        # as transformers' text_encoder hook times it.
        session.run = lambda graph, feeds, *args, **kwargs: self.clock.wrap(graph_stage(graph, feeds), run)(
            graph, feeds, *args, **kwargs)
        self.rt.pixels = self.clock.wrap("preprocess", self.rt.pixels)

    def run(self, case, images):
        rt, n = self.rt, len(images)
        if case.task == "caption":
            return rt.caption_tokens(images, **case.generation)
        if case.task == "vqa":
            return rt.answer_tokens(images, [QUESTION] * n, **case.generation)
        if case.task == "itm":
            return rt.match(images, [TEXT] * n)
        return rt.image_features(images)


class OvContender(BundleContender):
    """BlipRuntime.load(bundle, backend=...) on a bundle kind's graphs: "openvino" runs every graph on
    OpenVINO's CPU plugin (ov-fp32, ov-int8: the int8 a user gets from `blip-export --precision int8`
    on a CPU, ONNX Runtime's CPU form), "auto" the once-per-request graphs on OpenVINO and the decoding
    loop on ONNX Runtime (auto-fp32). The runtime's OvSession computes in f32 (its precision hint;
    the plugin's default is bf16 on this CPU); each row records which backend ran each graph."""

    def __init__(self, kind: str, backend: str = "openvino"):
        super().__init__(kind)
        self.backend = backend

    def unavailable(self, scale: str, model: str) -> str | None:
        if not importlib.util.find_spec("openvino"):
            return "openvino is not installed (pip install 'blip-trt[openvino]')"
        return super().unavailable(scale, model)

    def load(self, scale: str, model: str) -> dict:
        import openvino

        from blip_runtime import BlipRuntime
        from blip_runtime.openvino_session import OvSession

        self.rt = BlipRuntime.load(models.bundle(scale, model, self.kind), threads=THREADS, backend=self.backend)
        session = self.rt.session
        ov = session if isinstance(session, OvSession) else session.sessions.get("openvino")
        # the precision OpenVINO computes in, as its compiled models report it
        compute = next(iter(ov.compiled.values())).get_property("INFERENCE_PRECISION_HINT").get_type_name() if ov else None
        backends = session.backends
        self._wrap()
        return {"openvino": openvino.__version__, "threads": THREADS, "session": f"backend {self.backend}",
                "kind": self.kind, "backends": backends,
                "form": f"{self.rt.manifest.data.get('precision', 'fp32')}, OpenVINO computing in {compute}"}


class TransformersContender:
    """What users run today: transformers' BLIP classes, eager PyTorch, torch.set_num_threads(THREADS);
    fp32, or (dtype "bfloat16", BLIP-2 only) the LM and the vision model in bf16 (benchmarks.blip2_cases)."""

    def __init__(self, dtype: str | None = None):
        self.dtype = dtype
        self.needs = ("ckpt-bf16",) if dtype == "bfloat16" else ()  # BLIP-2's weights stored in bf16 (blip2_cases)
        self.clock = StageClock()

    def unavailable(self, scale: str, model: str) -> str | None:
        if not importlib.util.find_spec("transformers"):
            return "transformers is not installed"
        if self.dtype and model not in BLIP2:
            return f"{self.dtype} is run for BLIP-2 only"
        return None

    def load(self, scale: str, model: str) -> dict:
        import torch
        import transformers

        self.blip2 = model in BLIP2
        if self.blip2:
            from .blip2_cases import load_transformers

            return load_transformers(self, scale, self.dtype)
        torch.set_num_threads(THREADS)
        ckpt = models.folder(scale, model) / "ckpt"
        self.model = getattr(transformers, ARCH[model]).from_pretrained(ckpt).eval()
        self.processor = transformers.BlipProcessor.from_pretrained(ckpt)
        for stage in ("vision_model", "text_encoder", "text_decoder"):
            if hasattr(self.model, stage):
                self.clock.hook({"vision_model": "vision", "text_decoder": "decoder_step"}.get(stage, stage),
                                getattr(self.model, stage))
        return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": THREADS,
                "attn_implementation": self.model.config._attn_implementation}

    def run(self, case, images):
        import torch

        if self.blip2:
            from .blip2_cases import run_transformers

            return run_transformers(self, case, images)
        n = len(images)
        text = {"caption": None, "vqa": [QUESTION] * n, "itm": [TEXT] * n, "itc": None}[case.task]
        with torch.inference_mode():
            enc = self.clock.wrap("preprocess", self.processor)(images=images, text=text, return_tensors="pt")
            if case.task in ("caption", "vqa"):
                return self.model.generate(**enc, **case.generation).tolist()
            if case.task == "itm":
                return self.model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1].numpy()
            # ITC image features as BlipForImageTextRetrieval.forward(use_itm_head=False) makes them
            embeds = self.model.vision_model(pixel_values=enc["pixel_values"])[0]
            return torch.nn.functional.normalize(self.model.vision_proj(embeds[:, 0, :]), dim=-1).numpy()


def _ov_native(variant: str):
    from .openvino_native import OvNativeContender

    return OvNativeContender(variant)


CONTENDERS = {
    "transformers": TransformersContender,
    "transformers-bf16": lambda: TransformersContender("bfloat16"),  # BLIP-2 only
    "ort-fp32": lambda: BundleContender("fp32"),
    # int8 as a user types it (blip-export --precision int8: int8-cpu for an ONNX bundle), beside both forms by name
    "ort-int8": lambda: BundleContender("int8"),
    "ort-int8-cpu": lambda: BundleContender("int8-cpu"),
    "ort-int8-qdq": lambda: BundleContender("int8-qdq"),  # symmetric Q/DQ, TensorRT's form
    "ort-fp16": lambda: BundleContender("fp16"),
    "ort-int4": lambda: BundleContender("int4"),  # 4-bit MatMulNBits weights
    "trt-fp16": lambda: BundleContender("trt-fp16"),
    "trt-int8": lambda: BundleContender("trt-int8"),
    "ov-fp32": lambda: OvContender("fp32"),  # OpenVINO on the fp32 bundle's graphs
    "ov-int8": lambda: OvContender("int8-cpu"),  # OpenVINO on the int8 graphs `--precision int8` writes for a CPU
    # the fp32 bundle with backend="auto": OpenVINO for the image graphs, ONNX Runtime for the decoding loop
    "auto-fp32": lambda: OvContender("fp32", backend="auto"),
    # OpenVINO's own path: transformers' modules converted by openvino.convert_model, NNCF int8 / int4
    "ov-native-fp32": lambda: _ov_native("fp32"),
    "ov-native-bf16": lambda: _ov_native("bf16"),
    "ov-native-int8": lambda: _ov_native("int8"),
    "ov-native-int4": lambda: _ov_native("int4"),
}
BASELINE = "transformers"
