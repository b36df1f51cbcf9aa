"""Request parsing for the task routes: JSON bodies -> images, texts and generation options.

Everything a client can get wrong is checked here, before a request reaches a replica's queue, and
refused with a `RequestError` that names the field (`images[1]: not valid base64`), which the
server turns into a 400 with a JSON body. The runtime's own checks (option ranges, text length)
still apply behind these and surface as 400s too (they are ValueErrors).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Generation options a client may set; eos/pad token ids stay the bundle's.
CLIENT_OPTIONS = {
    "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping", "do_sample",
    "temperature", "top_k", "top_p", "repetition_penalty", "seed", "num_return_sequences",
}
# What each route takes as texts, and whether it generates (takes options).
TASKS = {
    "caption": ("prompt", True),  # optional caption prompt, one or one per image
    "answer": ("questions", True),
    "match": ("texts", False),
    "image_features": (None, False),
    "text_features": ("texts", False),
}
# The bundle task each route needs (BlipRuntime.tasks names).
NEEDS = {"caption": "caption", "answer": "vqa", "match": "itm", "image_features": "itc", "text_features": "itc"}
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


class RequestError(ValueError):
    """Bad client input: `field` names it, `status` is the HTTP status to answer with."""

    def __init__(self, field: str, message: str, status: int = 400, named: bool = False):
        """named: the message names the field itself (as the runtime's messages do)."""
        super().__init__(message if named else f"{field}: {message}")
        self.field = field
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_images: int = 16  # images per request
    max_pixels: int = 4_000_000  # per image, width * height, checked from the header before decoding
    max_body_bytes: int = 8_000_000  # whole request body
    max_text_chars: int = 2_000  # per text


@dataclass(frozen=True)
class Call:
    """One client request as a replica runs it: `images` are decoded PIL images, `texts` one
    per image (or None), `options` the generation options as sorted (name, value) pairs so that
    requests with equal options batch together."""

    task: str
    images: tuple
    texts: tuple | None
    options: tuple = ()

    @property
    def size(self) -> int:
        return len(self.images) if self.images else len(self.texts or ())


def decode_image(value, field: str, limits: Limits) -> Image.Image:
    """A base64 string or a data URL -> a decoded PIL image, refused above limits.max_pixels."""
    if not isinstance(value, str):
        raise RequestError(field, f"expected a base64 string or a data:image/...;base64, URL, got {type(value).__name__}")
    if value.startswith("data:"):
        m = _DATA_URL.match(value)
        if not m:
            raise RequestError(field, "expected a data URL of the form data:image/<type>;base64,<data>")
        value = value[m.end():]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
    return open_image(data, field, limits)


def open_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) -> a decoded PIL image, refused above limits.max_pixels
    (read from the header, before anything is decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > limits.max_pixels:
            raise RequestError(field, f"{w}x{h} = {w * h} pixels; expected at most {limits.max_pixels}")
        image.load()
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise RequestError(field, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, f"not a readable image ({e})") from None
    return image  # in its own mode: the runtime converts it as it converts a file


def _text(value, field: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"expected a string, got {type(value).__name__}")
    if len(value) > limits.max_text_chars:
        raise RequestError(field, f"{len(value)} characters; expected at most {limits.max_text_chars}")
    return value


def parse_texts(value, field: str, n: int | None, limits: Limits) -> tuple[str, ...]:
    """A string (for each of n images) or a list of strings (exactly n when n is given)."""
    if isinstance(value, str):
        return (_text(value, field, limits),) * (n or 1)
    if not isinstance(value, list) or not value:
        raise RequestError(field, "expected a string or a non-empty list of strings")
    if n is not None and len(value) != n:
        raise RequestError(field, f"got {len(value)} for {n} image(s); give one per image or a single string")
    return tuple(_text(t, f"{field}[{i}]", limits) for i, t in enumerate(value))


def parse_options(body: dict, field: str = "options") -> tuple:
    """The body's `options` object -> sorted (name, value) pairs; unknown names are refused here,
    types and ranges by the runtime's GenerationOptions."""
    options = body.get(field, {})
    if not isinstance(options, dict):
        raise RequestError(field, f"expected an object of generation options, got {type(options).__name__}")
    wrong = sorted(set(options) - CLIENT_OPTIONS)
    if wrong:
        raise RequestError(f"{field}.{wrong[0]}", f"unknown generation option; expected some of {sorted(CLIENT_OPTIONS)}")
    for k, v in options.items():
        if not isinstance(v, (int, float, bool, str)) and v is not None:
            raise RequestError(f"{field}.{k}", f"expected a number, bool or null, got {type(v).__name__}")
    return tuple(sorted(options.items()))


def parse_task(task: str, body, limits: Limits) -> Call:
    """A task route's JSON body -> a Call. Bodies: {"images": [...], "<texts field>": ..., "options": {...}}."""
    if task not in TASKS:
        raise RequestError("task", f"unknown task {task!r}; expected one of {sorted(TASKS)}", status=404)
    if not isinstance(body, dict):
        raise RequestError("body", "expected a JSON object")
    text_field, generates = TASKS[task]
    allowed = {"images", "options"} | ({text_field} if text_field else set())
    extra = sorted(set(body) - allowed)
    if extra:
        raise RequestError(extra[0], f"unknown field for {task}; expected some of {sorted(allowed)}")
    images: tuple = ()
    if task != "text_features":
        raw = body.get("images")
        if raw is None:
            raise RequestError("images", "missing; expected a list of base64 images or data URLs")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise RequestError("images", "expected a non-empty list of base64 images or data URLs")
        if len(raw) > limits.max_images:
            raise RequestError("images", f"{len(raw)} images; expected at most {limits.max_images}")
        images = tuple(decode_image(v, f"images[{i}]", limits) for i, v in enumerate(raw))
    texts = None
    if text_field:
        value = body.get(text_field)
        if value is None and task != "caption":
            raise RequestError(text_field, "missing; expected a string or a list of strings")
        if value is not None:
            texts = parse_texts(value, text_field, len(images) if images else None, limits)
            if len(texts) > limits.max_images:
                raise RequestError(text_field, f"{len(texts)} texts; expected at most {limits.max_images}")
    options = parse_options(body) if generates else ()
    if not generates and "options" in body:
        raise RequestError("options", f"{task} takes no generation options")
    return Call(task, images, texts, options)


def bundle_tasks(bundle: str | Path) -> list[str]:
    """The tasks a bundle's manifest.json lists (the bundle format, engines/README.md), read
    without loading its graphs; BlipRuntime.load checks the rest on each replica."""
    path = Path(bundle) / "manifest.json"
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a bundle manifest ({type(e).__name__}: {e})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{path}: 'tasks' must be a list of strings")
    return tasks
