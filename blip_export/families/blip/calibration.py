"""BLIP's calibration workload: every task of a bundle over images, with their texts.

Feeds are recorded, not synthesized (blip_export.calibration): so vision is calibrated on
preprocessed images, text_encoder / itm / text_features on tokenized texts, cross_kv on the real image
(caption) or question (VQA) states, and decoder_step on every step of the fp32 model's own greedy
decoding (past lengths 0..n, prompted and not): the text the fp32 model generates is the text the
int8 decoder is calibrated on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...calibration import texts_for as _texts_for


def exercise(runtime, images: list, texts: Sequence[str] | None = None, batch_size: int = 2,
             tasks: Sequence[str] | None = None, **generation) -> dict:
    """Run every task of the bundle (or `tasks`) over `images`, `batch_size` at a time, greedy.

    texts: one per image (cycled if fewer), a string or {"caption", "question"}
    (calibration.texts_for): the VQA questions, the ITM/ITC texts, and (first three
    words) caption prompts; defaults are generic. Returns {"caption": token lists, "caption_prompted":
    token lists, "vqa": token lists, "itm": float32 [N], "itc": similarity float32 [N, N]}, for the
    tasks the bundle has."""
    tasks = [t for t in (tasks or runtime.tasks) if t in runtime.tasks]
    out: dict = {}
    for start in range(0, len(images), batch_size):
        imgs = images[start : start + batch_size]
        if "caption" in tasks:
            out.setdefault("caption", []).extend(runtime.caption_tokens(imgs, None, **generation))
            prompts = [" ".join(t.split()[:3]) for t in _texts_for(start, len(imgs), texts, "caption")]
            out.setdefault("caption_prompted", []).extend(runtime.caption_tokens(imgs, prompts, **generation))
        if "vqa" in tasks:
            questions = _texts_for(start, len(imgs), texts, "vqa")
            out.setdefault("vqa", []).extend(runtime.answer_tokens(imgs, questions, **generation))
        if "itm" in tasks:
            out.setdefault("itm", []).extend(runtime.match(imgs, _texts_for(start, len(imgs), texts, "itm")))
        if "itc" in tasks:
            out.setdefault("itc_image", []).append(runtime.image_features(imgs))
            out.setdefault("itc_text", []).append(runtime.text_features(_texts_for(start, len(imgs), texts, "itc")))
    if "itm" in out:
        out["itm"] = np.asarray(out["itm"], np.float32)
    if "itc_image" in out:
        out["itc"] = runtime.similarity(np.concatenate(out.pop("itc_image")), np.concatenate(out.pop("itc_text")))
    return out
