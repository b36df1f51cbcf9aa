"""Test helpers for BLIP-2's language models: transformers' OPTForCausalLM / T5ForConditionalGeneration
built from config dicts with re-randomized weights (the oracle), our reference module built from the
same dict, and the weights copied over by an explicit key check."""

from __future__ import annotations

import torch
import transformers
from transformers.initialization import no_init_weights

from blip_export.families.blip2.lm_config import text_config_from_dict
from blip_export.families.blip2.modeling.opt import OptForCausalLM
from blip_export.families.blip2.modeling.t5 import T5ForConditionalGeneration
from oracle import rerandomize

TINY_OPT = dict(model_type="opt", vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, eos_token_id=5,
                pad_token_id=1)
TINY_T5 = dict(model_type="t5", vocab_size=91, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
               eos_token_id=1, pad_token_id=0)
# Real widths, one layer (each stack): OPT-2.7b and Flan-T5-xl.
OPT_2_7B = dict(model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_attention_heads=32,
                max_position_embeddings=2048, num_hidden_layers=1)
FLAN_T5_XL = dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=1, num_decoder_layers=1,
                  decoder_start_token_id=0)


def load_reference(ours: torch.nn.Module, theirs: dict[str, torch.Tensor], duplicates: dict[str, str] = {},
                   ignored: tuple[str, ...] = ()) -> None:
    """Copy `theirs` (a transformers state dict) into `ours`: every key of ours filled (from its own key or
    its tied source), every key of theirs used, a named duplicate (equal to its source) or ignored; shapes
    equal. Raises AssertionError listing what is missing or unused."""
    ours_sd = ours.state_dict()
    tied = ours.tied_sources()
    missing = [k for k in ours_sd if k not in theirs and tied.get(k) not in theirs]
    unused = [k for k in theirs if k not in ours_sd and k not in duplicates and k not in ignored]
    assert not missing and not unused, f"missing from checkpoint: {missing}; checkpoint keys unused: {unused}"
    for key, source in duplicates.items():
        if key in theirs:
            assert torch.equal(theirs[key], theirs[source]), f"{key} is not a copy of {source}"
    with torch.no_grad():
        for key, param in ours_sd.items():
            value = theirs[key] if key in theirs else theirs[tied[key]]
            assert value.shape == param.shape, f"{key}: shape {tuple(value.shape)} != {tuple(param.shape)}"
            param.copy_(value)


def _spread(model: torch.nn.Module, seed: int, std: float) -> None:
    """rerandomize, then give every token embedding row the same norm (OPT; a tied head otherwise picks
    the longest rows everywhere and greedy decoding repeats one token) or a 4x wider spread (T5's shared
    table and relative position biases, which rerandomize's "embedding" rule does not name)."""
    rerandomize(model, seed=seed, std=std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(p / p.norm(dim=-1, keepdim=True))
            elif name == "shared.weight" or "relative_attention_bias" in name:
                p.mul_(4.0)


def opt_pair(d: dict = TINY_OPT, seed: int = 0, std: float = 0.4, drop_lm_head: bool = False):
    """(transformers OPTForCausalLM, our OptForCausalLM) with the same re-randomized weights.
    drop_lm_head: load ours from a state dict without lm_head.weight (a file that relies on the tie)."""
    hf_cfg = transformers.OPTConfig(**{k: v for k, v in d.items() if k != "model_type"})
    with no_init_weights():  # every parameter is overwritten below: skip the init (seconds at real widths)
        theirs = transformers.OPTForCausalLM(hf_cfg).eval()
        ours = OptForCausalLM(text_config_from_dict(d, "text_config")).eval()
    theirs.tie_weights()  # post_init ties, but not under no_init_weights
    _spread(theirs, seed, std)
    if hf_cfg.tie_word_embeddings:
        assert theirs.lm_head.weight is theirs.model.decoder.embed_tokens.weight
    sd = theirs.state_dict()
    if drop_lm_head:
        sd.pop("lm_head.weight")
    load_reference(ours, sd)
    return theirs, ours


def t5_pair(d: dict = TINY_T5, seed: int = 0, std: float = 0.2):
    """(transformers T5ForConditionalGeneration, our T5ForConditionalGeneration), same weights. With
    tie_word_embeddings false (Flan-T5) the transformers head is untied and given its own weights, as
    a Flan-T5 file does; with true it stays shared's (T5 v1.0) and the state dict omits lm_head.weight."""
    hf_cfg = transformers.T5Config(**{k: v for k, v in d.items() if k != "model_type"})
    with no_init_weights():
        theirs = transformers.T5ForConditionalGeneration(hf_cfg).eval()
        ours = T5ForConditionalGeneration(text_config_from_dict(d, "text_config")).eval()
    theirs.tie_weights()
    tied = d.get("tie_word_embeddings", True)
    if not tied:  # transformers ties T5's head on construction whatever the config says
        theirs.lm_head.weight = torch.nn.Parameter(theirs.lm_head.weight.detach().clone())
    _spread(theirs, seed, std)
    sd = theirs.state_dict()
    if tied:
        assert theirs.lm_head.weight is theirs.shared.weight
        sd.pop("lm_head.weight")
    load_reference(ours, sd, ours.DUPLICATE_KEYS, ours.IGNORED_KEYS)
    return theirs, ours


def distinct_argmax(logits: torch.Tensor) -> int:
    """Number of distinct argmax tokens over all positions of logits (..., V): a model that repeats
    one token everywhere would make parity tests vacuous."""
    return int(logits.argmax(-1).unique().numel())
