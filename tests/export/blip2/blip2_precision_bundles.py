"""Tiny BLIP-2 checkpoints -> fp32 bundles -> reduced-precision bundles, each built once per test module
(the precision tests of fp16, int8 and int4 share it). Checkpoints are transformers' models built from
configs with re-randomized weights (blip2_oracle), saved with save_pretrained and a Blip2Processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blip2_oracle import bert_processor, generation_checkpoint, hf_config, make_checkpoint
from blip_export.bundle import export_bundle
from blip_export.precision import convert_bundle

TEXTS = ["a red circle on the left", "what color is the shape?", "two blue squares", "is there a triangle",
         "a picture of a green square", "what is on the top", "the small dog", "a cat and a dog"]
KINDS = ("opt", "t5", "itm", "model")  # Blip2ForConditionalGeneration OPT / T5, retrieval, Blip2Model


def images(n: int, seed: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size + 5 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def checkpoint(kind: str, folder: Path):
    """A tiny checkpoint of `kind` at `folder`; returns the transformers model."""
    if kind in ("opt", "t5"):
        return generation_checkpoint(kind, folder)
    if kind == "model":
        return make_checkpoint("Blip2Model", folder, hf_config("opt", True), seed=2, std=0.1)
    if kind == "model-t5":  # get_text_features through T5's encoder: text_states with T5's rules
        return make_checkpoint("Blip2Model", folder, hf_config("t5", True), seed=4, std=0.1, untie_head=True)
    if kind == "itm":
        proc = bert_processor(4)
        config = hf_config("opt", False, text_input=True)
        config.image_token_index = proc.tokenizer.convert_tokens_to_ids("<image>")
        model = make_checkpoint("Blip2ForImageTextRetrieval", folder, config, seed=3, std=0.1, with_processor=False)
        proc.save_pretrained(folder)
        return model
    raise ValueError(f"kind {kind!r}: expected one of {(*KINDS, 'model-t5')}")


class Bundles:
    """bundles(kind, precision) -> the bundle folder, built on first use. Calibration on 8 images
    (int8-qdq), measurement on 4 others (every form); fp16, int8-cpu and int4 calibrate nothing."""

    def __init__(self, root: Path):
        self.root, self.made, self.manifests = Path(root), {}, {}

    def checkpoint(self, kind: str) -> Path:
        folder = self.root / f"{kind}-ckpt"
        if not folder.exists():
            checkpoint(kind, folder)
        return folder

    def __call__(self, kind: str, precision: str = "fp32", **options) -> Path:
        key = (kind, precision, tuple(sorted(options.items())))
        if key not in self.made:
            suffix = "".join(f"-{k}{v}" for k, v in sorted(options.items()))
            dst = self.root / f"{kind}-{precision}{suffix}"
            if precision == "fp32":
                export_bundle(self.checkpoint(kind), dst)
            else:
                self.manifests[key] = convert_bundle(
                    self(kind), dst, precision, images(8, seed=10), TEXTS,
                    holdout_images=images(4, seed=20), holdout_texts=TEXTS[::-1][:4], **options)
            self.made[key] = dst
        return self.made[key]
