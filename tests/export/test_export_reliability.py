"""blip-export never touches what is not the bundle it writes: destinations that are not bundles are
refused with one line, killed exports leave nothing the next export does not remove, bundles get the
user's umask, the default output is under the working folder, and the messages name the input and
what was expected. The CLI runs in a subprocess on tiny checkpoints (tests/oracle.py), fp32.

Every test compares the listing (and the files' bytes) of the folders around the destination before
and after, so "nothing else was touched" is measured, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blip_export.files import OWNER_FILE, _owner, check_output, remove_stale
from oracle import make_full_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CKPT_NAME = "reliability-ckpt"  # the default bundle name is <checkpoint folder>-fp32
EXPECTED = "expected a new or empty folder, or an existing bundle to replace"


def cli(*args, cwd: Path, umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m blip_export.cli ARGS` in `cwd`, stdout/stderr captured (stderr is then no terminal)."""
    return subprocess.run([sys.executable, "-m", "blip_export.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too, `skip` and what is inside it left out):
    relative path -> sha256 of a file's bytes, "dir" or "link -> target"."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts") / CKPT_NAME
    make_full_checkpoint("BlipForConditionalGeneration", folder, seed=3, std=0.1)
    return folder


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory) -> Path:
    """A finished fp32 bundle of `ckpt`, to copy where a case needs an existing bundle."""
    from blip_export.bundle import export_bundle

    return export_bundle(ckpt, tmp_path_factory.mktemp("made") / "bundle").bundle


def user_files(work: Path) -> None:
    (work / "notes.txt").write_text("my notes, not a bundle\n")
    (work / "docs").mkdir()
    (work / "docs" / "report.md").write_text("# report\n")


# -- 1. data loss: what --output may name -----------------------------------------------------------
# (case id, setup(work, bundle) -> (cwd, --output, the destination), refused: the message's parts)


def _new(w, b):
    return w, w / "new", w / "new"


def _empty(w, b):
    (w / "empty").mkdir()
    return w, w / "empty", w / "empty"


def _dot_in_empty(w, b):
    (w / "here").mkdir()
    return w / "here", ".", w / "here"


def _bundle(w, b):
    import shutil

    shutil.copytree(b, w / "old-bundle")
    (w / "old-bundle" / "leftover.onnx").write_text("from the bundle's previous export")
    return w, w / "old-bundle", w / "old-bundle"


def _user_folder(w, b):
    (w / "mine").mkdir()
    (w / "mine" / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    (w / "mine" / "todo.txt").write_text("keep me")
    return w, w / "mine", w / "mine"


def _working_folder(w, b):
    return w, w, w  # --output "$PWD"


def _dot_in_user_folder(w, b):
    return w, ".", w


def _regular_file(w, b):
    return w, w / "notes.txt", w / "notes.txt"


def _under_a_file(w, b):
    return w, w / "notes.txt" / "bundle", w / "notes.txt" / "bundle"


def _symlink(w, b):
    (w / "link").symlink_to(w / "docs", target_is_directory=True)
    return w, w / "link", w / "link"


def _root(w, b):
    return w, "/", Path("/")


OUTPUT_CASES = [
    ("new-folder", _new, None),
    ("empty-folder", _empty, None),
    ("dot-in-an-empty-folder", _dot_in_empty, None),
    ("existing-bundle", _bundle, None),
    ("folder-with-user-files", _user_folder, ["a folder with 2 other file(s)", EXPECTED, "nothing was written"]),
    ("working-folder", _working_folder, ["other file(s)", EXPECTED]),
    ("dot-in-a-user-folder", _dot_in_user_folder, ["other file(s)", EXPECTED]),
    ("regular-file", _regular_file, ["a file, not a folder", EXPECTED]),
    ("path-under-a-file", _under_a_file, ["notes.txt is a file, not a folder"]),
    ("symbolic-link", _symlink, ["a symbolic link", EXPECTED]),
    ("root-folder", _root, ["the root folder cannot hold a bundle", EXPECTED]),
]


@pytest.mark.parametrize("case,setup,refused", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_cli_output_paths(case, setup, refused, ckpt, bundle, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    user_files(work)
    cwd, output, dest = setup(work, bundle)
    before = snapshot(tmp_path, skip=dest if refused is None else None)
    r = cli(ckpt, "--output", output, cwd=cwd, umask=0o022)
    if refused:
        assert r.returncode == 1, r.stderr
        line = one_line(r.stderr)
        print(f"{case}: {line}")
        assert line.startswith(f"blip-export: --output {dest}:"), line
        for part in refused:
            assert part in line, f"{part!r} not in {line!r}"
        assert snapshot(tmp_path) == before, "a refused export must touch nothing"
        return
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path, skip=dest) == before, "only the bundle may change"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["build"]["source"] == str(ckpt.resolve())
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", *(g["file"] for g in manifest["graphs"].values())])  # the old bundle's extra file went
    assert str(dest) in r.stdout
    # 6. no terminal: plain progress lines, no tqdm `\r` repeats
    assert "\r" not in r.stderr and r.stderr.strip(), r.stderr
    assert all(l.startswith("blip-export: ") for l in r.stderr.strip().splitlines()), r.stderr


def test_api_refuses_what_the_cli_refuses(ckpt, bundle, tmp_path):
    from blip_export.files import ExportError
    from blip_export.pipeline import export
    from blip_export.precision import convert_bundle

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    (tmp_path / "file.bin").write_bytes(b"\x00\x01")
    before = snapshot(tmp_path)
    for dest in (tmp_path / "mine", tmp_path / "file.bin"):
        with pytest.raises(ExportError, match=f"--output {dest}: "):
            export(ckpt, dest)
        with pytest.raises(ExportError, match=f"--output {dest}: "):
            convert_bundle(bundle, dest, "fp16")
    assert snapshot(tmp_path) == before
    with pytest.raises(ExportError, match="a bundle is already there"):
        check_output(bundle, overwrite=False)


def test_no_model_form_checks_every_bundle_first(tmp_path):
    """`blip-export --output DIR` (every shipped model): one bundle folder that is not a bundle stops
    the job before any export, so no other bundle is written either."""
    from blip_export.defaults import default_models

    names = list(default_models())
    assert len(names) >= 2, names
    parent = tmp_path / "engines"
    parent.mkdir()
    (parent / f"{names[-1]}-fp32").mkdir()
    (parent / f"{names[-1]}-fp32" / "mine.txt").write_text("not a bundle")
    before = snapshot(tmp_path)
    r = cli("--output", parent, "-q", cwd=tmp_path)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"--output {parent / (names[-1] + '-fp32')}: a folder with 1 other file(s)" in line and EXPECTED in line
    assert snapshot(tmp_path) == before


# -- 2. leftovers of killed exports -----------------------------------------------------------------


def staging_folders(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def start_and_signal(ckpt: Path, dest: Path, sig: int) -> tuple[subprocess.Popen, str]:
    """Start a CLI export and send `sig` once it is exporting (its staging folder exists)."""
    proc = subprocess.Popen([sys.executable, "-m", "blip_export.cli", str(ckpt), "-o", str(dest)], cwd=dest.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # plain progress lines (no terminal)
        seen.append(line)
        if line.startswith("blip-export: exporting"):
            assert staging_folders(dest.parent, dest.name), "the staging folder exists while exporting"
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return proc, "".join(seen) + err


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory) -> Path:
    """A VQA checkpoint (four graphs to export and verify): time enough to be killed mid-export."""
    folder = tmp_path_factory.mktemp("slow") / "vqa"
    make_full_checkpoint("BlipForQuestionAnswering", folder, seed=4, std=0.1)
    return folder


def test_sigkill_leftovers_are_removed_by_the_next_export(slow_ckpt, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    user_files(work)
    before = snapshot(tmp_path)
    dest = work / "bundle"
    proc, err = start_and_signal(slow_ckpt, dest, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the export finished before the kill:\n{err}"
    left = staging_folders(work, "bundle")
    assert left and (left[0] / OWNER_FILE).is_file(), "SIGKILL cannot clean up: its staging folder stays"
    assert not dest.exists()
    r = cli(slow_ckpt, "-o", dest, "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    assert staging_folders(work, "bundle") == [], "the dead export's staging folder is removed"
    assert snapshot(tmp_path, skip=dest) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_leave_nothing(sig, slow_ckpt, tmp_path):
    user_files(tmp_path)
    before = snapshot(tmp_path)
    dest = tmp_path / "bundle"
    proc, err = start_and_signal(slow_ckpt, dest, sig)
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{err}"
    assert f"blip-export: interrupted; {dest} was not written" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before, "an interrupted export leaves nothing"


def test_stale_staging_of_live_or_unknown_owners_stays(tmp_path):
    dest = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "dead": {"pid": dead.pid, "start_time": "1", "boot_id": _owner()["boot_id"]},
        "live": _owner(),  # this very process
        "reused-pid": {**_owner(), "start_time": "1"},  # our pid, another process's start time
        "other-boot": {**_owner(), "boot_id": "not-this-boot"},
    }
    for name, owner in folders.items():
        (tmp_path / f".bundle.{name}" / "bundle").mkdir(parents=True)
        (tmp_path / f".bundle.{name}" / OWNER_FILE).write_text(json.dumps(owner))
    (tmp_path / ".bundle.no-owner").mkdir()  # not ours to judge: never removed
    (tmp_path / ".other.dead").mkdir()
    (tmp_path / ".other.dead" / OWNER_FILE).write_text(json.dumps(folders["dead"]))  # another destination's
    removed = sorted(p.name for p in remove_stale(dest))
    assert removed == [".bundle.dead", ".bundle.other-boot", ".bundle.reused-pid"], removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.live", ".bundle.no-owner", ".other.dead"]


# -- 3. permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_bundle_gets_the_users_umask(umask, ckpt, tmp_path):
    r = cli(ckpt, "-o", tmp_path / "b", "-q", cwd=tmp_path, umask=umask)
    assert r.returncode == 0, r.stderr
    dirs, files = 0o777 & ~umask, 0o666 & ~umask
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == oct(dirs)
    for path in (tmp_path / "b").iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(files), path


# -- 7. default output folder ------------------------------------------------------------------------


def test_default_output_is_under_the_working_folder(ckpt, tmp_path):
    in_package = ROOT / "engines" / f"{CKPT_NAME}-fp32"
    assert not in_package.exists()
    r = cli(ckpt, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "engines" / f"{CKPT_NAME}-fp32" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    assert not in_package.exists(), "never into the package's own folder"


def test_demo_default_output_is_relative():
    from blip_export.demo import parser

    assert parser().parse_args([]).output == Path("engines")  # resolved against the working folder


# -- 5. machine-readable output ----------------------------------------------------------------------


def test_json_success_and_failure(ckpt, tmp_path):
    r = cli(ckpt, "-o", tmp_path / "b", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # one JSON object and nothing else on stdout
    assert data["ok"] is True and len(data["bundles"]) == 1
    b = data["bundles"][0]
    assert b["bundle"] == str(tmp_path / "b") and b["tasks"] == ["caption"] and b["precision"] == "fp32"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(b["errors"]) == set(manifest["graphs"]) and all(e["rel"] < 1e-4 for e in b["errors"].values())

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("x")
    for args, code, part in (((ckpt, "-o", tmp_path / "mine"), 1, f"--output {tmp_path / 'mine'}: a folder"),
                             ((tmp_path / "missing",), 1, str(tmp_path / "missing")),
                             ((ckpt, "--precision", "fp64"), 2, "invalid choice: 'fp64'")):
        r = cli(*args, "--json", cwd=tmp_path)
        assert r.returncode == code, r.stderr
        data = json.loads(r.stdout)
        assert data["ok"] is False and data["exit_code"] == code and part in data["error"], data


def test_version():
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "blip_export.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"blip-export {version('blip-trt')}"


# -- malicious pickles -------------------------------------------------------------------------------


class _Evil:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_never_run(ckpt, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "evil"
    shutil.copytree(ckpt, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    evil = _Evil()
    evil.marker = str(marker)
    torch.save({**state, "x": evil}, folder / "pytorch_model.bin")
    before = snapshot(tmp_path)
    r = cli(folder, "-o", tmp_path / "b", cwd=tmp_path)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "pytorch_model.bin" in line and "weights_only" in line, line
    assert not marker.exists(), "the pickle's code ran"
    assert snapshot(tmp_path) == before


def test_a_lost_interrupt_is_raised_again_at_the_next_stage():
    """A SIGTERM whose KeyboardInterrupt Python swallowed (it fired inside an import lock's weakref
    callback in one CI run, and the export ran to the end) still stops the export at its next
    progress report."""
    from blip_export import cli as cli_module

    said = []
    cli_module._SIGNALLED.clear()
    say = cli_module._honour_signals(said.append)
    say("exporting vision")
    try:
        cli_module._terminate(signal.SIGTERM, None)
    except KeyboardInterrupt:
        pass  # where Python ignores exceptions: the interrupt is lost
    try:
        with pytest.raises(KeyboardInterrupt):
            say("verifying vision")
    finally:
        cli_module._SIGNALLED.clear()
    assert said == ["exporting vision"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_last_report_comes_before_the_bundle_moves_into_place(precision, ckpt, tmp_path):
    """Each stage reports once more after its last check and before its bundle moves into place, so
    an interrupt that was lost after the last verification is raised there too (_honour_signals),
    and the destination is then never written."""
    from blip_export.pipeline import export

    dest = tmp_path / "out"
    said = []

    def progress(msg):
        said.append(msg)
        if msg == f"moving the bundle into {dest}":  # int8: after the fp32 stage moved into the staging folder
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(ckpt, dest, precision=precision, progress=progress)
    assert said[-1] == f"moving the bundle into {dest}"
    assert not dest.exists() and list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
