"""BLIP-2's T5 / Flan-T5 reference module against transformers' T5ForConditionalGeneration (tiny configs and
one layer each at Flan-T5-xl's widths), fp32, re-randomized weights: encoder states of a padded batch,
decoder logits with and without past K/V, the Flan-T5 / T5 v1.0 variants (gated-gelu or relu, untied or
tied head), greedy generation, the traced decoder step under ONNX Runtime; and text_config_from_dict on
the published BLIP-2 configs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from blip2_lm_oracle import FLAN_T5_XL, TINY_T5, distinct_argmax, t5_pair
from blip_export.families.blip2.lm_config import OptConfig, T5Config, text_config_from_dict
from oracle import assert_close

REL = 1e-5
VARIANTS = {
    "flan-t5 (gated-gelu, untied)": TINY_T5,
    "blip2 flan-t5 config (dense_act_fn gelu)": dict(TINY_T5, dense_act_fn="gelu", is_gated_act=True),
    "t5 v1.0 (relu, tied, rescaled)": dict(TINY_T5, feed_forward_proj="relu", tie_word_embeddings=True),
}


def encoder_inputs(batch=3, seq=16, dim=32, lengths=(16, 11, 6), seed=0):
    """Soft encoder inputs (B, S, D) (BLIP-2 feeds projected queries + prompt embeddings) and a right-padded
    mask; S exceeds the tiny relative_attention_max_distance so the farthest bucket is exercised."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, dim, generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return embeds, mask


def decoder_ids(batch=3, steps=16, vocab=91, seed=1):
    ids = torch.randint(2, vocab, (batch, steps), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = TINY_T5["decoder_start_token_id"]
    return ids


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return variant_pair(request.param)


def variant_pair(name):
    return t5_pair(VARIANTS[name], seed=list(VARIANTS).index(name))


@torch.no_grad()
def test_encoder_states_padded_batch(variant):
    theirs, ours = variant
    embeds, mask = encoder_inputs()
    ref = theirs.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    states = ours.encode(embeds, mask)
    assert_close(states, ref, REL, "encoder states, padded batch")
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = ours.encode(embeds[i : i + 1, :n], mask[i : i + 1, :n])
        assert_close(states[i, :n], alone[0], REL, f"row {i} (length {n}) vs alone")
    ids = torch.randint(2, 91, (2, 5))
    assert_close(ours.embed(ids), theirs.shared(ids), REL, "embed")


@torch.no_grad()
def test_decoder_logits_with_and_without_past(variant):
    """Full decoder pass over 16 tokens (beyond the tiny max_distance), then prefill of 3 and steps of 1 with
    past, vs transformers (with its cache) and vs the full pass; present and cross K/V equal its caches."""
    theirs, ours = variant
    embeds, mask = encoder_inputs()
    dec = decoder_ids()
    enc = ours.encode(embeds, mask)
    cross = ours.cross_kv(enc)
    assert len(cross) == ours.num_layers == 3 and cross[0][0].shape == (3, 4, 16, 8)
    ref = theirs(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    assert distinct_argmax(ref) >= 6, "re-randomized model predicts nearly one token everywhere"
    full, _ = ours.decode(dec, mask, cross)
    assert full.dtype == torch.float32
    assert_close(full, ref, REL, "decoder logits, full pass")

    out = theirs(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, :3], use_cache=True)
    logits, past = ours.decode(dec[:, :3], mask, cross)
    assert_close(logits, out.logits, REL, "decoder prefill of 3")
    cache = out.cache
    for t in range(3, 16):
        out = theirs(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, t : t + 1],
                     cache=cache, use_cache=True)
        cache = out.cache
        logits, past = ours.decode(dec[:, t : t + 1], mask, cross, past)
        assert_close(logits, out.logits, REL, f"step {t} vs transformers' cache")
        assert_close(logits, full[:, t : t + 1], REL, f"step {t} vs full pass")
    for i in range(ours.num_layers):
        assert past[i][0].shape == (3, 4, 16, 8)
        assert_close(past[i][0], cache.self_attention_cache.layers[i].keys, REL, f"layer {i} present key")
        assert_close(past[i][1], cache.self_attention_cache.layers[i].values, REL, f"layer {i} present value")
        assert_close(cross[i][0], cache.cross_attention_cache.layers[i].keys, REL, f"layer {i} cross key")


def test_head_rescale_follows_tie_word_embeddings():
    assert text_config_from_dict(TINY_T5, "t").scale_decoder_outputs is False
    assert text_config_from_dict(dict(TINY_T5, tie_word_embeddings=True), "t").scale_decoder_outputs is True
    assert text_config_from_dict({"model_type": "t5"}, "t").scale_decoder_outputs is True  # transformers' default


@pytest.mark.parametrize("tie", [False, True])
def test_head_rescale_from_a_config_written_by_transformers_5(tie):
    """transformers 5 writes scale_decoder_outputs and always tie_word_embeddings true: the former wins."""
    import transformers

    given = {k: v for k, v in TINY_T5.items() if k not in ("model_type", "tie_word_embeddings")}
    written = transformers.T5Config(**given, tie_word_embeddings=tie).to_dict()
    assert written["tie_word_embeddings"] is True and written["scale_decoder_outputs"] is tie
    assert text_config_from_dict(written, "t").scale_decoder_outputs is tie
    _, ours = t5_pair(VARIANTS["t5 v1.0 (relu, tied, rescaled)"])
    assert torch.equal(ours.lm_head.weight, ours.shared.weight)  # filled from shared: the file has no lm_head


def greedy(ours, embeds, mask, max_new: int) -> torch.Tensor:
    """Greedy decoding over our module as transformers' generate does it: encode once, cross K/V once,
    decoder steps from decoder_start_token_id; finished rows get pad. -> (B, 1 + <= max_new) with the start."""
    cfg = ours.config
    cross = ours.cross_kv(ours.encode(embeds, mask))
    tok = torch.full((embeds.shape[0],), cfg.decoder_start_token_id)
    out, past = [tok], None
    done = torch.zeros_like(tok, dtype=torch.bool)
    for _ in range(max_new):
        logits, past = ours.decode(tok[:, None], mask, cross, past)
        tok = torch.where(done, cfg.pad_token_id, logits[:, -1].argmax(-1))
        out.append(tok)
        done |= tok == cfg.eos_token_id
        if done.all():
            break
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["flan-t5 (gated-gelu, untied)", "t5 v1.0 (relu, tied, rescaled)"])
@torch.no_grad()
def test_greedy_generation_token_for_token(name):
    # transformers' generate sizes its cache by num_layers, so it needs as many decoder layers as encoder ones
    theirs, ours = t5_pair(dict(VARIANTS[name], num_decoder_layers=2), seed=5, std=0.4)  # wide: varied tokens
    embeds, mask = encoder_inputs(lengths=(16, 9, 4), seed=3)
    ref = theirs.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, do_sample=False)
    mine = greedy(ours, embeds, mask, 10)
    print(f"{name}: transformers {ref.tolist()}, ours {mine.tolist()}")
    assert len(set(ref[:, 1:].flatten().tolist())) >= 6, "generation repeats a few tokens: a weak test"
    assert mine.tolist() == ref.tolist()


class T5Step(torch.nn.Module):
    """Test wrapper of decode with flat K/V: cross_key_i, cross_value_i, past_key_i, past_value_i."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_attention_mask, *flat):
        n = self.model.num_layers
        cross = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        past = [(flat[2 * n + 2 * i], flat[2 * n + 2 * i + 1]) for i in range(n)]
        logits, present = self.model.decode(decoder_input_ids, encoder_attention_mask, cross, past)
        return (logits, *[t for kv in present for t in kv])


class T5Encode(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask):
        return tuple(t for kv in self.model.cross_kv(self.model.encode(inputs_embeds, attention_mask)) for t in kv)


def _export(module, args, names, outputs, axes, path):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args), str(path), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False, do_constant_folding=True)


def test_onnx_decoder_step_and_encoder_match_onnxruntime(tmp_path):
    import onnxruntime as ort

    _, ours = variant_pair("flan-t5 (gated-gelu, untied)")
    n = ours.num_layers
    kv = lambda prefix: [f"{prefix}_{kind}_{i}" for i in range(n) for kind in ("key", "value")]  # noqa: E731
    cross, past, present = kv("cross"), kv("past"), kv("present")
    axes = {"decoder_input_ids": {0: "batch", 1: "new"}, "encoder_attention_mask": {0: "batch", 1: "enc"},
            "logits": {0: "batch", 1: "new"}, **{c: {0: "batch", 2: "enc"} for c in cross},
            **{p: {0: "batch", 2: "past"} for p in past}, **{p: {0: "batch", 2: "total"} for p in present}}

    def feeds(batch, new, enc, past_len, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, enc, dtype=torch.long)
        mask[-1, enc // 2 :] = 0
        f = {"decoder_input_ids": torch.randint(0, 91, (batch, new), generator=g), "encoder_attention_mask": mask}
        f.update({c: torch.randn(batch, 4, enc, 8, generator=g) for c in cross})
        f.update({p: torch.randn(batch, 4, past_len, 8, generator=g) for p in past})
        return f

    step = T5Step(ours).eval()
    trace = feeds(2, 3, 7, 5, 0)
    _export(step, trace.values(), list(trace), ["logits", *present], axes, tmp_path / "t5_step.onnx")
    session = ort.InferenceSession(str(tmp_path / "t5_step.onnx"), providers=["CPUExecutionProvider"])
    # past 0 (the first step), 3, and 30 (beyond the tiny max_distance: the saturated bucket)
    for batch, new, enc, past_len in [(1, 1, 4, 0), (3, 1, 9, 3), (2, 2, 5, 30)]:
        f = feeds(batch, new, enc, past_len, seed=past_len + 1)
        got = session.run(None, {k: v.numpy() for k, v in f.items()})
        with torch.no_grad():
            want = step(*f.values())
        for name, g, w in zip(["logits", *present], got, want):
            assert_close(g, w, REL, f"onnx decoder step {name} (batch {batch}, new {new}, past {past_len})")

    encode = T5Encode(ours).eval()
    embeds, mask = encoder_inputs(batch=2, seq=5, lengths=(5, 3))
    _export(encode, (embeds, mask), ["inputs_embeds", "attention_mask"], cross,
            {"inputs_embeds": {0: "batch", 1: "enc"}, "attention_mask": {0: "batch", 1: "enc"},
             **{c: {0: "batch", 2: "enc"} for c in cross}}, tmp_path / "t5_encoder.onnx")
    session = ort.InferenceSession(str(tmp_path / "t5_encoder.onnx"), providers=["CPUExecutionProvider"])
    embeds, mask = encoder_inputs()  # other batch and length (16 > max_distance)
    got = session.run(None, {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = encode(embeds, mask)
    for name, g, w in zip(cross, got, want):
        assert_close(g, w, REL, f"onnx encoder + cross K/V {name}")


def test_real_width_flan_t5_xl_one_layer_each():
    """One encoder and one decoder layer at Flan-T5-xl's widths (d_model 2048, 32 heads of 64, d_ff 5120,
    vocab 32128, gated-gelu, untied head)."""
    theirs, ours = t5_pair(FLAN_T5_XL, std=0.02)
    g = torch.Generator().manual_seed(9)
    embeds = torch.randn(2, 40, 2048, generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    dec = torch.randint(2, 32128, (2, 4), generator=g)
    dec[:, 0] = 0
    with torch.no_grad():
        ref = theirs(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec)
        enc = ours.encode(embeds, mask)
        assert_close(enc, ref.encoder_last_hidden_state, REL, "Flan-T5-xl width: encoder states")
        cross = ours.cross_kv(enc)
        logits, past = ours.decode(dec[:, :3], mask, cross)
        step, _ = ours.decode(dec[:, 3:], mask, cross, past)
    assert distinct_argmax(ref.logits) >= 4
    assert_close(logits, ref.logits[:, :3], REL, "Flan-T5-xl width: decoder logits")
    assert_close(step, ref.logits[:, 3:], REL, "Flan-T5-xl width: step logits with past")


# --- text_config_from_dict on the text_config of the published BLIP-2 checkpoints ---------------------

# config.json of Salesforce/blip2-opt-2.7b as written by transformers 4.47: only the keys that differ from
# OPTConfig's defaults.
BLIP2_OPT_2_7B = {"_name_or_path": "facebook/opt-2.7b", "activation_dropout": 0.0, "architectures": ["OPTForCausalLM"],
                  "eos_token_id": 50118, "ffn_dim": 10240, "hidden_size": 2560, "model_type": "opt",
                  "num_attention_heads": 32, "num_hidden_layers": 32, "prefix": "</s>", "torch_dtype": "float16",
                  "vocab_size": 50304, "word_embed_proj_dim": 2560}
# Salesforce/blip2-opt-6.7b in the older form that writes every key (nulls included).
BLIP2_OPT_6_7B = {"_name_or_path": "facebook/opt-6.7b", "_remove_final_layer_norm": False, "activation_dropout": 0.0,
                  "activation_function": "relu", "add_cross_attention": False, "architectures": ["OPTForCausalLM"],
                  "attention_dropout": 0.0, "bad_words_ids": None, "bos_token_id": 2, "do_layer_norm_before": True,
                  "dropout": 0.1, "enable_bias": True, "eos_token_id": 50118, "ffn_dim": 16384,
                  "forced_eos_token_id": None, "hidden_size": 4096, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
                  "init_std": 0.02, "is_encoder_decoder": False, "layer_norm_elementwise_affine": True,
                  "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 32,
                  "num_hidden_layers": 32, "pad_token_id": 1, "prefix": "</s>", "tie_word_embeddings": True,
                  "torch_dtype": "float16", "use_cache": True, "vocab_size": 50304, "word_embed_proj_dim": 4096}
# Salesforce/blip2-flan-t5-xl: google/flan-t5-xl's config with BLIP-2's dense_act_fn "gelu" and bos 1.
BLIP2_FLAN_T5_XL = {"architectures": ["T5ForConditionalGeneration"], "bos_token_id": 1, "classifier_dropout": 0.0,
                    "d_ff": 5120, "d_kv": 64, "d_model": 2048, "decoder_start_token_id": 0, "dense_act_fn": "gelu",
                    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
                    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
                    "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": 24,
                    "num_heads": 32, "num_layers": 24, "output_past": True, "pad_token_id": 0,
                    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                    "task_specific_params": {"summarization": {"num_beams": 4, "prefix": "summarize: "}},
                    "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": 32128}
BLIP2_FLAN_T5_XXL = dict(BLIP2_FLAN_T5_XL, d_model=4096, d_ff=10240, num_heads=64)
PUBLISHED = {"blip2-opt-2.7b": BLIP2_OPT_2_7B, "blip2-opt-6.7b": BLIP2_OPT_6_7B,
             "blip2-flan-t5-xl": BLIP2_FLAN_T5_XL, "blip2-flan-t5-xxl": BLIP2_FLAN_T5_XXL}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_text_configs(name):
    import transformers

    d = PUBLISHED[name]
    cfg = text_config_from_dict(d, f"{name}/config.json: text_config")
    kind, hidden, heads, head_dim, vocab, eos = {  # as published on each model card
        "blip2-opt-2.7b": (OptConfig, 2560, 32, 80, 50304, 50118),
        "blip2-opt-6.7b": (OptConfig, 4096, 32, 128, 50304, 50118),
        "blip2-flan-t5-xl": (T5Config, 2048, 32, 64, 32128, 1),
        "blip2-flan-t5-xxl": (T5Config, 4096, 64, 64, 32128, 1),
    }[name]
    assert isinstance(cfg, kind) and cfg.hidden_size == hidden and cfg.vocab_size == vocab and cfg.eos_token_id == eos
    if kind is OptConfig:
        assert (cfg.num_attention_heads, cfg.head_dim, cfg.is_encoder_decoder) == (heads, head_dim, False)
        assert cfg.has_final_layer_norm and not cfg.has_projections and cfg.tie_word_embeddings
        theirs = transformers.OPTConfig(**d)
    else:
        assert (cfg.num_heads, cfg.d_kv, cfg.is_encoder_decoder, cfg.num_decoder_layers) == (heads, head_dim, True, 24)
        assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.scale_decoder_outputs) == ("gelu", True, False)
        theirs = transformers.T5Config(**d)
        assert cfg.scale_decoder_outputs == theirs.scale_decoder_outputs
    # every field as transformers reads the same dict (defaults for what it omits)
    for f in dataclasses.fields(cfg):
        if kind is T5Config and f.name in ("tie_word_embeddings", "scale_decoder_outputs_flag"):
            continue  # transformers forces True and keeps the file's value as scale_decoder_outputs (above)
        assert getattr(cfg, f.name) == getattr(theirs, f.name), f.name
    again = text_config_from_dict({"model_type": d["model_type"], **dataclasses.asdict(cfg)}, name)
    assert again == cfg


def test_t5_defaults_derive_activation_as_transformers():
    import transformers

    for proj in ("relu", "gated-gelu", "gated-relu", "gelu"):
        ours = text_config_from_dict({"model_type": "t5", "feed_forward_proj": proj}, "t")
        theirs = transformers.T5Config(feed_forward_proj=proj)
        assert (ours.dense_act_fn, ours.is_gated_act) == (theirs.dense_act_fn, theirs.is_gated_act), proj
    assert text_config_from_dict({"model_type": "t5"}, "t").num_decoder_layers == 6


@pytest.mark.parametrize("d, message", [
    ({"model_type": "llama", "hidden_size": 4096},
     "c/config.json: text_config: text_config model_type 'llama': unsupported language model; supported: opt, t5"),
    ({"model_type": "mistral"}, "text_config model_type 'mistral': unsupported language model"),
    ({}, "text_config model_type None: unsupported language model"),
    ({"model_type": "opt", "hidden_size": "2560"}, "hidden_size='2560': expected int, got str"),
    ({"model_type": "opt", "enable_bias": 1}, "enable_bias=1: expected bool, got int"),
    ({"model_type": "opt", "hidden_size": 100, "num_attention_heads": 3}, "not a multiple of num_attention_heads=3"),
    ({"model_type": "t5", "d_model": 20.5}, "d_model=20.5: expected int, got float"),
    ({"model_type": "t5", "feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj='gated-gelu-x'"),
    ({"model_type": "t5", "feed_forward_proj": "gated-silu"}, "dense_act_fn='silu': unsupported activation"),
])
def test_bad_text_config_is_one_line(d, message):
    with pytest.raises(ValueError) as e:
        text_config_from_dict(d, "c/config.json: text_config")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
