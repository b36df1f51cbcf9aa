"""The decoding loop's view of BLIP-2's language models (blip_runtime.decoding.Inference).

OPT: the first call runs the whole prompt through `opt_step` with an empty past (image tokens replaced
in the graph by the row's projected queries), or through `opt_prefill` where the bundle has it (a
reduced form's many-row twin, or a bundle of the earlier layout whose prefill took no past); later
calls run `opt_step` with no queries. T5: `t5_encoder` and `t5_cross_kv` run once per
request before decoding (the runtime does it), every call runs `t5_step`. Beam moves between steps
ride in the next step's `beam_idx` input, so no backend gathers the cache itself; per-request state
(the queries, T5's cross K/V and encoder mask) is gathered in numpy only when rows change request
(the expansion to beams or samples before the first step).
"""

from __future__ import annotations

import numpy as np

from ...session import Session
from .graphs import Blip2Dims


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    """int64 [R, new]: position of each of the last `new` tokens, counting only real tokens of its
    row (cumsum(mask) * mask - 1, as transformers derives OPT's); pads get -1 and are masked."""
    return (np.cumsum(mask, axis=1) * mask - 1)[:, -new:].astype(np.int64)


def _past(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.replace("present_", "past_"): v for name, v in out.items() if name.startswith("present_")}


class _Rows:
    """Which request each row serves, and beam moves held for the next step's beam_idx."""

    def __init__(self, requests: int):
        self.request = np.arange(requests)
        self.past: dict[str, np.ndarray] | None = None
        self.beam_idx: np.ndarray | None = None

    def _move(self, source: np.ndarray) -> bool:
        """Record a move; True when rows change request (per-request state must be gathered)."""
        moved = self.request[source]
        changes = len(source) != len(self.request) or not np.array_equal(moved, self.request)
        self.request = moved
        if self.past is not None:
            self.beam_idx = source if self.beam_idx is None else self.beam_idx[source]
        return changes

    def _take_beam_idx(self, rows: int) -> np.ndarray:
        idx = self.beam_idx if self.beam_idx is not None else np.arange(rows, dtype=np.int64)
        self.beam_idx = None
        return idx.astype(np.int64)


def _empty_past(rows: int, dims: Blip2Dims) -> dict[str, np.ndarray]:
    """past_key.i / past_value.i [rows, H, 0, Dh] in the graphs' cache dtype: a first call's cache."""
    empty = np.zeros((rows, dims.lm_heads, 0, dims.lm_head_dim), dims.lm_dtype)
    return {f"past_{k}.{i}": empty for i in range(dims.lm_layers) for k in ("key", "value")}


class OptInference(_Rows):
    """OPT behind the queries. image_prefix: float32 [B, Q, D], one per request (the qformer graph's).
    graphs: the bundle's GraphSpecs (which graph takes the prompt, and what each takes)."""

    def __init__(self, session: Session, dims: Blip2Dims, graphs: dict, image_prefix: np.ndarray):
        super().__init__(image_prefix.shape[0])
        self.session, self.dims = session, dims
        self.prefix = image_prefix
        self.prompt_graph = "opt_prefill" if "opt_prefill" in graphs else "opt_step"
        self.takes = {name: {t.name for t in graphs[name].inputs} for name in {self.prompt_graph, "opt_step"}}

    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows, new = tokens.shape
        mask = attention_mask.astype(np.int64)
        feeds = {"input_ids": tokens.astype(np.int64), "attention_mask": mask, "position_ids": _positions(mask, new)}
        if self.past is None:
            graph = self.prompt_graph
            feeds["image_prefix"] = self.prefix
            if "beam_idx" in self.takes[graph]:  # the step graph's prompt call: nothing cached yet
                feeds.update(beam_idx=np.arange(rows, dtype=np.int64), **_empty_past(rows, self.dims))
        else:
            graph = "opt_step"
            feeds.update(beam_idx=self._take_beam_idx(rows), **self.past)
            if "image_prefix" in self.takes[graph]:  # no queries after the prompt
                feeds["image_prefix"] = np.zeros((rows, 0, self.prefix.shape[2]), np.float32)
        out = self.session.run(graph, feeds, keep=("present_*",))
        self.past = _past(out)
        return out["logits"]

    def rearrange(self, source_indices: np.ndarray) -> None:
        source = np.asarray(source_indices, dtype=np.int64)
        if self._move(source) and self.past is None:
            self.prefix = self.prefix[source]  # only the prompt's call reads the queries


class T5Inference(_Rows):
    """T5's decoder over cross K/V computed once per request. cross: {cross_key.i [B, H, Dh, P],
    cross_value.i [B, H, P, Dh]}; encoder_mask: int64 [B, P]."""

    def __init__(self, session: Session, dims: Blip2Dims, cross: dict[str, np.ndarray], encoder_mask: np.ndarray):
        super().__init__(encoder_mask.shape[0])
        self.session, self.dims = session, dims
        self.cross = cross
        self.encoder_mask = encoder_mask.astype(np.int64)

    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows = tokens.shape[0]
        if self.past is None:
            self.past = _empty_past(rows, self.dims)
        # decoder rows are never padded (all start at decoder_start_token_id): no decoder mask
        out = self.session.run("t5_step", {
            "decoder_input_ids": tokens.astype(np.int64), "encoder_attention_mask": self.encoder_mask,
            "beam_idx": self._take_beam_idx(rows), **self.past, **self.cross}, keep=("present_*",))
        self.past = _past(out)
        return out["logits"]

    def rearrange(self, source_indices: np.ndarray) -> None:
        source = np.asarray(source_indices, dtype=np.int64)
        if self._move(source):
            # rows move to other requests: their cross K/V and encoder mask move with them
            self.cross = {k: v[source] for k, v in self.cross.items()}
            self.encoder_mask = self.encoder_mask[source]
