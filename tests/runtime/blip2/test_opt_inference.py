"""Which graph OPT's decoding loop runs, and what it feeds each (blip_runtime.families.blip2.inference):
the prompt through opt_step (queries given, an empty past) in a bundle with one LM graph, through
opt_prefill where a reduced form carries that twin, and through an earlier bundle's opt_prefill (no past
inputs, a step without queries). Every feed is checked against the graph's own table, as a session does.
Torch-free: a recording session stands in for the backend."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from blip_runtime.families.blip2.graphs import Blip2Dims, graphs, opt_step_spec, prompt_call
from blip_runtime.families.blip2.inference import OptInference
from blip_runtime.graphs import GraphSpec

DIMS = Blip2Dims(image_size=32, num_image_tokens=5, vision_hidden=8, num_query_tokens=3, qformer_hidden=8,
                 qformer_vocab_size=50, lm="opt", lm_hidden=6, lm_layers=2, lm_heads=2, lm_head_dim=3,
                 vocab_size=40, image_token_id=39, max_position_embeddings=64)


class Recording:
    """A session: checks feeds against `specs`, returns logits and a cache grown by the new tokens."""

    def __init__(self, specs: dict[str, GraphSpec]):
        self.specs, self.calls = specs, []

    def run(self, graph, feeds, keep=()):
        self.specs[graph].check_feeds(feeds)
        self.calls.append((graph, feeds))
        rows, new = feeds["input_ids"].shape
        total = feeds["attention_mask"].shape[1]
        out = {"logits": np.zeros((rows, DIMS.vocab_size), np.float32)}
        for i in range(DIMS.lm_layers):
            for k in ("key", "value"):
                out[f"present_{k}.{i}"] = np.full((rows, DIMS.lm_heads, total, DIMS.lm_head_dim), len(self.calls), np.float32)
        return out


def _decode(specs: dict[str, GraphSpec], rows: int = 2, steps: int = 2) -> list:
    session = Recording(specs)
    prefix = np.ones((rows, DIMS.num_query_tokens, DIMS.lm_hidden), np.float32)
    inference = OptInference(session, DIMS, specs, prefix)
    prompt = 4 + DIMS.num_query_tokens
    ids = np.full((rows, prompt), 5, np.int64)
    ids[:, : DIMS.num_query_tokens] = DIMS.image_token_id
    mask = np.ones((rows, prompt), np.int64)
    inference.logits(ids, mask)
    for _ in range(steps):
        inference.rearrange(np.array([1, 0]))  # a beam move: the next step's beam_idx
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], 1)
        inference.logits(np.full((rows, 1), DIMS.image_token_id, np.int64), mask)  # a generated image token
    return session.calls


def _past_lengths(feeds) -> set[int]:
    return {v.shape[2] for k, v in feeds.items() if k.startswith("past_")}


def test_one_lm_graph_runs_the_prompt_and_the_steps():
    specs = graphs(DIMS, ["generate"])
    assert "opt_prefill" not in specs
    calls = _decode(specs)
    assert [g for g, _ in calls] == ["opt_step"] * 3
    (_, first), *later = calls
    assert first["image_prefix"].shape == (2, DIMS.num_query_tokens, DIMS.lm_hidden)
    assert _past_lengths(first) == {0} and first["beam_idx"].tolist() == [0, 1]
    prompt = first["input_ids"].shape[1]
    for j, (_, feeds) in enumerate(later):
        assert feeds["image_prefix"].shape == (2, 0, DIMS.lm_hidden)  # no queries after the prompt
        assert _past_lengths(feeds) == {prompt + j} and feeds["beam_idx"].tolist() == [1, 0]
        assert feeds["past_key.0"][0, 0, 0, 0] == j + 1  # the previous call's present


def test_a_prompt_twin_takes_the_prompt():
    specs = graphs(DIMS, ["generate"])  # the twin as precision.convert_bundle lists it: the step's I/O, no roles
    specs = {**specs, "opt_prefill": replace(specs["opt_step"], name="opt_prefill", roles=())}
    calls = _decode(specs)
    assert [g for g, _ in calls] == ["opt_prefill", "opt_step", "opt_step"]
    assert _past_lengths(calls[0][1]) == {0} and calls[0][1]["image_prefix"].shape[1] == DIMS.num_query_tokens
    # the shared test of which feeds are a prompt's call (the twin's measurement, the benchmark's stages)
    assert [prompt_call(feeds) for _, feeds in calls] == [True, False, False]


def test_a_bundle_of_the_earlier_layout_still_runs():
    """Earlier bundles: opt_prefill without past inputs, opt_step without image_prefix."""
    step = opt_step_spec(DIMS)
    old_step = GraphSpec("opt_step", tuple(t for t in step.inputs if t.name != "image_prefix"), step.outputs, roles=step.roles)
    old_prefill = GraphSpec("opt_prefill", tuple(t for t in step.inputs if t.name in (
        "input_ids", "image_prefix", "attention_mask", "position_ids")), step.outputs)
    calls = _decode({"opt_prefill": old_prefill, "opt_step": old_step})
    assert [g for g, _ in calls] == ["opt_prefill", "opt_step", "opt_step"]
    assert "beam_idx" not in calls[0][1] and not _past_lengths(calls[0][1])
    assert all("image_prefix" not in feeds for _, feeds in calls[1:])
    assert [prompt_call(feeds) for _, feeds in calls] == [True, False, False]
