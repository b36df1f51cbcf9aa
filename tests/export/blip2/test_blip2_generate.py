"""Generation of Blip2ForConditionalGeneration (OPT and Flan-T5-style T5) through the runtime's numpy
decoding loop over our reference model, token for token against transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2_oracle import hf_config, make_checkpoint
from blip_export import load_model
from blip_export.families.blip2.modeling.models import opt_position_ids
from blip_runtime.decoding import GenerationOptions, generate


class TorchOptInference:
    """The decoding loop's Inference over the reference model: the first call prefills the prompt
    (image queries merged in), later calls feed one token each against the KV cache."""

    def __init__(self, model, pixel_values: torch.Tensor):
        self.model = model
        self.prefix = model.image_prefix(pixel_values)  # (B, Q, D_lm)
        self.past = None

    @torch.no_grad()
    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = torch.from_numpy(tokens), torch.from_numpy(attention_mask)
        lm = self.model.language_model
        if self.past is None:
            embeds, mask = self.model.merge(self.prefix, ids, mask)
            past_length = 0
        else:
            embeds, past_length = lm.embed(ids), self.past[0][0].shape[2]
        logits, self.past = lm(embeds, mask, opt_position_ids(mask, past_length), self.past)
        return logits[:, -1].numpy()

    def rearrange(self, source_indices: np.ndarray) -> None:
        idx = torch.from_numpy(source_indices)
        self.prefix = self.prefix[idx]
        if self.past is not None:
            self.past = [(k[idx], v[idx]) for k, v in self.past]


class TorchT5Inference:
    """The decoding loop's Inference over the reference model's T5: the encoder (image queries
    merged into the prompt) and its cross K/V run once; the loop feeds decoder tokens."""

    def __init__(self, model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        lm = model.language_model
        embeds, self.encoder_mask = model.merge(model.image_prefix(pixel_values), input_ids, attention_mask)
        self.cross = lm.cross_kv(lm.encode(embeds, self.encoder_mask))
        self.lm, self.past = lm, None

    @torch.no_grad()
    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits, self.past = self.lm.decode(torch.from_numpy(tokens), self.encoder_mask, self.cross, self.past)
        return logits[:, -1].numpy()

    def rearrange(self, source_indices: np.ndarray) -> None:
        idx = torch.from_numpy(source_indices)
        self.encoder_mask = self.encoder_mask[idx]
        self.cross = [(k[idx], v[idx]) for k, v in self.cross]
        if self.past is not None:
            self.past = [(k[idx], v[idx]) for k, v in self.past]


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_t5_generate_matches_transformers(tmp_path, num_beams):
    import transformers

    theirs = make_checkpoint("Blip2ForConditionalGeneration", tmp_path, hf_config("t5", True), seed=8, std=0.1,
                             untie_head=True)
    ours, cfg = load_model(tmp_path)
    proc = transformers.Blip2Processor.from_pretrained(tmp_path)
    rng = np.random.RandomState(2)
    images = [rng.randint(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    inputs = proc(images=images, text=["what is the color of the", "a photo of"], return_tensors="pt", padding=True)
    ref = theirs.generate(**inputs, max_new_tokens=10, do_sample=False, num_beams=num_beams, eos_token_id=1,
                          pad_token_id=0, decoder_start_token_id=0)
    expected = []
    for row in ref[:, 1:].tolist():  # transformers returns the decoder start token first
        cut = row.index(1) + 1 if 1 in row else len(row)
        expected.append(row[:cut])
    start = np.zeros((2, 1), dtype=np.int64)
    options = GenerationOptions(eos_token_id=1, pad_token_id=0, max_new_tokens=10, num_beams=num_beams)
    got = generate(TorchT5Inference(ours, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]),
                   start, np.ones_like(start), options)
    print("transformers:", expected, "\nours:        ", got)
    assert got == expected
    assert all(len(set(seq)) > 2 for seq in got), "a tiny LM that repeats one token proves little"


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_opt_generate_matches_transformers(tmp_path, num_beams):
    import transformers

    # An untied head: tied to embeddings scaled up for spread, a tiny LM predicts its input again.
    config = hf_config("opt", True, text_overrides={"tie_word_embeddings": False})
    theirs = make_checkpoint("Blip2ForConditionalGeneration", tmp_path, config, seed=7, std=0.1)
    ours, cfg = load_model(tmp_path)
    proc = transformers.Blip2Processor.from_pretrained(tmp_path)
    rng = np.random.RandomState(1)
    images = [rng.randint(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    inputs = proc(images=images, text=["a photo of the", "a blue square"], return_tensors="pt", padding=True)
    assert bool(inputs["attention_mask"].all()), "equal-length prompts: no padding in this test"
    options = GenerationOptions(eos_token_id=2, pad_token_id=1, max_new_tokens=12, num_beams=num_beams)
    ref = theirs.generate(**inputs, max_new_tokens=12, do_sample=False, num_beams=num_beams,
                          eos_token_id=2, pad_token_id=1)
    prompt = inputs["input_ids"].shape[1]
    expected = []
    for row in ref[:, prompt:].tolist():
        cut = row.index(2) + 1 if 2 in row else len(row)
        expected.append(row[:cut])
    got = generate(TorchOptInference(ours, inputs["pixel_values"]), inputs["input_ids"].numpy(),
                   inputs["attention_mask"].numpy(), options)
    print("transformers:", expected, "\nours:        ", got)
    assert got == expected
    assert all(len(set(seq)) > 2 for seq in got), "a tiny LM that repeats one token proves little"
