"""BLIP-2's exported graphs: every wrapper through torch.onnx.export with the table's names and dynamic
axes, then ONNX Runtime against the wrapper at several sizes, the wrappers against transformers (logits
with past, ITM/ITC scores), greedy generation over ONNX Runtime sessions token for token against
transformers' generate, and the table against the ONNX files it describes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from blip2_oracle import NUM_QUERIES, hf_config, make_checkpoint, pixels
from blip_export import load_model
from blip_export.families.blip2.export import (
    architecture_tasks, dims_from_config, export_graph, random_feeds, reference_outputs, verify_sizes)
from blip_export.families.blip2.wrappers import make_wrapper
from blip_runtime.decoding import GenerationOptions, generate
from blip_runtime.families.blip2.graphs import TASKS, Blip2Dims, axes, graphs
from blip_runtime.graphs import ROLE_GEMV, ROLE_LOOP, Limits
from oracle import assert_close

REL = 1e-5
GENERATION = [("opt", True), ("opt", False), ("t5", True), ("t5", False)]


def _export(folder, arch, config, **kwargs) -> SimpleNamespace:
    """Checkpoint -> load_model -> every graph of the architecture exported and opened in ONNX Runtime."""
    theirs = make_checkpoint(arch, folder, config, **kwargs)
    ours, cfg = load_model(folder)
    dims = dims_from_config(cfg)
    specs = graphs(dims, architecture_tasks(cfg))
    sessions = {}
    for name, spec in specs.items():
        export_graph(ours, spec, dims, folder / f"{name}.onnx")
        sessions[name] = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    def run(graph: str, **feeds) -> dict[str, np.ndarray]:
        specs[graph].check_feeds(feeds)  # the runtime's check: names, dtypes, agreeing axes
        return dict(zip([t.name for t in specs[graph].outputs], sessions[graph].run(None, feeds)))

    return SimpleNamespace(folder=folder, theirs=theirs, ours=ours, cfg=cfg, dims=dims, specs=specs, run=run,
                           sessions=sessions)


@pytest.fixture(scope="module", params=GENERATION, ids=[f"{lm}-{'tokens' if t else 'legacy'}" for lm, t in GENERATION])
def generation(request, tmp_path_factory):
    lm, image_tokens = request.param
    if lm == "opt":  # an untied head: tied to its spread-out embeddings, a tiny LM repeats its input
        config = hf_config("opt", image_tokens, text_overrides={"tie_word_embeddings": False})
        return _export(tmp_path_factory.mktemp("opt"), "Blip2ForConditionalGeneration", config, seed=7, std=0.1)
    return _export(tmp_path_factory.mktemp("t5"), "Blip2ForConditionalGeneration", hf_config("t5", image_tokens),
                   seed=8, std=0.1, untie_head=True)


@pytest.fixture(scope="module", params=["opt", "t5"])
def features(request, tmp_path_factory):
    return _export(tmp_path_factory.mktemp("features"), "Blip2Model", hf_config(request.param, True), seed=2)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("itm"), "Blip2ForImageTextRetrieval",
                   hf_config("opt", True, text_input=True), seed=3)


EXPECTED_GRAPHS = {"opt": ["vision", "qformer", "opt_step"],
                   "t5": ["vision", "qformer", "t5_encoder", "t5_cross_kv", "t5_step"],
                   "": ["vision", "qformer", "itm", "text_features"]}


def test_table_matches_onnx_files(generation, retrieval, features):
    for m in (generation, retrieval, features):
        _check_table(m)


def test_every_graph_builds_on_tensorrt_operators(generation, retrieval, features):
    """TensorRT's ONNX parser takes every node of every BLIP-2 graph (no integer Clip or CumSum, ...)."""
    from blip_export.trt_onnx_support import problems

    for m in (generation, retrieval, features):
        for name in m.specs:
            found = problems(onnx.load(str(m.folder / f"{name}.onnx")))
            assert not found, f"{m.cfg.architecture} {name}: " + "; ".join(found)


def _check_table(m):
    expected = EXPECTED_GRAPHS[m.dims.lm]
    if m.cfg.architecture == "Blip2Model":
        expected = [*expected[:2], "text_states", *expected[2:]]
    assert list(m.specs) == expected
    for name, spec in m.specs.items():
        graph = onnx.load(str(m.folder / f"{name}.onnx")).graph
        for what, declared, actual in (("inputs", spec.inputs, graph.input), ("outputs", spec.outputs, graph.output)):
            assert [t.name for t in actual] == [t.name for t in declared], f"{name} {what}"
            for t, a in zip(declared, actual):
                tt = a.type.tensor_type
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                dims = tuple(d.dim_param or d.dim_value for d in tt.shape.dim)
                assert (str(dtype), dims) == (t.dtype, t.shape), \
                    f"{name}.{t.name}: ONNX {dtype} {dims}, table {t.dtype} {t.shape}"
        loop = name.endswith("_step")
        assert spec.has(ROLE_LOOP) == loop and spec.has(ROLE_GEMV) == loop, name
    every_axis = {a for s in m.specs.values() for t in (*s.inputs, *s.outputs) for a in t.shape if isinstance(a, str)}
    bounds = axes(m.dims, Limits())
    assert every_axis <= bounds.keys()
    assert all(lo <= opt <= hi for lo, opt, hi in bounds.values())


def test_onnx_runtime_matches_wrappers(generation):
    _check_ort(generation)


def test_onnx_runtime_matches_wrappers_retrieval(retrieval):
    _check_ort(retrieval)


def test_onnx_runtime_matches_wrappers_features(features):
    _check_ort(features)


def _check_ort(m):
    for name, spec in m.specs.items():
        for i, sizes in enumerate(verify_sizes(m.dims)):
            feeds = random_feeds(spec, m.dims, sizes, seed=i)
            ref = reference_outputs(m.ours, spec, m.dims, feeds)
            got = m.run(name, **feeds)
            for out in spec.outputs:
                assert float(np.abs(ref[out.name]).max()) > 0, f"{name}.{out.name}: all zero"
                assert_close(got[out.name], ref[out.name], REL, f"{name}.{out.name} at {sizes}")


def _prompts(m, texts, pad_left: bool):
    import transformers

    proc = transformers.Blip2Processor.from_pretrained(m.folder)
    proc.tokenizer.padding_side = "left" if pad_left else "right"
    rng = np.random.RandomState(3)
    images = [rng.randint(0, 255, (40, 40, 3), dtype=np.uint8) for _ in texts]
    inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert not bool(inputs["attention_mask"].all()), "prompts of different lengths: padding expected"
    return inputs


def _lm_inputs(m, inputs):
    """The prefill/encoder graphs' ids and mask: the processor's, or (legacy) Q marker ids in front."""
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    if m.cfg.image_token_index is None:
        B, Q = ids.shape[0], m.dims.num_query_tokens
        ids = np.concatenate([np.full((B, Q), m.dims.image_token_id), ids], axis=1)
        mask = np.concatenate([np.ones((B, Q), np.int64), mask], axis=1)
    return ids, mask


def _legacy_lm_inputs(m, inputs) -> dict:
    """transformers 5 no longer places the queries of the legacy convention: its LM's inputs composed
    from transformers' own pieces as 4.x did (the queries before the text embeddings, mask ones)."""
    prefix = m.theirs.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # (B, Q, D)
    embeds = torch.cat([prefix, m.theirs.get_input_embeddings()(inputs["input_ids"])], dim=1)
    mask = inputs["attention_mask"]
    ones = torch.ones(mask.shape[0], m.dims.num_query_tokens, dtype=mask.dtype)
    return dict(inputs_embeds=embeds, attention_mask=torch.cat([ones, mask], dim=1))


def _theirs(m, inputs, **kwargs):
    """transformers' forward -> (logits, the language model's outputs)."""
    if m.cfg.image_token_index is None:
        out = m.theirs.language_model(**_legacy_lm_inputs(m, inputs), **kwargs)
        return out.logits, out
    out = m.theirs(**inputs, **kwargs)
    return out.logits, out.language_model_outputs


def _wrap(m, name, *args):
    with torch.no_grad():
        out = make_wrapper(m.ours, m.specs[name], m.dims)(*(torch.as_tensor(a) for a in args))
    return out if isinstance(out, tuple) else (out,)


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    return ((np.cumsum(mask, 1) * mask - 1)[:, -new:]).astype(np.int64)


@torch.no_grad()
def test_prefill_and_steps_match_transformers_with_past(generation):
    """Ours (vision -> qformer -> OPT's prompt call / T5's encoder -> steps with a permuted beam_idx)
    against transformers' forward, then its language model's forward with the past it returned,
    reordered. OPT's steps are fed a generated image token, which both embed as text."""
    m = generation
    texts = ["a", "a photo of the", "what is the color of the small square"]
    inputs = _prompts(m, texts, pad_left=m.dims.lm == "opt")
    pv = inputs["pixel_values"]
    (embeds,) = _wrap(m, "vision", pv)
    prefix = _wrap(m, "qformer", embeds)[1]
    ids, mask = _lm_inputs(m, inputs)
    L, R = m.dims.lm_layers, ids.shape[0]
    rng = np.random.default_rng(0)
    beam_idx = np.array([2, 0, 1])
    if m.dims.lm == "opt":
        logits, lm_out = _theirs(m, inputs, use_cache=True)
        empty = [torch.zeros(R, m.dims.lm_heads, 0, m.dims.lm_head_dim)] * (2 * L)
        got = _wrap(m, "opt_step", ids, prefix, mask, _positions(mask, ids.shape[1]), np.arange(R), *empty)
        assert_close(got[0], logits[:, -1], REL, "opt_step prompt call logits vs transformers")
        past, cache = got[1:], lm_out.past_key_values
        no_queries = np.zeros((R, 0, m.dims.lm_hidden), np.float32)
        for new in (1, 3):
            nxt = rng.integers(3, m.dims.vocab_size, (R, new))
            if m.dims.image_token_id < m.dims.vocab_size:
                nxt[0, -1] = m.dims.image_token_id
            mask = np.concatenate([mask[beam_idx], np.ones((R, new), np.int64)], axis=1)
            got = _wrap(m, "opt_step", nxt, no_queries, mask, _positions(mask, new), beam_idx, *past)
            cache.reorder_cache(torch.from_numpy(beam_idx))
            ref = m.theirs.language_model(input_ids=torch.from_numpy(nxt), attention_mask=torch.from_numpy(mask),
                                          cache=cache, use_cache=True)
            assert_close(got[0], ref.logits[:, -1], REL, f"opt_step logits ({new} new) vs transformers with past")
            past, cache = got[1:], ref.past_key_values
        return
    dec = rng.integers(2, m.dims.vocab_size, (R, 5))
    dec[:, 0] = 0  # decoder_start_token_id
    logits, lm_out = _theirs(m, inputs, decoder_input_ids=torch.from_numpy(dec[:, :2]), use_cache=True)
    (states,) = _wrap(m, "t5_encoder", ids, prefix, mask)
    assert_close(states, lm_out.encoder_last_hidden_state, REL, "t5_encoder states vs transformers")
    cross = _wrap(m, "t5_cross_kv", states)
    empty = [torch.zeros(R, m.dims.lm_heads, 0, m.dims.lm_head_dim)] * (2 * L)
    got = _wrap(m, "t5_step", dec[:, :2], mask, np.arange(R), *empty, *cross)
    assert_close(got[0], logits[:, -1], REL, "t5_step logits (2 new, past 0) vs transformers")
    # the rows move to other requests here: their encoder mask and cross K/V move with them
    mask, cross = mask[beam_idx], [c[torch.from_numpy(beam_idx)] for c in cross]
    enc = lm_out.encoder_last_hidden_state[torch.from_numpy(beam_idx)]
    cache = lm_out.past_key_values
    cache.reorder_cache(torch.from_numpy(beam_idx))
    got = _wrap(m, "t5_step", dec[:, 2:], mask, beam_idx, *got[1:], *cross)
    ref = m.theirs.language_model(encoder_outputs=(enc,), attention_mask=torch.from_numpy(mask),
                                  decoder_input_ids=torch.from_numpy(dec[:, 2:]), cache=cache)
    assert_close(got[0], ref.logits[:, -1], REL, "t5_step logits (3 new, past 2) vs transformers with past")


def _image_prefix(m, pixel_values: np.ndarray) -> np.ndarray:
    """vision then qformer through ONNX Runtime -> image_prefix [B, Q, D]."""
    image_embeds = m.run("vision", pixel_values=pixel_values)["image_embeds"]
    return m.run("qformer", image_embeds=image_embeds)["image_prefix"]


class OrtOptInference:
    """The decoding loop's Inference over ONNX Runtime sessions: vision and qformer once, opt_step over
    the prompt (its queries, past 0) on the first call and over the new token after; beam moves ride in
    the next step's beam_idx."""

    def __init__(self, m, pixel_values: np.ndarray):
        self.m, self.past = m, None
        self.prefix = _image_prefix(m, pixel_values)
        self.legacy = m.cfg.image_token_index is None

    def logits(self, tokens, attention_mask):
        m, R = self.m, tokens.shape[0]
        if self.legacy:  # the queries' positions count in the mask and the positions
            attention_mask = np.concatenate([np.ones((R, m.dims.num_query_tokens), np.int64), attention_mask], 1)
        pos = _positions(attention_mask, tokens.shape[1])
        if self.past is None:
            if self.legacy:
                tokens = np.concatenate([np.full((R, m.dims.num_query_tokens), m.dims.image_token_id), tokens], 1)
                pos = _positions(attention_mask, tokens.shape[1])
            empty = np.zeros((R, m.dims.lm_heads, 0, m.dims.lm_head_dim), np.float32)
            past = {f"past_{k}.{i}": empty for i in range(m.dims.lm_layers) for k in ("key", "value")}
            out = m.run("opt_step", input_ids=tokens, image_prefix=self.prefix, attention_mask=attention_mask,
                        position_ids=pos, beam_idx=np.arange(R), **past)
        else:
            out = m.run("opt_step", input_ids=tokens, image_prefix=np.zeros((R, 0, m.dims.lm_hidden), np.float32),
                        attention_mask=attention_mask, position_ids=pos, beam_idx=self.beam_idx, **self.past)
        self.past = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        self.beam_idx = np.arange(R)
        return out["logits"]

    def rearrange(self, source_indices):
        if self.past is None:
            self.prefix = self.prefix[source_indices]
        else:
            self.beam_idx = self.beam_idx[source_indices]


class OrtT5Inference:
    """vision, qformer, t5_encoder and t5_cross_kv once per request; t5_step for every call."""

    def __init__(self, m, pixel_values, input_ids, attention_mask):
        self.m = m
        prefix = _image_prefix(m, pixel_values)
        states = m.run("t5_encoder", input_ids=input_ids, image_prefix=prefix, attention_mask=attention_mask)
        self.cross = m.run("t5_cross_kv", **states)
        self.encoder_mask, self.past = attention_mask, None

    def logits(self, tokens, attention_mask):
        m, R = self.m, tokens.shape[0]
        if self.past is None:
            shape = (R, m.dims.lm_heads, 0, m.dims.lm_head_dim)
            self.past = {k.replace("present", "past"): np.zeros(shape, np.float32)
                         for k in (t.name for t in m.specs["t5_step"].outputs[1:])}
            self.beam_idx = np.arange(R)
        out = m.run("t5_step", decoder_input_ids=tokens, encoder_attention_mask=self.encoder_mask,
                    beam_idx=self.beam_idx, **self.past, **self.cross)
        self.past = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        self.beam_idx = np.arange(R)
        return out["logits"]

    def rearrange(self, source_indices):
        self.encoder_mask = self.encoder_mask[source_indices]
        self.cross = {k: v[source_indices] for k, v in self.cross.items()}
        if self.past is not None:
            self.beam_idx = self.beam_idx[source_indices]


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_generation_through_onnx_runtime_matches_transformers(generation, num_beams):
    m = generation
    eos, pad = (2, 1) if m.dims.lm == "opt" else (1, 0)
    inputs = _prompts(m, ["a photo of", "what is the color of the small square"], pad_left=m.dims.lm == "opt")
    settings = dict(max_new_tokens=10, do_sample=False, num_beams=num_beams, eos_token_id=eos, pad_token_id=pad)
    if m.cfg.image_token_index is None:  # from embeddings, OPT returns the new tokens only
        ref = m.theirs.language_model.generate(**_legacy_lm_inputs(m, inputs), **settings)
        skip = 0 if m.dims.lm == "opt" else 1
    else:
        ref = m.theirs.generate(**inputs, **settings)
        skip = inputs["input_ids"].shape[1] if m.dims.lm == "opt" else 1  # T5 returns the start token first
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in ref[:, skip:].tolist()]
    options = GenerationOptions(eos_token_id=eos, pad_token_id=pad, max_new_tokens=10, num_beams=num_beams)
    pv = inputs["pixel_values"].numpy()
    if m.dims.lm == "opt":
        got = generate(OrtOptInference(m, pv), inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), options)
    else:
        ids, mask = _lm_inputs(m, inputs)
        start = np.zeros((2, 1), np.int64)
        got = generate(OrtT5Inference(m, pv, ids, mask), start, np.ones_like(start), options)
    print("transformers:", expected, "\nONNX Runtime:", got)
    assert got == expected
    assert all(len(set(seq)) > 2 for seq in got), "a tiny LM that repeats one token proves little"


@torch.no_grad()
def test_itm_and_itc_through_onnx_runtime_match_transformers(retrieval):
    m = retrieval
    x = pixels(batch=3)
    text = np.array([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0], [2, 16, 3, 0, 0, 0]])
    text_mask = (text != 0).astype(np.int64)
    Q = NUM_QUERIES
    ids = torch.cat([torch.full((3, Q), m.cfg.image_token_index), torch.from_numpy(text)], dim=1)
    mask = torch.cat([torch.ones(3, Q, dtype=torch.long), torch.from_numpy(text_mask)], dim=1)
    image_embeds = m.run("vision", pixel_values=x.numpy())["image_embeds"]
    q = m.run("qformer", image_embeds=image_embeds)
    ref = m.theirs(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    got = m.run("itm", image_embeds=image_embeds, input_ids=text, attention_mask=text_mask)["itm_logits"]
    assert_close(got, ref.logits_per_image, REL, "itm_logits (ONNX Runtime) vs transformers")
    ref = m.theirs(pixel_values=x, input_ids=ids, attention_mask=mask)
    text_feat = m.run("text_features", input_ids=text, attention_mask=text_mask)["text_feat"]
    assert_close(q["image_feat"], ref.image_embeds, REL, "image_feat vs transformers")
    assert_close(text_feat, ref.text_embeds, REL, "text_feat vs transformers")
    sims = np.einsum("bqe,te->bqt", q["image_feat"], text_feat).max(axis=1)  # best query per pair
    assert_close(sims, ref.logits_per_image, REL, "ITC similarity vs transformers")
    assert float(ref.logits_per_image.std()) > 1e-3, "scores must vary for the comparison to mean anything"


def test_table_selection_and_dims_round_trip():
    dims = Blip2Dims(image_size=224, num_image_tokens=257, vision_hidden=1408, num_query_tokens=32, qformer_hidden=768,
                     qformer_vocab_size=30522, lm="opt", lm_hidden=2560, lm_layers=32, lm_heads=32, lm_head_dim=80,
                     vocab_size=50304, image_token_id=50265, max_position_embeddings=2048)
    assert Blip2Dims.from_dict(dims.to_dict()) == dims
    table = graphs(dims, ["generate"])
    assert list(table) == ["vision", "qformer", "opt_step"]  # one LM graph: the prompt runs through the step
    assert table["vision"].outputs[0].shape == ("batch", 257, 1408)
    assert [t.name for t in table["qformer"].outputs] == ["query_output", "image_prefix"]
    step = table["opt_step"]
    assert [t.name for t in step.inputs[:5]] == ["input_ids", "image_prefix", "attention_mask", "position_ids",
                                                 "beam_idx"]
    assert step.inputs[1].shape == ("rows", "prefix", 2560)
    assert [t.name for t in step.inputs[5:7]] == ["past_key.0", "past_value.0"] and len(step.inputs) == 5 + 64
    assert step.inputs[0].high == 50304
    legacy = graphs(Blip2Dims(**{**dims.to_dict(), "image_token_id": 50304}), ["generate"])
    assert legacy["opt_step"].inputs[0].high == 50305  # the marker id is a valid input
    with pytest.raises(ValueError, match="tasks"):
        graphs(dims, ["caption"])
    with pytest.raises(ValueError, match="itc"):
        graphs(dims, ["itc"])
    with pytest.raises(ValueError, match="unknown fields"):
        Blip2Dims.from_dict({**dims.to_dict(), "hidden": 1})
    with pytest.raises(ValueError, match="positions"):
        axes(dims, Limits(max_text_len=2000))
    bounds = axes(dims, Limits(max_batch=8, max_text_len=40, max_new_tokens=30, num_beams=3))
    # the longest past a step is fed: prompt 72 + 30 new tokens - 2 (the last token is never fed)
    assert bounds["prompt"] == (1, 40, 72) and bounds["past"][2] == 100 and bounds["rows"][2] == 24
    assert set(TASKS) == {"generate", "features", "itm", "itc"}
    features = graphs(dims, ["generate", "features"])
    assert [t.name for t in features["vision"].outputs] == ["image_embeds", "pooled_output"]
    assert features["text_states"].outputs[0].shape == ("batch", "prompt", 2560)


@torch.no_grad()
def test_blip2_model_features_through_onnx_runtime_match_transformers(features):
    m = features
    x = pixels()
    vision = m.run("vision", pixel_values=x.numpy())
    ref = m.theirs.get_image_features(pixel_values=x)
    assert_close(vision["image_embeds"], ref.last_hidden_state, REL, "get_image_features last_hidden_state")
    assert_close(vision["pooled_output"], ref.pooler_output, REL, "get_image_features pooler_output")
    query = m.run("qformer", image_embeds=vision["image_embeds"])["query_output"]
    assert_close(query, m.theirs.get_qformer_features(pixel_values=x), REL, "get_qformer_features")
    ids = np.array([[2, 5, 6, 7, 8], [2, 9, 10, 11, 1]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    ref = m.theirs.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = m.run("text_states", input_ids=ids, attention_mask=mask)["text_states"]
    assert_close(got, ref.last_hidden_state, REL, f"get_text_features ({m.dims.lm})")


@pytest.mark.parametrize("image_size, tokens", [(224, 257), (364, 677)])
def test_dims_of_public_configs(image_size, tokens):
    """blip2-opt-2.7b (and its 364 px -coco fine-tune) and blip2-flan-t5-xl as their config.json say."""
    from blip_export.families.blip2.config import config_from_dict

    opt = config_from_dict({
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"], "num_query_tokens": 32,
        "image_token_index": 50265, "vision_config": {"image_size": image_size},
        "text_config": {"model_type": "opt", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "ffn_dim": 10240}})
    dims = dims_from_config(opt)
    assert (dims.num_image_tokens, dims.vision_hidden, dims.lm, dims.lm_hidden, dims.lm_layers, dims.lm_head_dim,
            dims.image_token_id, dims.max_position_embeddings) == (tokens, 1408, "opt", 2560, 32, 80, 50265, 2048)
    table = graphs(dims, architecture_tasks(opt))
    assert table["vision"].outputs[0].shape == ("batch", tokens, 1408)
    assert table["qformer"].outputs[1].shape == ("batch", 32, 2560)
    t5 = config_from_dict({
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"],
        "text_config": {"model_type": "t5", "vocab_size": 32128, "d_model": 2048, "d_kv": 64, "num_heads": 32,
                        "num_layers": 24, "d_ff": 5120, "feed_forward_proj": "gated-gelu"}})
    dims = dims_from_config(t5)
    assert (dims.lm, dims.lm_layers, dims.lm_heads, dims.lm_head_dim, dims.image_token_id) == ("t5", 24, 32, 64, 32128)
    cross = graphs(dims, ["generate"])["t5_cross_kv"].outputs
    assert [t.shape for t in cross[:2]] == [("batch", 32, 64, "prompt"), ("batch", 32, "prompt", 64)]
    assert len(cross) == 48


def test_bad_feeds_are_refused_by_the_table(generation):
    """The runtime checks feeds against the table before a session sees them: one line naming the input."""
    m = generation
    first = "opt_step" if m.dims.lm == "opt" else "t5_encoder"
    feeds = random_feeds(m.specs[first], m.dims, verify_sizes(m.dims)[-1])  # OPT's prompt call, 3 rows
    with pytest.raises(ValueError, match="input 'input_ids' has dtype int32, expected int64"):
        m.run(first, **{**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})
    with pytest.raises(ValueError, match="'image_prefix' has (rows|batch)=2, but another input has"):
        m.run(first, **{**feeds, "image_prefix": feeds["image_prefix"][:2]})
    with pytest.raises(ValueError, match="missing inputs \\['attention_mask'\\]"):
        m.run(first, **{k: v for k, v in feeds.items() if k != "attention_mask"})
