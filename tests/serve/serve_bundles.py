"""The bundles every serve test module runs: the embedded models, exported once per test session."""

from __future__ import annotations

from blip_export.defaults import default_models
from blip_export.pipeline import export


def shared_bundles(tmp_path_factory) -> dict:
    """{model name on the server (caption, vqa, itm): bundle folder}, exported on first use in the
    session and reused by every serve test module after."""
    root = tmp_path_factory.getbasetemp() / "serve_bundles"
    out = {}
    for name, folder in default_models("blip").items():
        dest = root / name.split("-", 1)[1]
        if not (dest / "manifest.json").is_file():
            export(folder, dest)
        out[dest.name] = dest
    return out
