"""BLIP-2 bundles through `blip-export FOLDER --target onnx`: tiny re-randomized checkpoints saved with
save_pretrained (model and Blip2Processor) for every architecture with graphs (OPT and Flan-T5 with both
image-token conventions, the retrieval model with its BERT tokenizer, Blip2Model); every graph verified
against the reference module (printed), the manifest's contents, the bundle opened by BlipRuntime, the
calibration workload feeding every graph, and the refusals (one line each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blip2_oracle import bert_processor, hf_config, make_checkpoint
from blip_export.bundle import FP32_TOLERANCE
from blip_export.calibration import calibration_feeds
from blip_export.cli import main as export_main
from blip_export.config import read_config
from blip_export.families import family
from blip_export.families.blip2.export import dims_from_config
from blip_runtime import BlipRuntime
from blip_runtime.families.blip2.graphs import axes, graphs
from blip_runtime.families.blip2.text_settings import Blip2TextSettings
from blip_runtime.graphs import Limits, axes_to_dict
from blip_runtime.manifest import load_manifest
from oracle import assert_close

OPT_EOS = 5  # a configured eos that is not the tokenizer's </s> (blip2-opt's is 50118, "\n")
GENERATION = {"max_new_tokens": 7, "num_beams": 2, "length_penalty": 0.5}


def _checkpoint(kind: str, folder):
    """Save a tiny checkpoint of `kind` to `folder`; returns the transformers model."""
    if kind in ("opt", "opt-legacy"):
        config = hf_config("opt", kind == "opt", text_overrides={"tie_word_embeddings": False, "eos_token_id": OPT_EOS})
        model = make_checkpoint("Blip2ForConditionalGeneration", folder, config, seed=7, std=0.1)
        gen = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**gen, **GENERATION}))
        return model
    if kind in ("t5", "t5-legacy"):
        return make_checkpoint("Blip2ForConditionalGeneration", folder, hf_config("t5", kind == "t5"), seed=8,
                               std=0.1, untie_head=True)
    if kind == "model":
        return make_checkpoint("Blip2Model", folder, hf_config("opt", True), seed=2)
    proc = bert_processor(4)
    config = hf_config("opt", False, text_input=True)
    config.image_token_index = proc.tokenizer.convert_tokens_to_ids("<image>")
    model = make_checkpoint("Blip2ForImageTextRetrieval", folder, config, seed=3, with_processor=False)
    proc.save_pretrained(folder)
    return model


KINDS = ["opt", "opt-legacy", "t5", "t5-legacy", "model", "itm"]
ARCH = {"model": "Blip2Model", "itm": "Blip2ForImageTextRetrieval"}
TASKS = {"model": ["generate", "features"], "itm": ["itm", "itc"]}


@pytest.fixture(scope="module", params=KINDS)
def bundle(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    theirs = _checkpoint(request.param, root / "ckpt")
    code = export_main([str(root / "ckpt"), "--target", "onnx", "-o", str(root / "bundle")])
    assert code == 0, f"blip-export failed on {request.param}"
    return request.param, root / "ckpt", root / "bundle", theirs


def _images(n: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 255, (40 + 3 * i, 44, 3), dtype=np.uint8) for i in range(n)]


def test_manifest_contents(bundle, capsys):
    kind, ckpt, out, _ = bundle
    data = json.loads((out / "manifest.json").read_text())
    config = read_config(ckpt)
    dims = dims_from_config(config)
    assert (data["family"], data["architecture"]) == ("blip-2", ARCH.get(kind, "Blip2ForConditionalGeneration"))
    assert data["tasks"] == TASKS.get(kind, ["generate"]) and data["precision"] == "fp32"
    assert data["dims"] == dims.to_dict()
    assert data["axes"] == json.loads(json.dumps(axes_to_dict(axes(dims, Limits()))))
    table = graphs(dims, data["tasks"])
    assert list(data["graphs"]) == list(table)
    for name, entry in data["graphs"].items():
        assert entry["io"] == json.loads(json.dumps(table[name].to_dict())), name
        err = entry["verification"]
        print(f"{kind} {name}: max abs {err['max_abs']:.2e}, relative {err['rel']:.2e}")
        assert err["rel"] < FP32_TOLERANCE, f"{kind} {name}: relative error {err['rel']:.2e}"
    tok = data["tokenizer"]
    assert tok["file"] == "tokenizer.json" and (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    settings = Blip2TextSettings.from_dict({k: v for k, v in tok.items()
                                            if k not in ("file", "sha256", "kind", "model_max_length")})
    assert settings.num_query_tokens == config.num_query_tokens
    assert settings.image_token_index == config.image_token_index
    assert (data["image"]["size"], data["image"]["source"]) == ({"height": 42, "width": 42}, "processor_config.json")
    special = data["special_tokens"]
    if kind == "itm":
        assert tok["kind"] == "qformer" and tok["model_max_length"] == 64
        assert special == {"pad_token_id": 0, "image_token_id": config.image_token_index}
        return
    assert tok["kind"] == "lm" and special["image_token_id"] == dims.image_token_id
    if kind.startswith("opt"):
        assert special == {"bos_token_id": 2, "eos_token_id": OPT_EOS, "pad_token_id": 1,
                           "image_token_id": dims.image_token_id}
        assert data["generation"] == GENERATION  # what generation_config.json sets, and no invented length
    elif kind.startswith("t5"):
        assert special == {"eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0,
                           "image_token_id": dims.image_token_id}
        assert data["generation"] == {"num_beams": 1}
    if kind.endswith("legacy"):
        assert settings.image_token_index is None and dims.image_token_id == dims.vocab_size


def test_bundle_loads_and_calibration_feeds_every_graph(bundle):
    """BlipRuntime opens the bundle (checksums verified) and the family's workload feeds every graph."""
    kind, _, out, _ = bundle
    manifest = load_manifest(out)
    manifest.verify_files()
    runtime = BlipRuntime.load(out)
    images = _images(3)
    feeds = calibration_feeds(runtime, images, max_new_tokens=4)
    assert set(feeds) == set(manifest.data["graphs"]), f"{kind}: graphs never fed: {set(manifest.data['graphs']) - set(feeds)}"
    results = family("blip-2").exercise(runtime, images, max_new_tokens=4)
    if "generate" in runtime.tasks:
        for key in ("caption", "caption_prompted", "vqa"):
            assert len(results[key]) == 3 and all(isinstance(t, int) for seq in results[key] for t in seq), key
        assert any(len(seq) > 0 for seq in results["vqa"])
    if "features" in runtime.tasks:
        assert results["features"].shape == (3 * 4 * 32,) and np.abs(results["features"]).max() > 0
        assert results["text_states"].ndim == 1 and results["text_states"].size > 0
    if "itm" in runtime.tasks:
        assert results["itm"].shape == (3,) and ((results["itm"] > 0) & (results["itm"] < 1)).all()
        assert results["itc"].shape == (3, 3)


@torch.no_grad()
def test_retrieval_bundle_reads_texts_as_transformers(bundle):
    """The retrieval bundle's tokenizer is the Q-Former's: ITM and ITC scores through the runtime equal
    transformers' on the processor's inputs."""
    kind, ckpt, out, theirs = bundle
    if kind != "itm":
        pytest.skip("retrieval bundle only")
    import transformers

    proc = transformers.Blip2Processor.from_pretrained(ckpt)
    images, texts = _images(2, seed=4), ["a red circle on the left", "two small blue squares"]
    inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
    runtime = BlipRuntime.load(out)
    logits = theirs(**inputs, use_image_text_matching_head=True).logits_per_image
    assert_close(runtime.match(images, texts), torch.softmax(logits, -1)[:, 1].numpy(), 1e-5, "ITM vs transformers")
    itc = theirs(**inputs).logits_per_image
    got = runtime.similarity(runtime.image_features(images), runtime.text_features(texts))
    assert_close(got, itc.numpy(), 1e-5, "ITC similarity vs transformers")
    assert float(itc.std()) > 1e-3, "scores must vary for the comparison to mean anything"


@pytest.fixture(scope="module")
def opt_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals") / "ckpt"
    _checkpoint("opt", folder)
    return folder


def test_unsupported_cases_give_one_line(opt_checkpoint, tmp_path, capsys):
    def refused(argv, *needles):
        capsys.readouterr()  # save_pretrained's progress bars
        assert export_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        for needle in needles:
            assert needle in err, err

    refused([str(opt_checkpoint), "--tasks", "itm", "-o", str(tmp_path / "a"), "-q"],
            "--tasks itm", "Blip2ForConditionalGeneration checkpoint supports generate")
    for precision in ("int8-cpu", "int4"):  # ONNX Runtime's CPU forms: no TensorRT engine for them
        refused([str(opt_checkpoint), "--precision", precision, "--target", "trt", "-o", str(tmp_path / "b"), "-q"],
                f"--precision {precision}", "TensorRT")
    for arch, what in (("Blip2TextModelWithProjection", "text features only"),
                       ("Blip2VisionModelWithProjection", "image features only")):
        folder = tmp_path / arch
        make_checkpoint(arch, folder, hf_config("opt", True, text_input=True), with_processor=False)
        refused([str(folder), "-o", str(tmp_path / "c"), "-q"], arch, what, "Blip2ForImageTextRetrieval")
    # a retrieval checkpoint saved with an LM tokenizer: the Q-Former cannot read its ids
    folder = tmp_path / "itm-bpe"
    make_checkpoint("Blip2ForImageTextRetrieval", folder, hf_config("opt", True, text_input=True))
    refused([str(folder), "-o", str(tmp_path / "d"), "-q"], "tokenizer.json", "BERT (WordPiece)")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["Blip2TextModelWithProjection", "Blip2VisionModelWithProjection", "itm-bpe"], \
        f"refused exports must leave nothing behind: {left}"
