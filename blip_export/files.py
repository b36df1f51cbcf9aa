"""Where bundles are written: the destination check, the staging folder and the move into place.
No torch here: engines are built on the target device (a Jetson, say) from an ONNX bundle, where
torch may not be installed.

A destination is replaced only when it is itself a bundle (its manifest.json says so) or an empty
folder; anything else (a folder with other files, a regular file, a symbolic link) is refused
before any work starts, and checked again just before the move. A bundle is written into a staging
folder beside the destination, `.<name>.<random>/`, which holds an owner file (pid, the process's
start time, the boot id) and the bundle itself in `<name>/`: an export killed with SIGKILL leaves the
staging folder behind, and the next export to the same place removes it once its owner is gone
(never a live export's). Folders are made with os.mkdir, so they get the user's umask like any
folder the user makes (tempfile.mkdtemp would make them private).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from blip_runtime.manifest import sha256  # one digest for writing and for verifying bundles

__all__ = ["ExportError", "check_output", "data_file", "graph_data_files", "graph_record", "install", "is_bundle",
           "remove_stale", "save_graph", "save_proto", "sha256", "staging", "store_graph"]

OWNER_FILE = "owner.json"  # in the staging folder, beside the bundle being written (never in it)


class ExportError(RuntimeError):
    """An export that cannot go on; the message is one line for the CLI."""


def output_path(dest: str | os.PathLike) -> Path:
    """`dest` as an absolute path with `.` and `..` folded (`--output .` names the working folder)."""
    return Path(os.path.abspath(os.fspath(dest)))


def is_bundle(folder: Path) -> bool:
    """True when `folder/manifest.json` is an engine bundle's manifest (a JSON object with the
    format version, family and graphs every bundle's manifest has)."""
    path = Path(folder) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in ("format_version", "family", "graphs"))


def check_output(dest: str | os.PathLike, overwrite: bool = True) -> Path:
    """The absolute destination if a bundle may be written there, else ExportError naming it.

    Accepted: a path that does not exist (its parent, if it exists, a folder), an empty folder, or
    (with overwrite) a folder holding a bundle, which is replaced."""
    dest = output_path(dest)
    expected = "expected a new or empty folder, or an existing bundle to replace"
    if not dest.name:
        raise ExportError(f"--output {dest}: the root folder cannot hold a bundle; {expected}")
    if dest.is_symlink():
        raise ExportError(f"--output {dest}: a symbolic link; give the folder itself ({expected})")
    if dest.exists():
        if not dest.is_dir():
            raise ExportError(f"--output {dest}: a file, not a folder; {expected}")
        if is_bundle(dest):
            if not overwrite:
                raise ExportError(f"--output {dest}: a bundle is already there")
        elif any(True for _ in dest.iterdir()):
            count = sum(1 for _ in dest.iterdir())
            raise ExportError(f"--output {dest}: a folder with {count} other file(s) and no bundle manifest; "
                              f"{expected}; nothing was written")
    for parent in dest.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--output {dest}: {parent} is a file, not a folder")
            break
    return dest


# -- staging folders and their owners -----------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> tuple[str | None, str | None]:
    """(start time in clock ticks since boot, state) of `pid` from /proc, or (None, None)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[19], fields[0]  # stat fields 22 (starttime) and 3 (state), counted after the name


def _owner() -> dict:
    start, _ = _start_time(os.getpid())
    return {"pid": os.getpid(), "start_time": start, "boot_id": _boot_id()}


def owner_alive(owner: dict) -> bool:
    """Whether the process that wrote `owner` (see _owner) still runs. A pid reused by another
    process after a reboot or a restart is told apart by the boot id and the start time."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    start, state = _start_time(pid)
    if state == "Z":  # exited, not yet reaped by its parent
        return False
    return not (start and owner.get("start_time") and start != owner["start_time"])


def remove_stale(dest: Path) -> list[Path]:
    """Remove the staging folders of dead exports to `dest` (beside it, `.<name>.*` holding an owner
    file whose process is gone). Folders without an owner file, or with a live owner, stay."""
    dest = output_path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for path in dest.parent.glob(f".{dest.name}.*"):
        owner_file = path / OWNER_FILE
        if path.is_symlink() or not owner_file.is_file():
            continue
        try:
            owner = json.loads(owner_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not owner_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where /proc has it (Linux 4.7+)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the set-and-restore dance
    os.umask(mask)
    return mask


def mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new folder `parent/<prefix><random>`, with the permissions the umask gives any folder."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 less the umask, as any folder the user makes
            return path
        except FileExistsError:
            continue


@contextmanager
def staging(dest: str | os.PathLike, kind: str = "") -> Iterator[Path]:
    """A folder to write the bundle for `dest` into; `install(path, dest)` moves it into place.
    Stale staging folders of dead exports to `dest` are removed first. Whatever happens (an error,
    KeyboardInterrupt, SIGTERM turned into KeyboardInterrupt by the CLI), the staging folder is
    removed on the way out; only SIGKILL leaves it, for the next export to remove.
    kind: a word in the folder name (`.<name>.<kind>.<random>`) saying what it is for."""
    dest = output_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    root = mkdir_unique(dest.parent, f".{dest.name}.{kind + '.' if kind else ''}")
    try:
        (root / OWNER_FILE).write_text(json.dumps(_owner()) + "\n", encoding="utf-8")
        payload = root / dest.name
        os.mkdir(payload)
        yield payload
    finally:
        shutil.rmtree(root, ignore_errors=True)


def install(payload: Path, dest: str | os.PathLike, overwrite: bool = True) -> None:
    """Move the finished bundle `payload` (a staging() folder) to `dest`, checked again first.
    An older bundle at `dest` is moved into the staging folder and removed with it, so `dest` is
    never without a complete bundle. An empty folder at `dest` is kept (its inode, its mode: it
    may be the user's working folder) and the files are moved into it, manifest.json last."""
    dest = check_output(dest, overwrite)
    if dest.is_dir() and not is_bundle(dest):  # empty (check_output refused anything else)
        items = sorted(payload.iterdir(), key=lambda p: p.name == "manifest.json")
        for item in items:
            os.replace(item, dest / item.name)
        return
    if dest.exists():
        os.replace(dest, payload.parent / f"{dest.name}.old")
    os.replace(payload, dest)


def copy_file(src: Path, dst: Path) -> None:
    """Copy the bytes only: the copy gets the user's umask, not the source's mode."""
    shutil.copyfile(src, dst)


# -- graph files and their external data ---------------------------------------------------------

# Weights above this many bytes go to a data file beside the graph (`<graph>.onnx.data`): protobuf
# refuses messages of 2 GiB and more, and the graph's nodes and names take some room of their own
# (2e9 leaves ~147 MB of 2 GiB). Read at call time, so tests can lower it to exercise the path on
# tiny graphs.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
EXTERNAL_TENSOR_MIN = 1024  # tensors smaller than this stay inside the graph file even then


def data_file(path: Path) -> Path:
    """Where a graph's weights go when they are stored beside it: `<graph>.onnx.data`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _tensors(graph):
    """Every TensorProto of `graph`: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _tensors(sub)


def _nbytes(tensor) -> int:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
    count = 1
    for d in tensor.dims:
        count *= d
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError):  # string tensors, 4-bit types: their stored bytes
        return len(tensor.raw_data)


def weight_bytes(model) -> int:
    """Bytes of every tensor the ModelProto holds or references (inside the file or beside it)."""
    return sum(_nbytes(t) for t in _tensors(model.graph))


def external_files(model) -> list[str]:
    """Locations (relative to the graph file) of the files the graph's tensors are stored in."""
    import onnx

    seen: list[str] = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next(e.value for e in t.external_data if e.key == "location")
            if loc not in seen:
                seen.append(loc)
    return seen


def graph_data_files(path: Path) -> list[Path]:
    """The data files the graph at `path` references (none when its weights are inside it)."""
    import onnx

    path = Path(path)
    return [path.parent / loc for loc in external_files(onnx.load(str(path), load_external_data=False))]


def save_graph(model, path: Path) -> None:
    """Write the ModelProto `model` (every tensor's data in memory) to `path`: inside the file when its
    weights are at most EXTERNAL_DATA_THRESHOLD bytes, else beside it in one `<graph>.onnx.data` file
    with a relative location, so the bundle folder can move. A data file of an earlier save is removed
    first (onnx appends to an existing one)."""
    import onnx

    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=EXTERNAL_TENSOR_MIN, convert_attribute=True)


def save_proto(model, path: Path) -> None:
    """Write `model`, loaded with load_external_data=False, back to `path`: the graph file only; the
    data files it references stay as they are (a rewrite of names, shapes or metadata)."""
    import onnx

    onnx.save_model(model, str(path))


def store_graph(src: Path, dst: Path) -> None:
    """Move the graph torch.onnx.export wrote at `src` to `dst` in the bundle's form (see save_graph).

    torch writes the weights of a graph over 2 GB as one file per tensor beside it: those are
    concatenated into `<dst>.data` by streaming (the weights are never all in memory) and removed.
    A graph with its weights inside and over the threshold is loaded and saved with external data."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    sources = external_files(model)
    if not sources:
        if weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
            os.replace(src, dst)
            data_file(dst).unlink(missing_ok=True)
            return
        save_graph(onnx.load(str(src)), dst)
        src.unlink()
        return
    _gather(model, src.parent, dst)
    if src != dst:
        src.unlink()
    for loc in sources:
        if (src.parent / loc).resolve() != data_file(dst).resolve():
            (src.parent / loc).unlink(missing_ok=True)


def _gather(model, base: Path, dst: Path) -> None:
    """Copy the external tensors of `model` (locations relative to `base`) into one data file beside
    `dst`, 4 KiB aligned as onnx aligns them, point the tensors at it and write the graph to `dst`."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    data = data_file(dst)
    tmp = data.with_name(data.name + ".part")  # a source may be the old data file itself
    with open(tmp, "wb") as out:
        for t in _tensors(model.graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(t)
            with open(base / info.location, "rb") as f:
                f.seek(info.offset or 0)
                length = info.length if info.length else os.fstat(f.fileno()).st_size - (info.offset or 0)
                out.seek(-out.tell() % 4096, 1)
                offset = out.tell()
                shutil.copyfileobj(_limited(f, length), out, 1 << 24)
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    os.replace(tmp, data)
    onnx.save_model(model, str(dst))


class _limited:
    """A file object that reads at most `n` more bytes of `f` (for shutil.copyfileobj)."""

    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        block = self.f.read(size)
        self.n -= len(block)
        return block


def graph_record(path: Path) -> dict:
    """The manifest's entry for a graph file: {"file", "sha256"} and, for weights stored beside it,
    "data": [{"file", "sha256"}] (paths relative to the bundle folder)."""
    path = Path(path)
    record = {"file": path.name, "sha256": sha256(path)}
    data = graph_data_files(path)
    if data:
        record["data"] = [{"file": p.name, "sha256": sha256(p)} for p in data]
    return record
