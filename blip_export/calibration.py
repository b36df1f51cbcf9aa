"""Calibration and held-out data from real images, and the end-to-end comparison of two bundles.

Feeds are recorded, not synthesized: the fp32 bundle's runtime runs its family's workload (the
family's `exercise`: every task of the bundle on the images and their texts) through a session that
records what each graph is fed, so every graph is calibrated on the inputs it sees in real use
(the decoder step on every step of the fp32 model's own greedy decoding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from blip_runtime import BlipRuntime

from .families import family

# Used when no texts come with the images: generic questions (VQA) and captions (ITM / ITC / prompts).
DEFAULT_QUESTIONS = ("what is in the picture?", "what color is it?", "how many are there?", "where is this?",
                     "is there a person?", "what is on the left?")
DEFAULT_TEXTS = ("a photo of a dog on the grass", "a red car parked on a street", "two people sitting at a table",
                 "a plate of food", "a cat sleeping on a bed", "a city skyline at night")


def texts_for(start: int, n: int, texts: Sequence | None, kind: str) -> list[str]:
    """The texts of images start..start+n for a workload `kind` ("vqa": questions; anything else:
    captions): the given ones (cycled if fewer), else the defaults. An item of `texts` is one text
    for every task, or {"caption": ..., "question": ...} (the shipped calibration set's form), so VQA
    is calibrated on questions and ITM / ITC on captions of the same image."""
    if not texts:
        pool = list(DEFAULT_QUESTIONS if kind == "vqa" else DEFAULT_TEXTS)
    else:
        key = "question" if kind == "vqa" else "caption"
        pool = [t[key] if isinstance(t, dict) else t for t in texts]
    return [pool[i % len(pool)] for i in range(start, start + n)]


# Recorded bytes per graph before its recording is thinned (RecordingSession). A decoder step whose
# past grows every step (OPT, BLIP-2's LM) feeds new past arrays each call: at opt-1.3b's dimensions
# a 2-row step feed is ~90 MB, and every step of a few held-out requests took the recording of a
# real-size BLIP-2 past 2 GB on top of its 14 GB fp32 runtime.
FEED_BUDGET = 1 << 30


class RecordingSession:
    """A runtime Session that records the feeds of every call per graph, then runs it on `inner`.

    Arrays are kept by reference: the runtime builds new arrays for every call and never writes
    into them, and the decoder's cross K/V (the largest inputs) are shared by all of a request's
    steps, so recording a decoding loop costs little memory. A graph whose recorded arrays pass
    `budget` bytes keeps every other recorded call, and from then on records every second (fourth,
    ...) call: the whole decoding stays covered, evenly, in bounded memory. Below the budget every
    call is recorded."""

    def __init__(self, inner, budget: int = FEED_BUDGET):
        self.inner, self.budget = inner, budget
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        self._calls: dict[str, int] = {}
        self._stride: dict[str, int] = {}
        self._sizes: dict[str, dict[int, int]] = {}  # graph -> {id(array): bytes} of what it keeps

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        n = self._calls[graph] = self._calls.get(graph, 0) + 1
        stride = self._stride.setdefault(graph, 1)
        if (n - 1) % stride == 0:
            kept, sizes = self.feeds.setdefault(graph, []), self._sizes.setdefault(graph, {})
            kept.append(dict(feeds))
            sizes.update((id(a), a.nbytes) for a in feeds.values())  # an array shared by calls counts once
            if sum(sizes.values()) > self.budget and len(kept) > 1:
                kept[:] = kept[::2]  # the calls 0, 2s, 4s, ... of the stride s so far
                self._sizes[graph] = {id(a): a.nbytes for f in kept for a in f.values()}
                self._stride[graph] = 2 * stride
        return self.inner.run(graph, feeds)  # host arrays only: recordings must be numpy


def calibration_feeds(bundle: str | Path | BlipRuntime, images: list, texts: Sequence[str] | None = None,
                      tasks: Sequence[str] | None = None, batch_size: int = 2,
                      **generation) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-graph feed lists recorded while the fp32 bundle runs `tasks` on `images` (see exercise):
    {"vision": [{"pixel_values": ...}, ...], "decoder_step": [one dict per decoding step], ...}.
    Every graph of the bundle that the tasks use gets feeds; generation options (max_new_tokens,
    ...) default to the bundle's and are passed through."""
    return recorded_run(bundle, images, texts, tasks, batch_size, **generation)[0]


def recorded_run(bundle: str | Path | BlipRuntime, images: list, texts: Sequence[str] | None = None,
                 tasks: Sequence[str] | None = None, batch_size: int = 2, **generation) -> tuple[dict, dict]:
    """(calibration_feeds' per-graph feeds, the workload's results as `exercise` returns them) from one
    run: the recording session passes every call through, so the results are the bundle's own."""
    runtime = bundle if isinstance(bundle, BlipRuntime) else BlipRuntime.load(bundle)
    recorder = RecordingSession(runtime.session)
    results = exercise(BlipRuntime(runtime.manifest, recorder), list(images), texts, batch_size, tasks, **generation)
    return recorder.feeds, results


def exercise(runtime: BlipRuntime, images: list, texts: Sequence[str] | None = None, batch_size: int = 2,
             tasks: Sequence[str] | None = None, **generation) -> dict:
    """The workload of the runtime's family (its ExportFamily.exercise) on `images`: results by task."""
    return family(runtime.manifest.data["family"]).exercise(runtime, images, texts, batch_size, tasks, **generation)


def compare_runtimes(reference: BlipRuntime | dict, ours: BlipRuntime, images: list, texts: Sequence[str] | None = None,
                     batch_size: int = 2, **generation) -> dict:
    """End-to-end agreement of `ours` with `reference` on held-out images: for generated text the
    fraction of identical token sequences (greedy), for ITM the max abs difference of the match
    probability, for ITC the max abs difference of the cosine similarities and the fraction of images
    whose best text is the same. `reference`: a runtime, or its `exercise` results on the same images
    (so that a multi-GB reference need not stay loaded beside `ours`)."""
    ref = reference if isinstance(reference, dict) else exercise(reference, list(images), texts, batch_size, **generation)
    got = exercise(ours, list(images), texts, batch_size, **generation)
    result: dict = {"images": len(images)}
    for key, want in ref.items():  # the workload's results, by kind
        have = got[key]
        if isinstance(want, list):  # generated token sequences
            same = [a == b for a, b in zip(want, have)]
            result[key] = {"identical": float(np.mean(same)), "count": len(same)}
        elif want.ndim == 1:  # one score per image
            result[key] = {"max_abs": float(np.abs(want - have).max())}
        else:  # similarities [images, texts]
            result[key] = {"max_abs": float(np.abs(want - have).max()),
                           "same_best_text": float(np.mean(want.argmax(1) == have.argmax(1)))}
    return result
