"""BLIP-2 in the benchmark: the checkpoint, transformers as the baseline, and the model's work.

The checkpoint (model "blip2" of benchmarks.cases) is Blip2ForConditionalGeneration at real size for
scale "base": ViT-g/14 at 224 px (39 layers, 1408 wide, 16 heads, MLP 6144, 257 image tokens), the
Q-Former (768 wide, 12 layers, 32 queries, cross-attention every 2nd layer) and an OPT LM at opt-1.3b's
dimensions (24 layers, 2048 wide, 32 heads, FFN 8192, vocabulary 50272); scale "tiny" is the tests'
tiny BLIP-2 OPT. Random weights (no download): the values do not change the work done.

Why the checkpoint is written tensor by tensor and not by save_pretrained of a built model: fp32 at
this size is ~9.7 GB, and a built model plus save_pretrained's serialization buffers would pass 12 GB
on a 24 GB machine shared with others. transformers builds the model on the meta device (its exact
state-dict keys, shapes and tied weights: the deduplicated named_parameters are what save_pretrained
writes), every tensor is drawn as tests/blip2_oracle.rerandomize draws it, and shards of ~1 GB go to
safetensors files with transformers' index; config, generation config and a Blip2Processor are saved
by transformers. Peak memory is then about one shard. The tokenizer is the tests' small byte-level
BPE with OPT's special ids and `<image>` (its ids fit OPT's vocabulary; prompts tokenize into fewer
pieces than with OPT's own tokenizer, which changes the prefill length by a few tokens only).

transformers runs in fp32 and in bf16 (`from_pretrained(dtype=torch.bfloat16)` of the same weights stored
in bf16; transformers 5.24 then keeps no module in fp32, the Q-Former included: each row records the
dtypes it ran). Its stages are forward hooks on vision_model, qformer and
language_model (the first LM call of a generate is the prefill, the others are the steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

MODEL = "blip2"
ARCH = "Blip2ForConditionalGeneration"
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14)
QFORMER = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, cross_attention_frequency=2)
OPT_13B = dict(model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
               num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
               bos_token_id=2, eos_token_id=2, pad_token_id=1)
NUM_QUERIES = 32
STD = 0.05  # as benchmarks.models.STD: varied tokens
SHARD_BYTES = 1 << 30  # ~1 GB (of fp32) per safetensors shard: the most the writer holds at once
BF16_CKPT = "ckpt-bf16"  # beside "ckpt": the same weights stored in bf16, for transformers-bf16
STAGES = ("preprocess", "vision", "qformer", "opt_prefill", "opt_step")
STAGE_NAMES = {"preprocess": "preprocess", "vision": "vision", "qformer": "Q-Former", "opt_prefill": "prefill",
               "opt_step": "steps"}


def hf_config(scale: str):
    from tests.blip2_oracle import hf_config as make

    if scale == "tiny":
        return make("opt")
    return make("opt", vision=VIT_G, qformer=QFORMER, num_query_tokens=NUM_QUERIES, text_overrides=OPT_13B,
                image_text_hidden_size=256)


def _draw(name: str, shape, g):
    """One tensor as tests/blip2_oracle.rerandomize draws it."""
    import torch

    if "norm" in name.lower() and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("query_tokens"):
        return torch.randn(shape, generator=g)
    scale = 5.0 if "embed" in name or "shared" in name else 1.0
    return STD * scale * torch.randn(shape, generator=g)


def write_checkpoint(scale: str, folder: Path, seed: int = 20, dtype: str = "float32") -> None:
    """The checkpoint folder (see the module docstring), written shard by shard. dtype "bfloat16": the
    same draws stored in bf16 (BF16_CKPT, what transformers-bf16 loads: from the fp32 files its load
    maps 9 GB of fp32 pages beside the 5 GB of bf16 weights, over 12 GB of RSS at real size)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from tests.blip2_oracle import processor

    config = hf_config(scale)
    with torch.device("meta"):
        model = getattr(transformers, ARCH)(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied duplicates dropped
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    groups, group, size = [], [], 0  # parameter names per shard, in order
    for name, shape in params:
        group.append((name, shape))
        size += int(np.prod(shape)) * 4
        if size >= SHARD_BYTES:
            groups.append(group)
            group, size = [], 0
    groups += [group] if group else []
    weight_map, total = {}, 0
    for i, group in enumerate(groups):  # one shard in memory at a time
        file = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _draw(name, shape, g).to(getattr(torch, dtype)).contiguous() for name, shape in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(groups) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.architectures = [ARCH]  # what save_pretrained records
    config.dtype = dtype
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    processor("opt", config.num_query_tokens, config.vision_config.image_size).save_pretrained(folder)


# -- transformers, the baseline -----------------------------------------------------------------------
def load_transformers(contender, scale: str, dtype: str | None) -> dict:
    """Blip2ForConditionalGeneration and its processor into `contender` (a TransformersContender), hooks on."""
    import torch
    import transformers

    from . import models
    from .contenders import THREADS

    torch.set_num_threads(THREADS)
    ckpt = models.folder(scale, MODEL) / (BF16_CKPT if dtype == "bfloat16" else "ckpt")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    contender.model = getattr(transformers, ARCH).from_pretrained(ckpt, **kwargs).eval()
    contender.processor = transformers.Blip2Processor.from_pretrained(ckpt)
    contender.num_queries = contender.model.config.num_query_tokens
    clock, m = contender.clock, contender.model
    clock.hook("vision", m.vision_model)
    clock.hook("qformer", m.qformer)
    start = []

    def before(*_):
        start.append(time.perf_counter())

    def after(*_):  # the first LM call of a generate is the prefill (the clock is reset per run)
        stage = "opt_prefill" if not clock.calls.get("opt_prefill") else "opt_step"
        clock.seconds[stage] += time.perf_counter() - start.pop()
        clock.calls[stage] += 1

    m.language_model.register_forward_pre_hook(before)
    m.language_model.register_forward_hook(after)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": THREADS,
            "dtype": str(m.language_model.dtype).removeprefix("torch."), "qformer_dtype":
            str(next(m.qformer.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": m.config._attn_implementation}


def run_transformers(contender, case, images) -> list[list[int]]:
    """Token ids per image as our runtime returns them: caption [bos] + the new tokens (generate(pixel_values)
    returns the image tokens first), VQA the new tokens only (generate returns the prompt first)."""
    import torch

    from .cases import QUESTION

    n, m = len(images), contender.model
    text = [f"Question: {QUESTION} Answer:"] * n if case.task == "vqa" else None
    with torch.inference_mode():
        enc = contender.clock.wrap("preprocess", contender.processor)(images=images, text=text, return_tensors="pt")
        enc["pixel_values"] = enc["pixel_values"].to(m.vision_model.dtype)
        if text is None:
            enc = {"pixel_values": enc["pixel_values"]}
        out = m.generate(**enc, **case.generation)
    lead = enc["input_ids"].shape[1] if text else contender.num_queries
    return [r[lead:] for r in out.tolist()]


# -- the model's work ------------------------------------------------------------------------------------
def facts(scale: str, kinds: list[str]) -> dict:
    """Vision FLOPs per image; per bundle kind, the bytes one LM step reads (opt_step's initializers)."""
    from . import models
    from .limits import graph_weight_bytes, vision_flops

    config = json.loads((models.folder(scale, MODEL) / "ckpt" / "config.json").read_text())
    vc, tc = config["vision_config"], config["text_config"]
    params = 4 * (tc["hidden_size"] * (4 * tc["hidden_size"] + 2 * tc["ffn_dim"]) * tc["num_hidden_layers"]
                  + tc["vocab_size"] * tc["hidden_size"])  # fp32 bytes of the matrices a step reads (head tied)
    out = {"vision_flops": vision_flops(vc), "lm_matrix_bytes_fp32": params,
           "vision_config": {k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size",
                                                "patch_size")},
           "text_config": {k: tc[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                                              "vocab_size")}, "step_bytes": {}}
    for kind in kinds:
        step = models.bundle(scale, MODEL, kind) / "opt_step.onnx"
        if step.is_file():
            out["step_bytes"][kind] = graph_weight_bytes(step)
    return out

