"""The image processor's settings of a Hugging Face checkpoint folder, wherever transformers put them.

transformers 5's `ProcessorMixin.save_pretrained` (BlipProcessor, Blip2Processor) writes one
`processor_config.json` with the image processor nested under "image_processor" and no
`preprocessor_config.json`; older versions, and an image processor saved on its own, write a flat
`preprocessor_config.json`. transformers reads the nested one first and the flat one otherwise
(`ImageProcessingMixin.get_image_processor_dict`); so does this. No torch, no transformers here: the
exporters of every family call it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["image_processor_config", "read_json_object"]

NESTED = "processor_config.json"  # {"image_processor": {...}, "processor_class": ...}
FLAT = "preprocessor_config.json"  # the image processor's dict itself


def read_json_object(path: Path) -> dict:
    """A JSON object file, or ValueError naming the file (not UTF-8, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def image_processor_config(folder: Path) -> tuple[dict | None, Path | None]:
    """(the image processor's dict, the file it came from) for the checkpoint `folder`:
    `processor_config.json`'s "image_processor" when it has one, else `preprocessor_config.json`;
    (None, None) when neither holds it. ValueError naming the file on bad JSON or a wrong type."""
    folder = Path(folder)
    nested = folder / NESTED
    if nested.is_file():
        data = read_json_object(nested)
        if "image_processor" in data:
            image = data["image_processor"]
            if not isinstance(image, dict):
                raise ValueError(f'{nested}: "image_processor" must be a JSON object, got {type(image).__name__}')
            return image, nested
    flat = folder / FLAT
    if flat.is_file():
        return read_json_object(flat), flat
    return None, None
