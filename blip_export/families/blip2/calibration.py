"""BLIP-2's calibration workload: every task of a bundle over images, with their texts.

Feeds are recorded, not synthesized (blip_export.calibration records what the runtime's session is
fed): vision and qformer see preprocessed images; opt_step (its prompt calls) / t5_encoder the prompts of
captions (with and without a prompt) and of VQA, behind the image tokens; opt_step / t5_cross_kv /
t5_step every step of the fp32 model's own greedy decoding; itm / text_features tokenized texts;
text_states (Blip2Model's get_text_features) the same texts through the LM's tokenizer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...calibration import texts_for as _texts_for


def _text_states(runtime, texts: list[str]) -> np.ndarray:
    """The LM over text alone (the text_states graph), through the runtime's session so that a
    recording session sees it; the runtime has no task method for it. float32 [B, S, D]."""
    ids, mask = runtime.text.encode(texts, image_tokens=False)
    return runtime.session.run("text_states", {"input_ids": ids, "attention_mask": mask})["text_states"]


def exercise(runtime, images: list, texts: Sequence[str] | None = None, batch_size: int = 2,
             tasks: Sequence[str] | None = None, **generation) -> dict:
    """Run every task of the BLIP-2 bundle (or `tasks`) over `images`, `batch_size` at a time.

    texts: one per image (cycled if fewer), a string or {"caption", "question"}
    (calibration.texts_for): the VQA questions, the ITM/ITC texts, and (first three
    words) caption prompts; defaults are generic. Generation is the bundle's default (greedy unless
    its generation config says otherwise), with `generation` on top. Returns, for the tasks the
    bundle has: "caption", "caption_prompted", "vqa": token lists (generate); "features": the
    query outputs, float32 [N * Q * 768] flattened, and "text_states" likewise (features); "itm":
    float32 [N]; "itc": similarity float32 [N, N]."""
    tasks = [t for t in (tasks or runtime.tasks) if t in runtime.tasks]
    out: dict = {}
    for start in range(0, len(images), batch_size):
        imgs = images[start : start + batch_size]
        if "generate" in tasks:
            out.setdefault("caption", []).extend(runtime.caption_tokens(imgs, None, **generation))
            prompts = [" ".join(t.split()[:3]) for t in _texts_for(start, len(imgs), texts, "caption")]
            out.setdefault("caption_prompted", []).extend(runtime.caption_tokens(imgs, prompts, **generation))
            questions = _texts_for(start, len(imgs), texts, "vqa")
            out.setdefault("vqa", []).extend(runtime.answer_tokens(imgs, questions, **generation))
        if "features" in tasks:
            out.setdefault("features", []).append(runtime.qformer_features(imgs).ravel())
            lm_texts = _texts_for(start, len(imgs), texts, "features")
            out.setdefault("text_states", []).append(_text_states(runtime, lm_texts).ravel())
        if "itm" in tasks:
            out.setdefault("itm", []).extend(runtime.match(imgs, _texts_for(start, len(imgs), texts, "itm")))
        if "itc" in tasks:
            out.setdefault("itc_image", []).append(runtime.image_features(imgs))
            out.setdefault("itc_text", []).append(runtime.text_features(_texts_for(start, len(imgs), texts, "itc")))
    for key in ("features", "text_states"):
        if key in out:
            out[key] = np.concatenate(out[key]).astype(np.float32)
    if "itm" in out:
        out["itm"] = np.asarray(out["itm"], np.float32)
    if "itc_image" in out:
        out["itc"] = runtime.similarity(np.concatenate(out.pop("itc_image")), np.concatenate(out.pop("itc_text")))
    return out
