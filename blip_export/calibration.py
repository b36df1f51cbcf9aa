"""Calibration and held-out data from real images, and the end-to-end comparison of two bundles.

Feeds are recorded, not synthesized: the fp32 bundle's BlipRuntime runs every task of the bundle on
the images (and their captions or questions) through a session that records what each graph is
fed. So vision is calibrated on preprocessed images, text_encoder / text_features on tokenized
texts, cross_kv on the real image (caption) or question (VQA) states, and decoder_step on every
step of the fp32 model's own greedy decoding (past lengths 0..n, prompted and not): the text the
fp32 model generates is the text the int8 decoder is calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from blip_runtime import BlipRuntime

# Used when no texts come with the images: generic questions (VQA) and captions (ITM / ITC / prompts).
DEFAULT_QUESTIONS = ("what is in the picture?", "what color is it?", "how many are there?", "where is this?",
                     "is there a person?", "what is on the left?")
DEFAULT_TEXTS = ("a photo of a dog on the grass", "a red car parked on a street", "two people sitting at a table",
                 "a plate of food", "a cat sleeping on a bed", "a city skyline at night")


class RecordingSession:
    """A runtime Session that records every call's feeds per graph, then runs it on `inner`.

    Arrays are kept by reference: the runtime builds new arrays for every call and never writes
    into them, and the decoder's cross K/V (the largest inputs) are shared by all of a request's
    steps, so recording a decoding loop costs little memory."""

    def __init__(self, inner):
        self.inner = inner
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.feeds.setdefault(graph, []).append(dict(feeds))
        return self.inner.run(graph, feeds)  # host arrays only: recordings must be numpy


def _texts_for(start: int, n: int, texts: Sequence[str] | None, task: str) -> list[str]:
    """The texts of images start..start+n: the given ones (cycled if fewer), else the defaults."""
    pool = list(texts) if texts else DEFAULT_QUESTIONS if task == "vqa" else DEFAULT_TEXTS
    return [pool[i % len(pool)] for i in range(start, start + n)]


def exercise(runtime: BlipRuntime, images: list, texts: Sequence[str] | None = None, batch_size: int = 2,
             tasks: Sequence[str] | None = None, **generation) -> dict:
    """Run every task of the bundle (or `tasks`) over `images`, `batch_size` at a time, greedy.

    texts: one per image (cycled if fewer): the VQA questions, the ITM/ITC texts, and (first three
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
        out["itc"] = BlipRuntime.similarity(np.concatenate(out.pop("itc_image")), np.concatenate(out.pop("itc_text")))
    return out


def calibration_feeds(bundle: str | Path | BlipRuntime, images: list, texts: Sequence[str] | None = None,
                      tasks: Sequence[str] | None = None, batch_size: int = 2,
                      **generation) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-graph feed lists recorded while the fp32 bundle runs `tasks` on `images` (see exercise):
    {"vision": [{"pixel_values": ...}, ...], "decoder_step": [one dict per decoding step], ...}.
    Every graph of the bundle that the tasks use gets feeds; generation options (max_new_tokens,
    ...) default to the bundle's and are passed through."""
    runtime = bundle if isinstance(bundle, BlipRuntime) else BlipRuntime.load(bundle)
    recorder = RecordingSession(runtime.session)
    exercise(BlipRuntime(runtime.manifest, recorder), list(images), texts, batch_size, tasks, **generation)
    return recorder.feeds


def compare_runtimes(reference: BlipRuntime, ours: BlipRuntime, images: list, texts: Sequence[str] | None = None,
                     batch_size: int = 2, **generation) -> dict:
    """End-to-end agreement of `ours` with `reference` on held-out images: for generated text the
    fraction of identical token sequences (greedy), for ITM the max abs difference of the match
    probability, for ITC the max abs difference of the cosine similarities and the fraction of images
    whose best text is the same."""
    ref = exercise(reference, list(images), texts, batch_size, **generation)
    got = exercise(ours, list(images), texts, batch_size, **generation)
    result: dict = {"images": len(images)}
    for key in ("caption", "caption_prompted", "vqa"):
        if key in ref:
            same = [a == b for a, b in zip(ref[key], got[key])]
            result[key] = {"identical": float(np.mean(same)), "count": len(same)}
    if "itm" in ref:
        result["itm"] = {"max_abs": float(np.abs(ref["itm"] - got["itm"]).max())}
    if "itc" in ref:
        result["itc"] = {
            "max_abs": float(np.abs(ref["itc"] - got["itc"]).max()),
            "same_best_text": float(np.mean(ref["itc"].argmax(1) == got["itc"].argmax(1))),
        }
    return result
