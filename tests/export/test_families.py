"""Families plug in through two registries (blip_export.families, blip_runtime.families): the core
names no graph and no family, a bundle opens as its family's runtime class, an unknown family or
model_type is one error naming the known ones, and BLIP-2 loads but does not export yet."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from oracle import make_full_checkpoint

from blip_export import CheckpointError, read_config
from blip_export.bundle import export_bundle
from blip_export.families import FAMILIES as EXPORT_FAMILIES
from blip_export.families import family, known_tasks
from blip_runtime import BlipRuntime, BundleError
from blip_runtime.families import FAMILIES as RUNTIME_FAMILIES
from blip_runtime.families.blip.runtime import BlipFamilyRuntime
from blip_runtime.manifest import load_manifest
from blip_runtime.session import OrtSession

ROOT = Path(__file__).resolve().parents[2]
# The family-neutral core. blip_runtime/cli.py (blip-run's task commands) and blip_export/demo.py (a
# demo of the embedded BLIP models) are applications of BLIP's task API, not core.
CORE = [*(ROOT / "blip_runtime").glob("*.py"), *(ROOT / "blip_export").glob("*.py"), ROOT / "blip_export/modeling/common.py"]
CORE = [p for p in CORE if p.name not in ("cli.py", "demo.py", "tf_weights.py")]
GRAPH_NAMES = {"vision", "text_encoder", "itm", "text_features", "cross_kv", "decoder_step"}


def _strings(path: Path) -> set[str]:
    """String constants of a module's code (docstrings left out: prose may name BLIP's graphs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


@pytest.mark.parametrize("path", CORE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_names_no_graph_and_no_family(path):
    found = _strings(path) & (GRAPH_NAMES | set(EXPORT_FAMILIES) | set(RUNTIME_FAMILIES))
    assert not found, f"{path.relative_to(ROOT)} names {sorted(found)}: that belongs in a family's folder"


def test_registries():
    assert set(RUNTIME_FAMILIES) <= set(EXPORT_FAMILIES)  # every bundle a runtime opens, some exporter writes
    assert family("blip").name == "blip" and family("blip-2").name == "blip-2"
    assert known_tasks() == ("caption", "vqa", "itm", "itc", "generate", "features")  # registry order
    with pytest.raises(KeyError, match="family 'blip9' is not one this exporter knows .*'blip', 'blip-2'"):
        family("blip9")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    make_full_checkpoint("BlipForConditionalGeneration", root / "ckpt")
    export_bundle(root / "ckpt", root / "bundle")
    return root


def test_bundle_opens_as_its_family(bundle):
    rt = BlipRuntime.load(bundle / "bundle")
    assert type(rt) is BlipFamilyRuntime and isinstance(rt, BlipRuntime)
    manifest = load_manifest(bundle / "bundle")
    assert type(BlipRuntime(manifest, OrtSession(manifest))) is BlipFamilyRuntime
    assert len(rt.caption_tokens([bundle_image()], max_new_tokens=3)[0]) >= 2


def bundle_image():
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)


def test_unknown_family_is_one_error(bundle, tmp_path):
    shutil.copytree(bundle / "bundle", tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "family": "instructblip"}))
    with pytest.raises(BundleError) as e:
        BlipRuntime.load(tmp_path / "b")
    assert "family 'instructblip' is not one this runtime knows (it knows 'blip', 'blip-2')" in str(e.value)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_type_is_one_error(bundle, tmp_path):
    shutil.copytree(bundle / "ckpt", tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "llava"}))
    with pytest.raises(CheckpointError, match=r"model_type='llava' .*expected model_type 'blip' \(BlipForConditionalGeneration, .*\) or 'blip-2' \(Blip2"):
        read_config(tmp_path / "c")


def test_blip2_goes_through_the_same_core(tmp_path):
    """A BLIP-2 folder is read, exported and opened through the registries alone."""
    from blip2_oracle import hf_config, make_checkpoint

    make_checkpoint("Blip2ForConditionalGeneration", tmp_path / "ckpt", hf_config("opt"))
    assert read_config(tmp_path / "ckpt").family == "blip-2"
    export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    rt = BlipRuntime.load(tmp_path / "bundle")
    assert rt.manifest.data["family"] == "blip-2" and type(rt).__module__.startswith("blip_runtime.families.blip2")


def test_manifest_without_roles_high_axes_reads(bundle, tmp_path):
    """A manifest of an older exporter (no axes, no roles, no high) loads and runs; wrong types of
    these keys are one BundleError naming the key."""
    shutil.copytree(bundle / "bundle", tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    data = json.loads(path.read_text())
    old = json.loads(json.dumps(data))
    del old["axes"]
    for entry in old["graphs"].values():
        entry["io"].pop("roles")
        for t in (*entry["io"]["inputs"], *entry["io"]["outputs"]):
            t.pop("high")
    path.write_text(json.dumps(old))
    rt = BlipRuntime.load(tmp_path / "b", verify=False)
    assert all(spec.roles == () for spec in rt.manifest.graphs.values())
    assert len(rt.caption_tokens([bundle_image()], max_new_tokens=2)[0]) >= 2
    for key, bad, where in (("axes", {"batch": "1"}, "'axes.batch'"), ("roles", [3], "io.roles[0]")):
        edited = json.loads(json.dumps(data))
        if key == "axes":
            edited["axes"] = bad
        else:
            edited["graphs"]["vision"]["io"]["roles"] = bad
        path.write_text(json.dumps(edited))
        with pytest.raises(BundleError, match=where.replace("[", r"\[").replace("]", r"\]")):
            BlipRuntime.load(tmp_path / "b", verify=False)
