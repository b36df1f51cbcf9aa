"""BLIP-2's graphs from a loaded reference model: the dims of a config, the tasks of an architecture,
valid inputs at given axis sizes (to trace and to verify), the sizes themselves, and the ONNX export
of one graph (opset 17, the TorchScript exporter, as blip_export/onnx_export.py does for BLIP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blip_runtime.families.blip2.graphs import BATCH, NEW, PAST, PREFIX, PROMPT, ROWS, TEXT, TOTAL, Blip2Dims
from blip_runtime.graphs import GraphSpec

from .config import Blip2Config
from .wrappers import make_wrapper

ARCHITECTURE_TASKS = {
    "Blip2ForConditionalGeneration": ("generate",),
    "Blip2Model": ("generate", "features"),
    "Blip2ForImageTextRetrieval": ("itm", "itc"),
}


def dims_from_config(cfg: Blip2Config) -> Blip2Dims:
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    lm = dict(lm="", vocab_size=0)
    if t is not None and cfg.architecture in ("Blip2ForConditionalGeneration", "Blip2Model"):
        if cfg.is_encoder_decoder:
            lm = dict(lm="t5", lm_hidden=t.d_model, lm_layers=t.num_decoder_layers or t.num_layers,
                      lm_heads=t.num_heads, lm_head_dim=t.d_kv, vocab_size=t.vocab_size)
        else:
            lm = dict(lm="opt", lm_hidden=t.hidden_size, lm_layers=t.num_hidden_layers,
                      lm_heads=t.num_attention_heads, lm_head_dim=t.head_dim, vocab_size=t.vocab_size,
                      max_position_embeddings=t.max_position_embeddings)
        # the legacy convention: a marker id past the vocabulary (see the table's docstring)
        lm["image_token_id"] = lm["vocab_size"] if cfg.image_token_index is None else cfg.image_token_index
    return Blip2Dims(
        image_size=v.image_size, num_image_tokens=v.num_positions, vision_hidden=v.hidden_size,
        num_query_tokens=cfg.num_query_tokens, qformer_hidden=q.hidden_size, qformer_vocab_size=q.vocab_size,
        itc_dim=cfg.image_text_hidden_size if cfg.architecture == "Blip2ForImageTextRetrieval" else 0, **lm)


def architecture_tasks(cfg: Blip2Config) -> tuple[str, ...]:
    if cfg.architecture not in ARCHITECTURE_TASKS:
        raise ValueError(f"architecture {cfg.architecture!r}: no BLIP-2 graphs, expected one of "
                         f"{sorted(ARCHITECTURE_TASKS)}")
    return ARCHITECTURE_TASKS[cfg.architecture]


def trace_sizes(dims: Blip2Dims) -> dict[str, int]:
    """Axis sizes of the tracing inputs: distinct and > 1, so that no axis is baked in as a constant
    (opt_step traced with its queries placed among new tokens that follow a past)."""
    Q = dims.num_query_tokens
    return {BATCH: 2, ROWS: 2, TEXT: 3, PROMPT: Q + 3, NEW: Q + 2, PAST: 5, PREFIX: Q}


def verify_sizes(dims: Blip2Dims) -> list[dict[str, int]]:
    """Sizes each graph is checked at: batch 1 and 3, prompts of 1/5/11 text tokens after the Q image
    tokens, past 0/2/9, several new tokens once, more rows than requests once, and OPT's prompt call
    (opt_step over a left-padded prompt with its queries, past 0) at batch 1 and 3."""
    Q = dims.num_query_tokens
    return [
        {BATCH: 1, ROWS: 1, TEXT: 1, PROMPT: Q + 1, NEW: 1, PAST: 0, PREFIX: 0},
        {BATCH: 3, ROWS: 3, TEXT: 5, PROMPT: Q + 5, NEW: 1, PAST: 2, PREFIX: 0},
        {BATCH: 3, ROWS: 3, TEXT: 11, PROMPT: Q + 11, NEW: 1, PAST: 9, PREFIX: 0},
        {BATCH: 1, ROWS: 3, TEXT: 5, PROMPT: Q + 5, NEW: 5, PAST: 9, PREFIX: 0},
        {BATCH: 1, ROWS: 1, TEXT: 1, PROMPT: Q + 1, NEW: Q + 1, PAST: 0, PREFIX: Q},
        {BATCH: 3, ROWS: 3, TEXT: 5, PROMPT: Q + 5, NEW: Q + 5, PAST: 0, PREFIX: Q},
    ]


def _left_padded(rows: int, length: int, keep: int) -> np.ndarray:
    """int64 [rows, length] mask: row r starts with min(r, length - keep) zeros (left padding)."""
    mask = np.ones((rows, length), np.int64)
    for r in range(rows):
        mask[r, : min(r, length - keep)] = 0
    return mask


def random_feeds(spec: GraphSpec, dims: Blip2Dims, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs of `spec` at `sizes`: prompts of Q image tokens then text behind left padding,
    positions as transformers derives them, a permuted beam_idx, standard normal floats. opt_step with
    queries (sizes[PREFIX] > 0) gets a prompt as its new tokens (behind the past's padding when there is
    a past); without, random ids with an image token among them (embedded as text)."""
    rng = np.random.default_rng(seed)
    sizes = {**sizes, TOTAL: sizes[PAST] + sizes[NEW]}
    Q, feeds = dims.num_query_tokens, {}
    step = spec.name in ("opt_step", "opt_prefill")
    with_image = any(t.name == "image_prefix" for t in spec.inputs) and (not step or sizes[PREFIX] > 0)
    for t in spec.inputs:
        shape = tuple(a if isinstance(a, int) else sizes[a] for a in t.shape)
        if t.name == "input_ids" and with_image:  # image tokens then text, behind left padding
            ids = rng.integers(0, dims.vocab_size, shape, dtype=np.int64)
            ids[ids == dims.image_token_id] = (dims.image_token_id + 1) % dims.vocab_size
            mask = _left_padded(shape[0], shape[1], Q + 1) if not step or not sizes[PAST] else np.ones(shape, np.int64)
            for r in range(shape[0]):
                pad = int((mask[r] == 0).sum())
                ids[r, pad: pad + Q] = dims.image_token_id
            feeds[t.name], feeds["_prompt_mask"] = ids, mask
        elif t.name == "input_ids" and step:  # generated ids: an image token among them is text
            feeds[t.name] = rng.integers(0, dims.vocab_size, shape, dtype=np.int64)
            if dims.image_token_id < dims.vocab_size:
                feeds[t.name][0, -1] = dims.image_token_id
        elif t.high is not None:
            feeds[t.name] = rng.integers(0, t.high, shape, dtype=np.int64)
        elif t.name == "position_ids":  # from the mask, below
            feeds[t.name] = np.zeros(shape, np.int64)
        elif t.name == "beam_idx":
            feeds[t.name] = rng.permutation(shape[0]).astype(np.int64)
        elif t.name == "attention_mask" and step and sizes[PAST] == 0 and "_prompt_mask" in feeds:
            feeds[t.name] = feeds["_prompt_mask"]
        elif t.name == "attention_mask" and step:  # padding inside the past only
            feeds[t.name] = _left_padded(shape[0], shape[1], sizes[NEW] + (sizes[PAST] > 0))
        elif t.name == "attention_mask" and "_prompt_mask" in feeds:
            feeds[t.name] = feeds["_prompt_mask"]
        elif t.dtype == "int64" and "mask" in t.name:  # right padding, one real token kept
            feeds[t.name] = _left_padded(shape[0], shape[1], 1)[:, ::-1].copy()
        elif t.dtype == "int64":
            raise ValueError(f"{spec.name}: no rule for int input {t.name!r}")
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    feeds.pop("_prompt_mask", None)
    for name in [t.name for t in spec.inputs if t.name == "position_ids"]:
        mask = feeds["attention_mask"]
        feeds[name] = (np.cumsum(mask, axis=1) * mask - 1)[:, -feeds[name].shape[1]:]
    return feeds


def export_graph(model: torch.nn.Module, spec: GraphSpec, dims: Blip2Dims, path: Path) -> None:
    """Trace the wrapper of `spec` at trace_sizes and write `path`, named, dynamic and shaped as the
    table says (the core exporter, blip_export.onnx_export)."""
    from ...onnx_export import export_graph as export_wrapper

    export_wrapper(make_wrapper(model, spec, dims), spec, random_feeds(spec, dims, trace_sizes(dims)), path)


def reference_outputs(model: torch.nn.Module, spec: GraphSpec, dims: Blip2Dims,
                      feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The wrapper's outputs on `feeds`, by the table's output names."""
    with torch.no_grad():
        out = make_wrapper(model, spec, dims)(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.numpy() for t, o in zip(spec.outputs, out)}
