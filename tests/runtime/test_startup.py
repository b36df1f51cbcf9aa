"""Bundle verification at load: the stamp skips re-hashing unchanged files, never a changed one.

verify_files("stamp") records (digest, size, mtime_ns, ctime_ns, inode, device) per file after
hashing it; a later check hashes again any file whose record differs. These tests count the files
actually hashed, so a stamp that never skips or never re-hashes fails.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from blip_export.bundle import export_bundle
from blip_runtime import BlipRuntime
from blip_runtime import manifest as manifest_module
from blip_runtime.manifest import BundleError, load_manifest, stamp_path
from oracle import make_full_checkpoint


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("startup")
    make_full_checkpoint("BlipForConditionalGeneration", folder / "ckpt", seed=4, std=0.3)
    export_bundle(folder / "ckpt", folder / "bundle")
    return folder / "bundle"


@pytest.fixture
def fresh(bundle, tmp_path, monkeypatch):
    """A private copy of the bundle, a private stamp folder, and a list of the files hashed."""
    monkeypatch.setenv("BLIP_TRT_STAMPS", str(tmp_path / "stamps"))
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    hashed = []
    real = manifest_module.sha256
    monkeypatch.setattr(manifest_module, "sha256", lambda path: hashed.append(path.name) or real(path))
    return copy, hashed


def digested(folder) -> list[str]:
    data = load_manifest(folder).data
    return sorted(e["file"] for e in (*data["graphs"].values(), data["tokenizer"]) if e.get("sha256"))


def test_stamp_skips_unchanged_files(fresh):
    folder, hashed = fresh
    load_manifest(folder).verify_files()
    assert sorted(hashed) == digested(folder), "the first check hashes every file"
    assert stamp_path(folder).is_file() and not any(p.name.startswith(".") for p in folder.iterdir())
    hashed.clear()
    load_manifest(folder).verify_files()
    assert hashed == [], "an unchanged bundle is not hashed again"
    load_manifest(folder).verify_files("full")
    assert sorted(hashed) == digested(folder), "verify 'full' hashes every file whatever the stamp"


def test_changed_content_of_same_size_is_detected(fresh):
    folder, hashed = fresh
    load_manifest(folder).verify_files()
    target = folder / "decoder_step.onnx"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    target.write_bytes(bytes(data))
    assert target.stat().st_size == st.st_size
    hashed.clear()
    with pytest.raises(BundleError, match="decoder_step.onnx: SHA-256"):
        load_manifest(folder).verify_files()
    assert hashed == ["decoder_step.onnx"], "only the changed file is hashed again"


def test_restored_mtime_is_still_detected(fresh):
    """A write with the old mtime put back (touch -d, rsync -t) still moves ctime."""
    folder, hashed = fresh
    load_manifest(folder).verify_files()
    target = folder / "vision.onnx"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-100] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BundleError, match="vision.onnx: SHA-256"):
        load_manifest(folder).verify_files()


def test_copy_elsewhere_verifies_again(fresh, tmp_path):
    folder, hashed = fresh
    load_manifest(folder).verify_files()
    copy = tmp_path / "moved"
    shutil.copytree(folder, copy, copy_function=shutil.copy2)  # same mtimes, other inodes
    hashed.clear()
    load_manifest(copy).verify_files()
    assert sorted(hashed) == digested(copy)
    # A stamp file carried from the old place vouches for nothing here: other inodes.
    shutil.copy2(stamp_path(folder), stamp_path(copy))
    hashed.clear()
    load_manifest(copy).verify_files()
    assert sorted(hashed) == digested(copy)


def test_load_verifies_with_the_stamp_and_refuses_a_changed_file(fresh):
    folder, hashed = fresh
    BlipRuntime.load(folder)
    hashed.clear()
    rt = BlipRuntime.load(folder)
    assert hashed == [] and rt.caption_tokens([_image()], max_new_tokens=3)
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    with pytest.raises(BundleError, match="tokenizer.json: SHA-256"):
        BlipRuntime.load(folder)


def test_full_catches_a_change_the_stamp_cannot_see(fresh):
    """Content changed under a stamp that still matches it (a disk that flips a bit moves no
    metadata; simulated by a changed byte, the old mtime put back and the stamp rewritten to the file's
    new ctime): load(verify="stamp") trusts the stamp, load(verify="full") hashes and refuses."""
    folder, hashed = fresh
    BlipRuntime.load(folder, verify="full")
    target = folder / "cross_kv.onnx"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    stamp = json.loads(stamp_path(folder).read_text())
    now = target.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    stamp[target.name] = [stamp[target.name][0], now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino, now.st_dev]
    stamp_path(folder).write_text(json.dumps(stamp))
    hashed.clear()
    manifest_module.load_manifest(folder).verify_files("stamp")
    assert hashed == [], "the stamp matches: stamp mode hashes nothing"
    with pytest.raises(BundleError, match="cross_kv.onnx: SHA-256"):
        BlipRuntime.load(folder, verify="full")
    assert "cross_kv.onnx" in hashed, "full mode hashed the file"


@pytest.mark.parametrize("verify", ["quick", 1, None])
def test_load_bad_verify_is_one_clear_line(fresh, verify):
    with pytest.raises(ValueError, match=r"verify: expected 'full', 'stamp' or False, got "):
        BlipRuntime.load(fresh[0], verify=verify)


def test_unwritable_stamp_folder_still_verifies(fresh, monkeypatch, tmp_path):
    folder, hashed = fresh
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("BLIP_TRT_STAMPS", str(blocker / "stamps"))
    load_manifest(folder).verify_files()
    hashed.clear()
    load_manifest(folder).verify_files()
    assert sorted(hashed) == digested(folder), "no stamp could be kept: every load hashes"


def test_bad_mode_is_one_clear_line(fresh):
    with pytest.raises(ValueError, match="verify: expected 'full', 'stamp' or False, got 'quick'"):
        load_manifest(fresh[0]).verify_files("quick")


def _image():
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
