"""File helpers shared by every stage that writes a bundle. No torch here: engines are built on the
target device (a Jetson, say) from an ONNX bundle, where torch may not be installed."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished bundle folder into place; an older bundle at `dest` is removed only after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
