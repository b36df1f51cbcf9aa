"""Errors that a user can act on: each names the file (and key) at fault and what was expected."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded. `str(e)` is one line: '<file>: <reason>'."""

    def __init__(self, where: str | Path, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")
