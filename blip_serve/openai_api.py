"""The OpenAI chat-completions mapping: a chat request -> a Call on a bundle, results -> the
response objects (and stream chunks) the `openai` client parses.

The last user message carries one image (an `image_url` part with a data URL) and optionally text
parts. What the text means depends on the bundle: a caption bundle takes it as the caption prompt
(no text: a plain caption), a VQA bundle as the question (required). Options:

| OpenAI | runtime | note |
| --- | --- | --- |
| max_tokens / max_completion_tokens | max_new_tokens | |
| temperature | do_sample, temperature | absent or 0: greedy (deterministic); > 0: sampling |
| top_p | top_p | sampling only |
| n | num_return_sequences | n > 1 without sampling: the n best beams (num_beams = n) |
| seed | seed | sampling is reproducible with a seed |
"""

from __future__ import annotations

import time
import uuid

from .inputs import Limits, RequestError, decode_image, _text

_IGNORED = {"stream_options", "user", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
            "stop", "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata"}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
          "stream"} | _IGNORED


def _number(body: dict, key: str, kind: type, low: float, high: float | None = None):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, kind) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(key, f"expected {'an int' if kind is int else 'a number'} {bound}, got {v!r}")
    return v


def parse_chat(body, models: dict[str, list[str]], limits: Limits) -> tuple[str, str, tuple, tuple | None, tuple, int, bool]:
    """body -> (model, task, images, texts or None, options, n, stream). `models`: name -> tasks."""
    if not isinstance(body, dict):
        raise RequestError("body", "expected a JSON object")
    extra = sorted(set(body) - _KNOWN)
    if extra:
        raise RequestError(extra[0], "unknown field for chat.completions")
    model = body.get("model")
    if model not in models:
        raise RequestError("model", f"unknown model {model!r}; expected one of {sorted(models)}", status=404)
    if "caption" in models[model]:
        task = "caption"
    elif "vqa" in models[model]:
        task = "answer"
    else:
        raise RequestError("model", f"{model} does {models[model]}; chat needs a caption or vqa bundle")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "expected a non-empty list of messages")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError("messages", "expected a message with role 'user'")
    i = users[-1]
    content = messages[i].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(f"messages[{i}].content", "expected a string or a list of content parts")
    images, texts = [], []
    for j, part in enumerate(parts):
        field = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part.get("text"), f"{field}.text", limits))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, f"{field}.image_url.url", limits))
        else:
            raise RequestError(f"{field}.type", f"expected 'text' or 'image_url', got {kind!r}")
    if len(images) != 1:
        raise RequestError(f"messages[{i}].content", f"expected exactly one image_url part, got {len(images)}")
    text = " ".join(t.strip() for t in texts if t.strip())
    if task == "answer" and not text:
        raise RequestError(f"messages[{i}].content", f"{model} answers questions: expected a text part")

    options: dict = {}
    max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0)
    n = _number(body, "n", int, 1, 16) or 1
    seed = _number(body, "seed", int, 0)
    if temperature:  # > 0: sample, as OpenAI models do; 0 or absent: greedy
        options.update(do_sample=True, temperature=float(temperature))
        if top_p is not None and top_p > 0:
            options["top_p"] = float(top_p)
        if seed is not None:
            options["seed"] = seed
        if n > 1:
            options["num_return_sequences"] = n
    elif n > 1:
        options.update(num_beams=n, num_return_sequences=n)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"expected true or false, got {stream!r}")
    return model, task, tuple(images), ((text,) if text else None), tuple(sorted(options.items())), n, stream


def _texts(result: list, n: int) -> list[str]:
    """A Call's result (one entry per image; one image here) -> the n choice texts."""
    first = result[0]
    return list(first) if n > 1 else [first]


def completion(model: str, result: list, n: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                     "logprobs": None} for k, t in enumerate(_texts(result, n))],
    }


def chunks(model: str, result: list, n: int) -> list[dict]:
    """Stream chunks: per choice a role delta, its content, and its finish. The runtime returns
    whole sequences, so each choice's content comes as one delta."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    out = []
    for k, text in enumerate(_texts(result, n)):
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": text}, None), ({}, "stop")):
            out.append({**head, "choices": [{"index": k, "delta": delta, "finish_reason": finish, "logprobs": None}]})
    return out
