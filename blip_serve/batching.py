"""Running a batch of client requests on one BlipRuntime: the one place that calls the runtime.

Ray Serve's `@serve.batch` hands a replica the requests that arrived together; `run_calls` groups
those with the same task, the same generation options and the same kind of text (a caption with or
without a prompt), runs each group as one runtime call and splits the results back per request.
The runtime's batching rule (every row gets what it would get alone) makes this exact: a request's
answer never depends on what it was batched with. A group the runtime refuses is rerun request by
request, so one bad request fails alone with its own message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .inputs import Call


@dataclass(frozen=True)
class Failed:
    """A request the runtime refused (a ValueError: bad option value, text too long, ...)."""

    message: str

    @property
    def field(self) -> str:
        """The request field the runtime's message names: `GenerationOptions.num_beams=...` is
        options.num_beams, `prompt[0]: ...` is prompt[0]; "body" when it names none."""
        m = re.match(r"GenerationOptions\.(\w+)=", self.message)
        if m:
            return f"options.{m.group(1)}"
        m = re.match(r"([A-Za-z_]\w*(?:\[\d+\])?): ", self.message)
        return m.group(1) if m else "body"


def _run(runtime, task: str, images: list, texts: list | None, options: dict) -> list:
    """One runtime call -> one JSON-ready result per image (or per text for text_features)."""
    if task == "caption":
        return runtime.caption(images, texts, **options)
    if task == "answer":
        return runtime.answer(images, texts, **options)
    if task == "match":
        return [float(p) for p in runtime.match(images, texts)]
    if task == "image_features":
        return np.asarray(runtime.image_features(images), np.float32).tolist()
    if task == "text_features":
        return np.asarray(runtime.text_features(texts), np.float32).tolist()
    raise ValueError(f"task: unknown task {task!r}")


def _group_key(call: Call) -> tuple:
    return call.task, call.options, call.texts is None


def run_calls(runtime, calls: list[Call]) -> tuple[list, list[int]]:
    """calls -> (one result list or Failed per call, the number of images/texts of each runtime call)."""
    results: list = [None] * len(calls)
    sizes: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(_group_key(call), []).append(i)
    for (task, options, no_text), members in groups.items():
        images = [im for i in members for im in calls[i].images]
        texts = None if no_text else [t for i in members for t in calls[i].texts]
        try:
            out = _run(runtime, task, images, texts, dict(options))
        except ValueError as e:
            # Rerun one by one to find which request it was; the others still get their answers.
            for i in members:
                results[i] = Failed(str(e)) if len(members) == 1 else run_one(runtime, calls[i])
                sizes.append(calls[i].size)
            continue
        sizes.append(len(out))
        start = 0
        for i in members:
            n = calls[i].size
            results[i] = out[start : start + n]
            start += n
    return results, sizes


def run_one(runtime, call: Call):
    try:
        return _run(runtime, call.task, list(call.images), None if call.texts is None else list(call.texts),
                    dict(call.options))
    except ValueError as e:
        return Failed(str(e))
