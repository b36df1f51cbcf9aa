"""The bundle manifest: reading and validating `manifest.json`.

Every key the runtime reads is declared once in `SCHEMA` with the JSON type it must have, and the
whole manifest is checked against it at load: a manifest edited by hand, truncated into another
JSON value or written by a different tool fails here with one `BundleError` that names the key,
not later as an AttributeError deep in the runtime. Keys the runtime does not read are left alone,
so newer exporters may add some.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import UnknownFamily, family
from .graphs import GraphSpec
from .options import _OPTION_CHECKS

FORMAT_VERSION = 2  # 2: ITM has a graph of its own ("itm"); text_encoder is VQA's only; roles, high, axes
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")  # tensor dtypes in I/O tables


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and says what to do."""


# JSON types by name: bool is not an integer or a number here, None is JSON null.
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_GENERATION = {name: {"int": "integer", "float": "number", "bool": "boolean"}[kind]
               for name, (kind, _, _) in _OPTION_CHECKS.items()}

# (key path, allowed JSON types, required). Parents come before their children; "*" is every key of
# an object, "[]" every item of a list. The family adds its own rows (its MANIFEST_SCHEMA: its dims,
# its special tokens), checked after these.
SCHEMA: tuple[tuple[str, str, bool], ...] = (
    ("format_version", "integer", True),
    ("family", "string", True),
    ("architecture", "string", False),
    ("tasks", "list", True),
    ("tasks.[]", "string", True),
    ("precision", "string", False),
    ("target", "string", False),
    ("dims", "object", True),
    ("limits", "object", False),
    ("limits.*", "integer", True),
    ("axes", "object", False),  # children not required: an absent parent reads as absent children
    ("axes.*", "list", False),
    ("axes.*.[]", "integer", False),
    ("graphs", "object", True),
    ("graphs.*", "object", True),
    ("graphs.*.file", "string", True),
    ("graphs.*.sha256", "string", False),
    ("graphs.*.data", "list", False),  # weights stored beside a graph over 2 GB (ONNX external data)
    ("graphs.*.data.[]", "object", False),  # children not required: see "axes"
    ("graphs.*.data.[].file", "string", False),
    ("graphs.*.data.[].sha256", "string", False),
    ("graphs.*.profile", "object", False),
    ("graphs.*.io", "object", True),
    ("graphs.*.io.name", "string", True),
    ("graphs.*.io.doc", "string", False),
    ("graphs.*.io.roles", "list", False),
    ("graphs.*.io.roles.[]", "string", False),
    *(item for side in ("inputs", "outputs") for item in (
        (f"graphs.*.io.{side}", "list", True),
        (f"graphs.*.io.{side}.[]", "object", True),
        (f"graphs.*.io.{side}.[].name", "string", True),
        (f"graphs.*.io.{side}.[].dtype", "string", True),
        (f"graphs.*.io.{side}.[].shape", "list", True),
        (f"graphs.*.io.{side}.[].shape.[]", "integer|string", True),
        (f"graphs.*.io.{side}.[].high", "integer|null", False),
    )),
    ("tokenizer", "object", True),
    ("tokenizer.file", "string", True),
    ("tokenizer.sha256", "string", False),
    ("tokenizer.model_max_length", "integer|null", False),
    ("tokenizer.clean_up_tokenization_spaces", "boolean", False),
    ("image", "object", True),
    ("image.size", "object|integer|list", False),
    ("image.size.*", "integer|null", True),
    ("image.image_mean", "list|number|null", False),
    ("image.image_std", "list|number|null", False),
    ("image.rescale_factor", "number|null", False),
    ("image.resample", "integer|null", False),
    *((f"image.{k}", "boolean|null", False) for k in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")),
    ("special_tokens", "object", True),
    ("special_tokens.*", "integer", True),
    ("special_tokens.pad_token_id", "integer", True),  # what the tokenizer pads with
    ("generation", "object", True),
    *((f"generation.{k}", t, False) for k, t in _GENERATION.items() if k != "seed"),
    ("generation.seed", "integer|null", False),
    ("generation.early_stopping", "boolean|string", False),
    ("generation.max_length", "integer", False),
    ("generation.min_length", "integer", False),
    ("build", "object", False),
)
_MISSING = object()


def _found(node, parts: list[str], where: str):
    """(location, value) of every match of a key path below node; _MISSING where a key is absent."""
    if not parts:
        yield where, node
        return
    part, rest = parts[0], parts[1:]
    if part == "*":
        if isinstance(node, dict):
            for k, v in node.items():
                yield from _found(v, rest, f"{where}.{k}" if where else k)
    elif part == "[]":
        if isinstance(node, list):
            for i, v in enumerate(node):
                yield from _found(v, rest, f"{where}[{i}]")
    elif isinstance(node, dict):
        at = f"{where}.{part}" if where else part
        yield from _found(node[part], rest, at) if part in node else [(at, _MISSING)]


def check_schema(data, path: Path, schema=SCHEMA) -> None:
    """Raise BundleError for the first key of `schema` whose value is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got a JSON {_json_type(data)}")
    for key, types, required in schema:
        allowed = types.split("|")
        for where, value in _found(data, key.split("."), ""):
            if value is _MISSING:
                if required:
                    raise BundleError(f"{path}: no {where!r} entry; expected {' or '.join(allowed)}")
            elif not any(_TYPES[t](value) for t in allowed):
                raise BundleError(f"{path}: {where!r} is a JSON {_json_type(value)} ({value!r:.40}); "
                                  f"expected {' or '.join(allowed)}")


def _json_type(value) -> str:
    return next((t for t in ("boolean", "integer", "number", "string", "list", "object", "null") if _TYPES[t](value)),
                type(value).__name__)


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict
    graphs: dict[str, GraphSpec]
    dims: Any  # the family's dims object, parsed from data["dims"] by the family (dims_from_dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.data["tasks"])

    @property
    def special_tokens(self) -> dict:
        return self.data["special_tokens"]

    @property
    def family(self):
        """The module of this bundle's family (blip_runtime.families)."""
        return family(self.data["family"])

    def graph_path(self, name: str) -> Path:
        return self.folder / self.data["graphs"][name]["file"]

    def data_paths(self, name: str) -> list[Path]:
        """The files holding graph `name`'s weights beside it (ONNX external data), if any."""
        return [self.folder / d["file"] for d in self.data["graphs"][name].get("data", ())]

    def verify_files(self, mode: str = "stamp") -> None:
        """Check every graph (or engine), its data files and the tokenizer against the SHA-256 the
        exporter recorded, so a file changed or truncated after export fails here with its name, not
        deep inside ONNX Runtime or TensorRT. Entries without a recorded digest are skipped.

        mode "full" hashes every file. "stamp" (the default) skips a file whose size, mtime_ns,
        ctime_ns, inode and device equal those recorded in the folder's stamp (stamp_path) by an earlier check
        that hashed it against this same digest, and hashes the others: hashing costs 2.5-3.7 s per
        GiB on this 2-core machine (a 15 GB BLIP-2 bundle: ~45 s per load), the stat ~20 us per file.
        Any write to a file moves its ctime (which no user call can set back), and a copy of the
        bundle has other inodes, so both are hashed again."""
        if mode not in ("full", "stamp"):
            raise ValueError(f"verify: expected 'full', 'stamp' or False, got {mode!r}")
        graphs = self.data["graphs"].values()
        entries = [*graphs, *(d for g in graphs for d in g.get("data", ())), self.data["tokenizer"]]
        stamp = _read_stamp(self.folder) if mode == "stamp" else {}
        verified = {}
        for entry in entries:
            want = entry.get("sha256")
            if not want:
                continue
            file = self.folder / entry["file"]
            seen = _file_stamp(file, want)
            if stamp.get(entry["file"]) == seen:
                verified[entry["file"]] = seen
                continue
            got = sha256(file)
            if got != want:
                raise BundleError(
                    f"{file}: SHA-256 {got[:12]}... differs from the manifest's {want[:12]}...; the file changed "
                    "after export: re-export the bundle (or load with verify=False to run it anyway)"
                )
            verified[entry["file"]] = seen
        if verified != stamp:
            _write_stamp(self.folder, verified)


def stamp_path(folder: Path) -> Path:
    """Where verify_files keeps a bundle folder's stamp: outside the bundle (which stays what the
    exporter wrote, and may be read-only), under $BLIP_TRT_STAMPS or ~/.cache/blip-trt/verified, one
    file per resolved folder path."""
    root = os.environ.get("BLIP_TRT_STAMPS") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blip-trt" / "verified"
    return Path(root) / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]}.json"


def _file_stamp(file: Path, digest: str) -> list:
    st = file.stat()
    return [digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_stamp(folder: Path) -> dict:
    try:
        stamp = json.loads(stamp_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(folder: Path, stamp: dict) -> None:
    """Atomically; where it cannot be written, the bundle is hashed on every load."""
    path = stamp_path(folder)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stamp), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made either
            pass


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
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(data, dict) and version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {version!r}, this runtime reads {FORMAT_VERSION}; re-export with this version's blip-export"
        )
    check_schema(data, path)
    try:
        module = family(data["family"])
    except UnknownFamily as e:
        raise BundleError(f"{path}: {e}") from None
    check_schema(data, path, module.MANIFEST_SCHEMA)
    graphs = {}
    for name, entry in data["graphs"].items():
        file = folder / entry["file"]
        if not file.is_file():
            raise BundleError(f"{file}: graph {name!r} listed in the manifest but missing")
        for i, data_file in enumerate(entry.get("data", ())):
            if "file" not in data_file:  # the schema cannot require a key below an optional list
                raise BundleError(f"{path}: no 'graphs.{name}.data[{i}].file' entry; expected string")
            if not (folder / data_file["file"]).is_file():
                raise BundleError(f"{folder / data_file['file']}: the weights of graph {name!r} (ONNX external data) "
                                  "listed in the manifest but missing; copy the whole bundle folder, or re-export it")
        graphs[name] = GraphSpec.from_dict(entry["io"])
        for t in (*graphs[name].inputs, *graphs[name].outputs):
            if t.dtype not in DTYPES:
                raise BundleError(f"{path}: graph {name!r} tensor {t.name!r} has dtype {t.dtype!r}; expected one of "
                                  f"{', '.join(DTYPES)}")
    if not (folder / data["tokenizer"]["file"]).is_file():
        raise BundleError(f"{folder / data['tokenizer']['file']}: tokenizer listed in the manifest but missing")
    return Manifest(folder=folder, data=data, graphs=graphs, dims=module.dims_from_dict(data["dims"]))
