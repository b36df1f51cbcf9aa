"""The bundle manifest: reading and validating `manifest.json`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .graphs import Dims, GraphSpec

FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict
    graphs: dict[str, GraphSpec]
    dims: Dims

    @property
    def tasks(self) -> list[str]:
        return list(self.data["tasks"])

    @property
    def special_tokens(self) -> dict:
        return self.data["special_tokens"]

    def graph_path(self, name: str) -> Path:
        return self.folder / self.data["graphs"][name]["file"]

    def verify_files(self) -> None:
        """Check every graph (or engine) and the tokenizer against the SHA-256 the exporter recorded,
        so a file changed or truncated after export fails here with its name, not deep inside ONNX
        Runtime or TensorRT. Entries without a recorded digest are skipped."""
        entries = [*self.data["graphs"].values(), self.data["tokenizer"]]
        for entry in entries:
            want = entry.get("sha256")
            if not want:
                continue
            file = self.folder / entry["file"]
            got = sha256(file)
            if got != want:
                raise BundleError(
                    f"{file}: SHA-256 {got[:12]}... differs from the manifest's {want[:12]}...; the file changed "
                    "after export: re-export the bundle (or load with verify=False to run it anyway)"
                )


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks: what manifests record and verify_files checks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path}: missing; expected a bundle folder written by `blip-export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {version!r}, this runtime reads {FORMAT_VERSION}; re-export with this version's blip-export"
        )
    for key in ("family", "tasks", "graphs", "dims", "tokenizer", "image", "special_tokens", "generation"):
        if key not in data:
            raise BundleError(f"{path}: no {key!r} entry")
    if data["family"] != "blip":
        raise BundleError(f"{path}: family {data['family']!r}; this runtime runs 'blip' bundles")
    graphs = {}
    for name, entry in data["graphs"].items():
        file = folder / entry["file"]
        if not file.is_file():
            raise BundleError(f"{file}: graph {name!r} listed in the manifest but missing")
        graphs[name] = GraphSpec.from_dict(entry["io"])
    if not (folder / data["tokenizer"]["file"]).is_file():
        raise BundleError(f"{folder / data['tokenizer']['file']}: tokenizer listed in the manifest but missing")
    return Manifest(folder=folder, data=data, graphs=graphs, dims=Dims(**data["dims"]))
