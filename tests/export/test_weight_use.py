"""The exporter frees each reference weight after the last graph that reads it (blip_export.weight_use):
the record of who reads what, the release (meta tensors, shapes kept, tied weights once), that
computing with a freed weight fails instead of exporting something else, and a real export of a tiny
BLIP-2 OPT where the image encoder is gone before the language model's graphs are exported and every
graph still verifies against transformers' modules."""

from __future__ import annotations

import pytest
import torch

import blip_export.bundle as bundle_mod
from blip2_oracle import hf_config, make_checkpoint
from blip_export.bundle import export_bundle
from blip_export.weight_use import last_uses, release, weight_tensors


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))


def test_last_reader_frees_and_freed_weights_cannot_compute():
    m, x = Two(), torch.randn(3, 4)
    runs = {"first": lambda: m.a(x), "second": lambda: m.b(m.a(x)) * m.scale}
    last = last_uses(m, runs)
    ids = {n: id(t) for n, t in [("a.w", m.a.weight), ("b.w", m.b.weight), ("scale", m.scale)]}
    # a is read by both graphs, so its last reader is the second; the first frees nothing
    assert last["first"] == set()
    assert last["second"] == {ids["a.w"], id(m.a.bias), ids["b.w"], id(m.b.bias), ids["scale"]}
    freed = release(m, last["second"])
    assert freed == (2 * 16 + 2 * 4 + 4) * 4
    assert all(t.device.type == "meta" for t in weight_tensors(m).values())
    assert m.a.weight.shape == (4, 4) and isinstance(m.a.weight, torch.nn.Parameter) and m.scale.dtype == torch.float32
    with pytest.raises((RuntimeError, NotImplementedError)):
        m.a(x)  # a meta weight meets a CPU input: an error, never another graph


def test_tied_weight_counts_once_and_unread_weights_stay():
    m = Two()
    m.b.weight = m.a.weight  # tied
    last = last_uses(m, {"only": lambda: m.a(torch.randn(1, 4))})
    assert release(m, last["only"]) == (16 + 4) * 4
    assert m.b.weight.device.type == "meta"  # the tied entry went with it
    assert m.b.bias.device.type == "cpu" and m.scale.device.type == "cpu"  # nothing read them


def test_export_frees_vision_before_the_language_model(tmp_path, monkeypatch):
    make_checkpoint("Blip2ForConditionalGeneration", tmp_path / "ckpt", hf_config("opt"), seed=3, std=0.1)
    seen, exported = {}, []
    load = bundle_mod.load_model

    def capture(folder):
        model, config = load(folder)
        seen["model"] = model
        return model, config

    def export_graph(wrapper, spec, feeds, path, _real=bundle_mod.export_graph):
        model = seen["model"]
        exported.append((spec.name, {n: p.device.type for n, p in model.named_parameters()}))
        return _real(wrapper, spec, feeds, path)

    monkeypatch.setattr(bundle_mod, "load_model", capture)
    monkeypatch.setattr(bundle_mod, "export_graph", export_graph)
    report = export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    print({k: f"rel {v['rel']:.1e}" for k, v in report.errors.items()})
    order = [name for name, _ in exported]
    assert order[0] == "vision" and "opt_step" in order, order
    step = dict(exported)["opt_step"]
    vision = [n for n in step if n.startswith("vision_model.")]
    assert vision and all(step[n] == "meta" for n in vision), "the image encoder was still held"
    assert all(step[n] == "cpu" for n in step if n.startswith("language_model."))
    left = [n for n, p in seen["model"].named_parameters() if p.device.type != "meta"]
    assert not left, f"weights outlived every graph: {left}"  # every weight of this model is read by a graph
    assert all(err["rel"] < bundle_mod.FP32_TOLERANCE for err in report.errors.values())
