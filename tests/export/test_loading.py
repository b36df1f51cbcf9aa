"""Checkpoint loading: formats, config parsing, and one clear error per kind of bad folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blip_export import CheckpointError, load_model, read_config
from oracle import assert_close, make_checkpoint

ARCH = "BlipForConditionalGeneration"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = make_checkpoint(ARCH, folder, seed=3)
    return folder, model


def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good[0], dst)
    return dst


def expect_error(folder, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    print(message)
    assert "\n" not in message, "errors are one line"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@torch.no_grad()
def check_same_output(folder, theirs):
    ours, _ = load_model(folder)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[97, 5, 6, 7]])
    assert_close(ours(pixels, ids), theirs(pixel_values=pixels, input_ids=ids).logits, 1e-5, "logits")


def test_sharded_safetensors(good, tmp_path):
    folder = tmp_path / "sharded"
    good[1].save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    check_same_output(folder, good[1])


def test_pytorch_bin(good, tmp_path):
    folder = copy(good, tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    check_same_output(folder, good[1])


def test_bin_that_runs_code_is_refused(good, tmp_path):
    folder = copy(good, tmp_path)
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    expect_error(folder, "pytorch_model.bin", "weights_only=True")


def test_all_architectures_named_in_config_load(tmp_path):
    for arch in ("BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel"):
        make_checkpoint(arch, tmp_path / arch)
        model, config = load_model(tmp_path / arch)
        assert type(model).__name__ == arch and config.architecture == arch


def test_blip2_folder_is_routed_and_blip_weights_are_named(good, tmp_path):
    """model_type blip-2 loads BLIP-2's model; BLIP weights under a blip-2 config.json (and the reverse)
    get one error naming the first unexpected and missing keys."""
    from blip2_oracle import hf_config as blip2_config, make_checkpoint as make_blip2

    blip2 = tmp_path / "blip2"
    make_blip2("Blip2ForConditionalGeneration", blip2, blip2_config("opt", True), with_processor=False)
    model, config = load_model(blip2)
    assert type(model).__name__ == "Blip2ForConditionalGeneration" and config.family == "blip-2"

    folder = copy(good, tmp_path)
    shutil.copy(blip2 / "config.json", folder / "config.json")
    expect_error(folder, "config.json", "model_type 'blip-2'", "BLIP (BLIP-1) checkpoint", "unexpected keys text_decoder.",
                 "missing query_tokens")
    reverse = tmp_path / "reverse"
    shutil.copytree(blip2, reverse)
    shutil.copy(good[0] / "config.json", reverse / "config.json")
    expect_error(reverse, "config.json", "model_type 'blip'", "BLIP-2 checkpoint", "unexpected keys language_model.", "missing text_decoder.")


def test_other_architecture_bert(tmp_path):
    import transformers

    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=37, vocab_size=50)).save_pretrained(tmp_path)
    expect_error(tmp_path, "config.json", "'bert'", "BlipForConditionalGeneration")


def test_missing_key(good, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy(good, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(state, str(folder / "model.safetensors"))
    expect_error(folder, "missing", "vision_model.encoder.layers.1.mlp.fc2.weight", "(32, 48)")


def test_unexpected_key(good, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy(good, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["text_decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    expect_error(folder, "model.safetensors", "text_decoder.extra_head.weight", "does not have")


def test_shape_mismatch(good, tmp_path):
    folder = copy(good, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64  # the file has 40
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, "model.safetensors", "intermediate.dense.weight", "(40, 32)", "(64, 32)")


def test_corrupt_safetensors(good, tmp_path):
    folder = copy(good, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(folder, "model.safetensors", "cannot read safetensors")


def test_corrupt_config_and_missing_files(good, tmp_path):
    folder = copy(good, tmp_path)
    (folder / "config.json").write_text("{not json")
    expect_error(folder, "config.json", "not valid JSON")
    (folder / "config.json").unlink()
    expect_error(folder, "config.json", "missing")
    expect_error(tmp_path / "nowhere", "not a folder")
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(good[0] / "config.json", empty)
    expect_error(empty, "no weights found")


def test_shard_listed_but_missing(good, tmp_path):
    folder = tmp_path / "sharded"
    good[1].save_pretrained(folder, max_shard_size="20KB")
    next(folder.glob("model-*.safetensors")).unlink()
    expect_error(folder, "model.safetensors.index.json", "missing")


def test_config_fields_of_public_checkpoints(tmp_path):
    """The nested configs as transformers writes them, both layer_norm_eps, the projection sizes,
    and what BlipConfig.from_text_vision_configs produces."""
    import transformers

    # What BlipConfig.from_text_vision_configs (transformers 4.x) does: the two sub-configs as dicts.
    cfg = transformers.BlipConfig(
        text_config=transformers.BlipTextConfig(hidden_size=48, num_attention_heads=6).to_dict(),
        vision_config=transformers.BlipVisionConfig(hidden_size=64, num_attention_heads=4, image_size=224).to_dict(),
        projection_dim=256, image_text_hidden_size=128,
    )
    cfg.architectures = ["BlipForImageTextRetrieval"]
    cfg.save_pretrained(tmp_path)
    ours = read_config(tmp_path)
    assert ours.architecture == "BlipForImageTextRetrieval"
    assert (ours.vision.layer_norm_eps, ours.text.layer_norm_eps) == (1e-5, 1e-12)
    assert ours.text.encoder_hidden_size == 64, "cross-attention width follows the vision width"
    assert (ours.projection_dim, ours.image_text_hidden_size) == (256, 128)
    assert ours.vision.num_positions == (224 // 16) ** 2 + 1
    assert (ours.text.bos_token_id, ours.text.sep_token_id, ours.text.vocab_size) == (30522, 102, 30524)

    # A config.json of the 4.x era, as on the hub for Salesforce/blip-image-captioning-large.
    legacy = {
        "architectures": ["BlipForConditionalGeneration"], "model_type": "blip", "projection_dim": 512,
        "image_text_hidden_size": 256, "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
        "text_config": {"model_type": "blip_text_model", "hidden_size": 768, "num_attention_heads": 12,
                        "encoder_hidden_size": 1024, "layer_norm_eps": 1e-12, "vocab_size": 30524,
                        "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0, "is_decoder": True,
                        "use_cache": True, "hidden_dropout_prob": 0.0},
        "vision_config": {"model_type": "blip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 384,
                          "patch_size": 16, "layer_norm_eps": 1e-5, "dropout": 0.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    ours = read_config(tmp_path)
    assert ours.vision.hidden_size == 1024 and ours.text.encoder_hidden_size == 1024
    assert ours.vision.num_hidden_layers == 24 and ours.text.num_attention_heads == 12
    legacy["text_config"]["hidden_size"] = "768"
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(CheckpointError, match="text_config: hidden_size='768': expected int"):
        read_config(tmp_path)


def test_half_precision_checkpoint_loads_as_fp32(good, tmp_path):
    folder = tmp_path / "fp16"
    good[1].half().save_pretrained(folder)
    good[1].float()
    model, _ = load_model(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
