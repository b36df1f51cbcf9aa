"""BLIP-2 checkpoint loading: key forms of other transformers versions, dtypes, formats, and one clear
error per kind of bad folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2_oracle import hf_config, make_checkpoint, pixels
from blip_export import CheckpointError, load_model
from oracle import assert_close


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt")
    return folder, make_checkpoint("Blip2ForConditionalGeneration", folder, hf_config("opt", True), seed=11)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    return folder, make_checkpoint("Blip2ForConditionalGeneration", folder, hf_config("t5", True), seed=12)


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def expect_error(folder, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    print(message)
    assert "\n" not in message, "errors are one line"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@torch.no_grad()
def prefix_of(folder):
    model, _ = load_model(folder)
    return model.image_prefix(pixels())


@torch.no_grad()
def test_vision_bias_as_q_bias_v_bias(opt_folder, tmp_path):
    """Files of transformers 4.x (the public ones) hold q_bias / v_bias; transformers 5 saves the fused
    qkv.bias. Both load to the same model."""
    folder, theirs = opt_folder
    legacy = copy(folder, tmp_path)

    def split(state):
        for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
            bias = state.pop(key)
            D = bias.shape[0] // 3
            state[key.replace("qkv.bias", "q_bias")] = bias[:D].clone()
            state[key.replace("qkv.bias", "v_bias")] = bias[2 * D:].clone()

    rewrite(legacy, split)
    ref = theirs.get_image_features(pixel_values=pixels()).pooler_output
    assert_close(prefix_of(legacy), ref, 1e-5, "image prefix from q_bias/v_bias")
    assert_close(prefix_of(folder), ref, 1e-5, "image prefix from qkv.bias")


@torch.no_grad()
def test_t5_embedding_copies(t5_folder, tmp_path):
    """T5's encoder/decoder embed_tokens are copies of `shared`: a file may hold them beside it, or hold
    one of them alone."""
    folder, theirs = t5_folder
    both = copy(folder, tmp_path / "a")
    rewrite(both, lambda s: s.update({"language_model.encoder.embed_tokens.weight": s["language_model.shared.weight"].clone(),
                                      "language_model.decoder.embed_tokens.weight": s["language_model.shared.weight"].clone()}))
    only = copy(folder, tmp_path / "b")
    rewrite(only, lambda s: s.update({"language_model.encoder.embed_tokens.weight": s.pop("language_model.shared.weight")}))
    ids = torch.tensor([[5, 6, 7]])
    for f in (both, only):
        model, _ = load_model(f)
        assert_close(model.embed(ids), theirs.get_input_embeddings()(ids), 1e-6, f"T5 shared embedding ({f.name})")


def test_half_precision(opt_folder, tmp_path):
    folder, theirs = opt_folder
    half = tmp_path / "fp16"
    import copy as copying

    copying.deepcopy(theirs).half().save_pretrained(half)  # the fixture's model stays fp32
    model, _ = load_model(half)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "default: fp32"
    model, _ = load_model(half, dtype="auto")
    for name, p in model.named_parameters():
        want = torch.float32 if name.startswith(("qformer.", "query_tokens")) else torch.float16
        assert p.dtype == want, f"{name}: {p.dtype}"
    with pytest.raises(ValueError, match="dtype"):
        load_model(half, dtype=torch.int8)


@torch.no_grad()
def test_sharded_and_bin(opt_folder, tmp_path):
    folder, theirs = opt_folder
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="30KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    ref = theirs.get_image_features(pixel_values=pixels()).pooler_output
    assert_close(prefix_of(sharded), ref, 1e-5, "image prefix, sharded")
    binary = copy(folder, tmp_path / "bin")
    torch.save(load_file(str(binary / "model.safetensors")), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    assert_close(prefix_of(binary), ref, 1e-5, "image prefix, pytorch_model.bin")


def test_missing_key_and_shape_mismatch(opt_folder, tmp_path):
    folder, _ = opt_folder
    missing = copy(folder, tmp_path / "m")
    rewrite(missing, lambda s: s.pop("qformer.encoder.layer.1.output_query.dense.weight"))
    expect_error(missing, "missing", "qformer.encoder.layer.1.output_query.dense.weight", "(32, 40)")
    shape = copy(folder, tmp_path / "s")
    config = json.loads((shape / "config.json").read_text())
    config["qformer_config"]["intermediate_size"] = 44
    (shape / "config.json").write_text(json.dumps(config))
    expect_error(shape, "model.safetensors", "intermediate_query.dense.weight", "(40, 32)", "(44, 32)")


def test_unexpected_key(opt_folder, tmp_path):
    folder, _ = opt_folder
    extra = copy(folder, tmp_path)
    rewrite(extra, lambda s: s.update({"qformer.encoder.layer.0.intermediate.dense.weight": torch.zeros(40, 32)}))
    expect_error(extra, "model.safetensors", "qformer.encoder.layer.0.intermediate.dense.weight", "does not have")


def test_unsupported_language_model(opt_folder, tmp_path):
    folder, _ = opt_folder
    llama = copy(folder, tmp_path)
    config = json.loads((llama / "config.json").read_text())
    config["text_config"] = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4}
    (llama / "config.json").write_text(json.dumps(config))
    expect_error(llama, "config.json", "text_config", "'llama'", "supported: opt, t5")


def test_tensorflow_weights_file_is_named(opt_folder, tmp_path):
    folder, _ = opt_folder
    tf = copy(folder, tmp_path)
    (tf / "model.safetensors").unlink()
    (tf / "tf_model.h5").write_bytes(b"not an hdf5 file")
    expect_error(tf, "tf_model.h5")


def test_tied_head_is_one_tensor(opt_folder, tmp_path):
    """OPT's lm_head absent from the file (transformers writes the tied embed_tokens only): one
    parameter, as transformers ties it. A file that holds a different head keeps its own."""
    folder, theirs = opt_folder
    model, _ = load_model(folder)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    own = copy(folder, tmp_path)
    rewrite(own, lambda s: s.update({"language_model.lm_head.weight": torch.randn(s["language_model.model.decoder.embed_tokens.weight"].shape)}))
    model, _ = load_model(own)
    lm = model.language_model
    assert lm.lm_head.weight is not lm.model.decoder.embed_tokens.weight
    assert not torch.equal(lm.lm_head.weight, lm.model.decoder.embed_tokens.weight)


@torch.no_grad()
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_model_runs_near_fp32(opt_folder, tmp_path, dtype, rel):
    """A half-precision checkpoint loaded in its own dtype: every tensor bit for bit as in the file (the
    Q-Former's widened exactly), and logits near the fp32 model's (the Q-Former ran in fp32)."""
    import copy as copying

    folder, theirs = opt_folder
    half = tmp_path / str(dtype)
    copying.deepcopy(theirs).to(dtype).save_pretrained(half)
    model, _ = load_model(half, dtype="auto")
    state = load_file(str(half / "model.safetensors"))
    for name, p in model.state_dict().items():
        if name in state:
            assert torch.equal(p, state[name].to(p.dtype)), name
    reference, config = load_model(half)  # the same weights in fp32
    image = [config.image_token_index] * config.num_query_tokens
    ids = torch.tensor([image + [2, 5, 6], image + [2, 7, 8]])
    assert_close(model(pixels(), ids).float(), reference(pixels(), ids), rel, f"{dtype} logits vs fp32")
