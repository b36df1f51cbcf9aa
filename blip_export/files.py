"""File helpers shared by every stage that writes a bundle. No torch here: engines are built on the
target device (a Jetson, say) from an ONNX bundle, where torch may not be installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blip_runtime.manifest import sha256  # one digest for writing and for verifying bundles

__all__ = ["replace_dir", "sha256"]


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished bundle folder into place; an older bundle at `dest` is removed only after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
