"""OpenVINO's own recommended path for BLIP captioning, as a contender ("ov-native-*"): not our graphs.

What OpenVINO's BLIP guide does, without optimum-intel (whose wheel would replace this venv's torch and
transformers): `openvino.convert_model` on transformers' own modules, `vision_model` and `text_decoder`
with its self-attention cache as tensors (the cross-attention over the image is recomputed every step,
as transformers' module does when handed a fresh cache), then NNCF:

- ov-native-fp32: the converted models as they are;
- ov-native-int8: `nncf.quantize` of the vision model on calibration images (static int8 activations and
  weights, model_type TRANSFORMER) and `nncf.compress_weights` int8 of the decoder (weights only);
- ov-native-int4: the same vision model, the decoder's weights in int4 (INT4_SYM, group 128 or the
  largest group that divides the width: the mode OpenVINO suggests for LMs).

Decoding is a greedy loop in numpy around the decoder (EOS suppressed until min_new_tokens, as
transformers' MinNewTokensLengthLogitsProcessor does); its tokens are checked against transformers' in
RESULTS.md. Preprocessing is blip_runtime's (the same pixels as BlipProcessor's), so the process never
imports torch. Greedy captioning only: the other cases are reported as not supported.

    python -m benchmarks.openvino_native [--scale tiny]   # converts (cached) and captions one image
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fp32", "bf16", "int8", "int4")  # decoder weights; the vision model is NNCF-int8 in int8 and int4
# OpenVINO's CPU plugin computes in bf16 by default where the CPU has AVX512_BF16 or AMX (this one
# does): fp32 asks for f32 explicitly; bf16 is the same fp32 models at the plugin's default; the
# int8 variants run at the default too (their float parts in bf16), as OpenVINO's guide leaves them.
PRECISION_HINT = {"fp32": "f32"}
SOURCE = {"bf16": "fp32"}  # variants that run another variant's models
SETTINGS = "ov_native.json"  # beside the IR files: what the loop and preprocessing need, no torch config


def kind(variant: str) -> str:
    """The cached folder kind (benchmarks.models.bundle) of a variant's models."""
    return f"ov-native-{SOURCE.get(variant, variant)}"


# -- conversion (torch, transformers, nncf: in the setup process) ----------------------------------------
def _decoder_wrapper(decoder, layers: int):
    import torch
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.cache_utils import DynamicLayer

    def filled(pairs) -> DynamicCache:
        # layers filled in place: DynamicCache.update concatenates onto an empty 1-D tensor, which
        # OpenVINO's converter cannot type (Concat axis -2 of a rank-1 input)
        cache = DynamicCache()
        cache.layers = []
        for k, v in pairs:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache

    class DecoderWithPast(torch.nn.Module):
        """transformers' BlipTextLMHeadModel with its self-attention cache as flat tensors.
        in: input_ids int64 [B, 1], attention_mask int64 [B, P + 1], position_ids int64 [B, 1],
        encoder_hidden_states float32 [B, N, D], past_key.i / past_value.i float32 [B, H, P, Dh];
        out: logits float32 [B, V] (last position), present_key.i / present_value.i [B, H, P + 1, Dh]."""

        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, attention_mask, position_ids, encoder_hidden_states, *past):
            cache = filled((past[2 * i], past[2 * i + 1]) for i in range(layers))
            # cross-attention K/V start empty ([B, H, 0, Dh]) and are computed from the image every call
            empty = past[0][:, :, :0, :]
            both = EncoderDecoderCache(cache, filled((empty, empty) for _ in range(layers)))
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               encoder_hidden_states=encoder_hidden_states, cache=both, use_cache=True,
                               return_dict=True)
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (out.logits[:, -1, :], *present)

    return DecoderWithPast().eval()


def _group(width: int, wanted: int = 128) -> int:
    """The largest of 128, 64, 32, 16 dividing `width` (int4 groups must tile a row), else -1 (per channel)."""
    return next((g for g in (wanted, 64, 32, 16) if width % g == 0), -1)


def convert(ckpt: Path, dst: Path, variant: str, calib_images: list) -> None:
    """Write `variant`'s vision.xml / decoder.xml (+ .bin) and SETTINGS to `dst` from the checkpoint."""
    import nncf
    import openvino as ov
    import torch
    import transformers

    from blip_runtime.image import ImageSettings, preprocess

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    torch.set_num_threads(2)
    model = transformers.BlipForConditionalGeneration.from_pretrained(ckpt).eval()
    proc = transformers.BlipProcessor.from_pretrained(ckpt).image_processor
    tc = model.config.text_config
    settings = {"size": [proc.size["height"], proc.size["width"]], "mean": list(proc.image_mean),
                "std": list(proc.image_std), "bos_token_id": tc.bos_token_id, "eos_token_id": tc.sep_token_id,
                "layers": tc.num_hidden_layers, "heads": tc.num_attention_heads,
                "head_dim": tc.hidden_size // tc.num_attention_heads, "variant": variant,
                "nncf": nncf.__version__, "openvino": ov.__version__}
    pix = preprocess(calib_images, ImageSettings(size=tuple(settings["size"]), mean=tuple(settings["mean"]),
                                                 std=tuple(settings["std"])))
    with torch.inference_mode():
        vision = ov.convert_model(model.vision_model, example_input=torch.from_numpy(pix[:1]),
                                  input=[ov.PartialShape([-1, 3, *settings["size"]])])
        embeds = model.vision_model(pixel_values=torch.from_numpy(pix[:1]))[0]
        L, H, Dh = settings["layers"], settings["heads"], settings["head_dim"]
        past = [torch.zeros(1, H, 1, Dh) for _ in range(2 * L)]  # traced at past length 1; the axis is dynamic
        example = (torch.tensor([[settings["bos_token_id"]]]), torch.ones(1, 2, dtype=torch.long),
                   torch.tensor([[1]]), embeds, *past)
        shapes = [ov.PartialShape([-1, -1]), ov.PartialShape([-1, -1]), ov.PartialShape([-1, -1]),
                  ov.PartialShape([-1, -1, embeds.shape[-1]])] + [ov.PartialShape([-1, H, -1, Dh])] * (2 * L)
        decoder = ov.convert_model(_decoder_wrapper(model.text_decoder, L), example_input=example, input=shapes)
    names = ["input_ids", "attention_mask", "position_ids", "encoder_hidden_states"] + [
        f"past_{kv}.{i}" for i in range(L) for kv in ("key", "value")]
    for port, name in zip(decoder.inputs, names):
        port.get_tensor().set_names({name})
    del model
    if variant != "fp32":
        calib = nncf.Dataset([pix[i : i + 1] for i in range(len(pix))])
        vision = nncf.quantize(vision, calib, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pix))
        if variant == "int8":
            decoder = nncf.compress_weights(decoder, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:  # ADJUST: a layer whose width the group does not divide gets a group that does
            from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

            decoder = nncf.compress_weights(
                decoder, mode=nncf.CompressWeightsMode.INT4_SYM, ratio=1.0, group_size=_group(tc.hidden_size),
                advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
    dst.mkdir(parents=True, exist_ok=True)
    ov.save_model(vision, dst / "vision.xml")
    ov.save_model(decoder, dst / "decoder.xml")
    (dst / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")


# -- the contender (openvino and numpy only) -----------------------------------------------------------
class OvNativeContender:
    """OpenVINO's converted transformers modules with a numpy greedy loop; greedy captions only."""

    def __init__(self, variant: str):
        from .contenders import StageClock

        self.variant, self.kind = variant, kind(variant)
        self.needs = [self.kind]
        self.clock = StageClock()

    def unavailable(self, scale: str, model: str) -> str | None:
        import importlib.util

        from . import models

        if not importlib.util.find_spec("openvino"):
            return "openvino is not installed (pip install openvino)"
        if model != "caption":
            return "greedy captioning only (OpenVINO's BLIP guide converts the caption model)"
        if not (models.bundle(scale, model, self.kind) / SETTINGS).is_file():
            return f"no {self.kind} models (see the setup notes)"
        return None

    def supports(self, case) -> str | None:
        """Why this contender does not run `case`, or None."""
        return None if case.task == "caption" and case.num_beams == 1 else "greedy captioning only"

    def load(self, scale: str, model: str) -> dict:
        import openvino as ov

        from blip_runtime.image import ImageSettings

        from . import models
        from .contenders import THREADS

        folder = models.bundle(scale, model, self.kind)
        self.settings = s = json.loads((folder / SETTINGS).read_text())
        self.image = ImageSettings(size=tuple(s["size"]), mean=tuple(s["mean"]), std=tuple(s["std"]))
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        if self.variant in PRECISION_HINT:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINT[self.variant]
        vision = core.compile_model(folder / "vision.xml", "CPU", config)
        decoder = core.compile_model(folder / "decoder.xml", "CPU", config)
        self.vision, self.decoder = vision.create_infer_request(), decoder.create_infer_request()
        compute = vision.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        what = {"fp32": "fp32", "bf16": "fp32 models", "int8": "NNCF int8 vision, int8 decoder weights",
                "int4": "NNCF int8 vision, int4 decoder weights"}[self.variant]
        return {"openvino": ov.__version__, "nncf": s["nncf"], "threads": THREADS, "session": "OvNative",
                "kind": self.kind, "form": f"OpenVINO {what}, computing in {compute}"}

    def run(self, case, images) -> list[list[int]]:
        """Token ids per image, [bos] + the generated ones, as transformers' generate returns them."""
        from blip_runtime.image import preprocess

        s, clock = self.settings, self.clock
        pix = clock.wrap("preprocess", preprocess)(list(images), self.image)
        embeds = clock.wrap("vision", self._vision)(pix)  # [B, N, D]
        return self._greedy(embeds, case.generation, s)  # its steps are timed as "decoder_step"

    def _vision(self, pix: np.ndarray) -> np.ndarray:
        self.vision.infer({0: pix})
        return self.vision.get_output_tensor(0).data.copy()

    def _greedy(self, embeds: np.ndarray, generation: dict, s: dict) -> list[list[int]]:
        b, (L, H, Dh) = len(embeds), (s["layers"], s["heads"], s["head_dim"])
        eos, ids = s["eos_token_id"], np.full((b, 1), s["bos_token_id"], np.int64)
        past = {f"past_{kv}.{i}": np.zeros((b, H, 0, Dh), np.float32) for i in range(L) for kv in ("key", "value")}
        out, done = [ids], np.zeros(b, bool)
        step = self.clock.wrap("decoder_step", self._step)
        for t in range(generation["max_new_tokens"]):
            logits, past = step(ids, t, embeds, past)
            if t < generation["min_new_tokens"]:
                logits[:, eos] = -np.inf
            ids = np.where(done, 0, logits.argmax(-1))[:, None].astype(np.int64)  # pad (0) after EOS
            done |= ids[:, 0] == eos
            out.append(ids)
            if done.all():
                break
        return np.concatenate(out, axis=1).tolist()

    def _step(self, ids, t, embeds, past):
        b = len(ids)
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, t + 1), np.int64),
                 "position_ids": np.full((b, 1), t, np.int64), "encoder_hidden_states": embeds, **past}
        self.decoder.infer(feeds)
        # copies: the request reuses its output buffers on the next infer, and the loop keeps the past
        outs = [self.decoder.get_output_tensor(i).data.copy() for i in range(1 + len(past))]
        return outs[0], dict(zip(past, outs[1:]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("base", "tiny"), default="tiny")
    p.add_argument("--variant", choices=VARIANTS, default="fp32")
    args = p.parse_args()
    from . import models
    from .cases import CASES, images

    print(models.build(args.scale, [kind(args.variant)]) or "ready")

    c = OvNativeContender(args.variant)
    c.load(args.scale, "caption")
    start = time.perf_counter()
    print(c.run(CASES[0], images(1, seed=1)), f"{time.perf_counter() - start:.2f} s")
