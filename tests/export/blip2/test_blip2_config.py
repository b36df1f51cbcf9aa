"""BLIP-2 config.json parsing: the public checkpoints' configs (tests/export/blip2/configs, written from
their documented values), transformers' defaults, the older key names, and one clear error per bad entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_export import CheckpointError, read_config
from blip_export.families.blip2.config import Blip2QFormerConfig, Blip2VisionConfig, config_from_dict

CONFIGS = sorted((Path(__file__).parent / "configs").glob("*.json"))


def test_all_public_configs_are_here():
    names = {p.stem for p in CONFIGS}
    assert names == {"blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-opt-2.7b-coco", "blip2-opt-6.7b-coco",
                     "blip2-flan-t5-xl", "blip2-flan-t5-xl-coco", "blip2-flan-t5-xxl", "blip2-itm-vit-g",
                     "blip2-itm-vit-g-coco"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_public_config_dims_equal_transformers(path):
    import transformers

    data = json.loads(path.read_text())
    ours = config_from_dict(data, str(path))
    theirs = transformers.Blip2Config.from_dict(data)
    v, tv = ours.vision_config, theirs.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        tv.hidden_size, tv.intermediate_size, tv.num_hidden_layers, tv.num_attention_heads, tv.image_size, tv.patch_size)
    assert (v.layer_norm_eps, v.qkv_bias) == (tv.layer_norm_eps, tv.qkv_bias)
    q, tq = ours.qformer_config, theirs.qformer_config
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size, q.cross_attention_frequency,
            q.encoder_hidden_size, q.vocab_size, q.max_position_embeddings) == (
        tq.hidden_size, tq.num_hidden_layers, tq.num_attention_heads, tq.intermediate_size, tq.cross_attention_frequency,
        tq.encoder_hidden_size, tq.vocab_size, tq.max_position_embeddings)
    assert q.encoder_hidden_size == v.hidden_size == 1408
    assert (ours.num_query_tokens, ours.image_text_hidden_size, ours.image_token_index) == (
        theirs.num_query_tokens, theirs.image_text_hidden_size, theirs.image_token_index)
    assert ours.num_image_tokens == (v.image_size // 14) ** 2 + 1 == (677 if "opt" in path.stem and "coco" in path.stem else 257)
    if ours.architecture == "Blip2ForImageTextRetrieval":
        assert q.use_qformer_text_input
        return
    t, tt = ours.text_config, theirs.text_config
    assert t.hidden_size == tt.hidden_size and t.vocab_size == tt.vocab_size
    assert t.is_encoder_decoder == theirs.is_encoder_decoder == (tt.model_type == "t5")
    if tt.model_type == "opt":
        assert (t.num_hidden_layers, t.num_attention_heads, t.ffn_dim) == (tt.num_hidden_layers, tt.num_attention_heads, tt.ffn_dim)
    else:
        assert (t.num_layers, t.num_decoder_layers, t.num_heads, t.d_kv, t.d_ff) == (
            tt.num_layers, tt.num_decoder_layers, tt.num_heads, tt.d_kv, tt.d_ff)
        assert t.scale_decoder_outputs == tt.scale_decoder_outputs is False  # Flan-T5: own lm_head, no rescale
        assert (t.dense_act_fn, t.is_gated_act) == (tt.dense_act_fn, tt.is_gated_act)


def test_defaults_and_what_transformers_writes(tmp_path):
    """A config.json written by transformers' save_pretrained from sub-config objects (the 4.x
    from_vision_qformer_text_configs wrote the same three dicts) parses to the same values; omitted
    fields take transformers' defaults."""
    import transformers

    cfg = transformers.Blip2Config(
        vision_config=transformers.Blip2VisionConfig(hidden_size=64, num_attention_heads=4, image_size=364).to_dict(),
        qformer_config=transformers.Blip2QFormerConfig(hidden_size=48, num_attention_heads=6).to_dict(),
        text_config=transformers.OPTConfig(hidden_size=40, num_attention_heads=5).to_dict(),
        num_query_tokens=8,
    )
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    ours = read_config(tmp_path)
    assert ours.family == "blip-2" and ours.architecture == "Blip2ForConditionalGeneration"
    assert ours.qformer_config.encoder_hidden_size == 64, "cross-attention width follows the vision width"
    assert ours.vision_config.num_positions == (364 // 14) ** 2 + 1 == 677
    assert (ours.num_query_tokens, ours.image_token_index, ours.text_config.hidden_size) == (8, None, 40)
    defaults = config_from_dict({"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]})
    assert defaults.vision_config == Blip2VisionConfig() and defaults.vision_config.layer_norm_eps == 1e-6
    assert defaults.qformer_config == Blip2QFormerConfig()
    assert defaults.text_config.hidden_size == transformers.OPTConfig().hidden_size, "default LM: OPT"
    assert (defaults.num_query_tokens, defaults.image_text_hidden_size) == (32, 256)


def test_older_qformer_text_input_key():
    base = {"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"]}
    assert config_from_dict({**base, "qformer_config": {"qformer_text_input": True}}).qformer_config.use_qformer_text_input
    assert not config_from_dict(base).qformer_config.use_qformer_text_input


@pytest.mark.parametrize("change, fragments", [
    ({"vision_config": {"hidden_size": "1408"}}, ["vision_config", "hidden_size='1408'", "expected int"]),
    ({"qformer_config": {"cross_attention_frequency": 0}}, ["qformer_config", "cross_attention_frequency"]),
    ({"vision_config": {"image_size": 225}}, ["vision_config", "image_size=225", "patch_size=14"]),
    ({"num_query_tokens": 0}, ["num_query_tokens=0"]),
    ({"image_token_index": "50265"}, ["image_token_index='50265'", "expected int"]),
    ({"image_token_index": 60000}, ["image_token_index=60000", "vocab_size"]),
    ({"text_config": {"model_type": "llama", "hidden_size": 4096}}, ["text_config", "'llama'", "opt, t5"]),
    ({"architectures": ["InstructBlipForConditionalGeneration"]}, ["architectures", "Blip2ForConditionalGeneration"]),
])
def test_bad_values_name_file_and_key(tmp_path, change, fragments):
    data = {"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"], **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path)
    message = str(info.value)
    print(message)
    assert "\n" not in message and "config.json" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
