"""BLIP-2 reference modules vs transformers: tiny re-randomized checkpoints saved with save_pretrained
(model and Blip2Processor), loaded by blip_export.load_model. fp32, relative error < 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2_oracle import NUM_QUERIES, hf_config, make_checkpoint, pixels
from blip_export import load_model
from oracle import assert_close

REL = 1e-5


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """(lm, image_tokens) -> (folder, transformers model, our model, config)."""
    cache = {}

    def get(lm: str, image_tokens: bool):
        if (lm, image_tokens) not in cache:
            folder = tmp_path_factory.mktemp(f"{lm}-{'img' if image_tokens else 'legacy'}")
            theirs = make_checkpoint("Blip2ForConditionalGeneration", folder, hf_config(lm, image_tokens), seed=1)
            ours, config = load_model(folder)
            cache[lm, image_tokens] = folder, theirs, ours, config
        return cache[lm, image_tokens]

    return get


def processor_inputs(folder, texts, batch=2):
    import transformers

    proc = transformers.Blip2Processor.from_pretrained(folder)
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, (50, 60, 3), dtype=np.uint8) for _ in range(batch)]
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def test_vision_embeddings_and_vision_model(generation):
    _, theirs, ours, _ = generation("opt", True)
    x = pixels()
    assert_close(ours.vision_model.embeddings(x), theirs.vision_model.embeddings(x), REL, "vision embeddings")
    hidden, pooled = ours.vision_model(x)
    out = theirs.vision_model(pixel_values=x)
    assert_close(hidden, out.last_hidden_state, REL, "vision last_hidden_state")
    assert_close(pooled, out.pooler_output, REL, "vision pooler_output")


@torch.no_grad()
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_qformer_and_projection(generation, lm):
    _, theirs, ours, _ = generation(lm, True)
    x = pixels()
    image = theirs.vision_model(pixel_values=x).last_hidden_state
    q = theirs.query_tokens.expand(2, -1, -1)
    ref = theirs.qformer(query_embeds=q, encoder_hidden_states=image,
                         encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
    assert_close(ours.query_output(image), ref, REL, "Q-Former query output")
    feats = theirs.get_image_features(pixel_values=x)
    assert_close(ours.image_prefix(x), feats.pooler_output, REL, "projected queries (image_prefix)")


@torch.no_grad()
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_generation_logits_image_tokens(generation, lm):
    folder, theirs, ours, config = generation(lm, True)
    inputs = processor_inputs(folder, ["a photo of a", "what is the color of the"])
    assert int((inputs["input_ids"] == config.image_token_index).sum()) == 2 * NUM_QUERIES
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6, 7], [0, 8, 9, 3]])} if lm == "t5" else {}
    ref = theirs(**inputs, **extra).logits
    got = ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **extra)
    assert_close(got, ref, REL, f"{lm} logits, <image> tokens")


@torch.no_grad()
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_generation_logits_legacy(generation, lm):
    """No image_token_index: the queries go in front of the text embeddings with mask ones. transformers
    5 no longer does this in forward, so the oracle composes transformers' own pieces as 4.x did."""
    folder, theirs, ours, config = generation(lm, False)
    assert config.image_token_index is None
    inputs = processor_inputs(folder, ["a photo of a", "what is the color of the"])
    import transformers

    image_id = transformers.Blip2Processor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<image>")
    assert not (inputs["input_ids"] == image_id).any(), "the legacy processor adds no image tokens"
    ids, mask, x = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    prefix = theirs.get_image_features(pixel_values=x).pooler_output  # (B, Q, D_lm)
    embeds = torch.cat([prefix, theirs.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, NUM_QUERIES, dtype=mask.dtype), mask], dim=1)
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6], [0, 8, 9]])} if lm == "t5" else {}
    ref = theirs.language_model(inputs_embeds=embeds, attention_mask=full_mask, **extra).logits
    got = ours(x, ids, mask, **extra)
    assert got.shape[1] == (3 if lm == "t5" else NUM_QUERIES + ids.shape[1])
    assert_close(got, ref, REL, f"{lm} logits, legacy prefix")


def test_image_token_count_is_checked(generation):
    _, _, ours, config = generation("opt", True)
    ids = torch.tensor([[config.image_token_index] * (NUM_QUERIES - 1) + [2, 5]])
    with pytest.raises(ValueError, match=f"exactly {NUM_QUERIES} image tokens"):
        ours(pixels(1), ids)


@torch.no_grad()
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_model_features(tmp_path, lm):
    theirs = make_checkpoint("Blip2Model", tmp_path, hf_config(lm, True), seed=2)
    ours, config = load_model(tmp_path)
    assert type(ours).__name__ == "Blip2Model"
    x = pixels()
    hidden, pooled = ours.get_image_features(x)
    ref = theirs.get_image_features(pixel_values=x)
    assert_close(hidden, ref.last_hidden_state, REL, "get_image_features last_hidden_state")
    assert_close(pooled, ref.pooler_output, REL, "get_image_features pooler_output")
    assert_close(ours.get_qformer_features(x), theirs.get_qformer_features(pixel_values=x), REL, "get_qformer_features")
    ids = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    ref = theirs.get_text_features(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(ours.get_text_features(ids, mask), ref, REL, f"get_text_features ({lm})")
    inputs = processor_inputs(tmp_path, ["a photo of a", "what is the"])
    extra = {"decoder_input_ids": torch.tensor([[0, 5], [0, 8]])} if lm == "t5" else {}
    assert_close(ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **extra),
                 theirs(**inputs, **extra).logits, REL, "Blip2Model logits")


@pytest.fixture(scope="module", params=[True, False], ids=["image-tokens", "legacy"])
def retrieval(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("itm")
    theirs = make_checkpoint("Blip2ForImageTextRetrieval", folder, hf_config("opt", request.param, text_input=True), seed=3)
    ours, config = load_model(folder)
    return folder, theirs, ours, config


@torch.no_grad()
def test_itm_and_itc(retrieval):
    folder, theirs, ours, config = retrieval
    x = pixels()
    # Q-Former text ids (BERT vocabulary of the tiny Q-Former), with the Q image tokens in front when
    # the convention has them, as the retrieval processor gives them.
    text = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0]])
    text_mask = (text != 0).long()
    if config.image_token_index is not None:
        ids = torch.cat([torch.full((2, NUM_QUERIES), 7), text], dim=1)
        mask = torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.long), text_mask], dim=1)
    else:
        ids, mask = text, text_mask
    ref = theirs(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    got = ours(x, ids, mask, use_image_text_matching_head=True)
    assert_close(got, ref.logits_per_image, REL, "ITM logits")
    assert_close(ours.itm_logits(x, text, text_mask), ref.logits_per_image, REL, "itm_logits (text only ids)")
    ref = theirs(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    assert_close(ours(x, ids, mask), ref.logits_per_image, REL, "ITC similarity (max over queries)")
    assert_close(ours.image_feat(x), ref.image_embeds, REL, "ITC image features")
    assert_close(ours.text_feat(text, text_mask), ref.text_embeds, REL, "ITC text features")
    assert float(ref.logits_per_image.std()) > 1e-3, "scores must vary for the comparison to mean anything"


@torch.no_grad()
def test_text_and_vision_models_with_projection(tmp_path):
    config = hf_config("opt", True, text_input=True)
    text_model = make_checkpoint("Blip2TextModelWithProjection", tmp_path / "text", config, seed=4)
    vision_model = make_checkpoint("Blip2VisionModelWithProjection", tmp_path / "vision", config, seed=5)
    ours_text, _ = load_model(tmp_path / "text")
    ours_vision, _ = load_model(tmp_path / "vision")
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    ref = text_model(input_ids=ids, attention_mask=mask)
    embeds, hidden = ours_text(ids, mask)
    assert_close(embeds, ref.text_embeds, REL, "Blip2TextModelWithProjection text_embeds")
    assert_close(hidden, ref.last_hidden_state, REL, "Blip2TextModelWithProjection last_hidden_state")
    x = pixels()
    ref = vision_model(pixel_values=x)
    embeds, hidden = ours_vision(x)
    assert_close(embeds, ref.image_embeds, REL, "Blip2VisionModelWithProjection image_embeds")
    assert_close(hidden, ref.last_hidden_state, REL, "Blip2VisionModelWithProjection last_hidden_state")


class _Prefix(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids):
        embeds, _ = self.model.merge(self.model.image_prefix(pixel_values), input_ids, None)
        return embeds


@torch.no_grad()
def test_image_prefix_and_merge_trace_to_onnx(generation, tmp_path):
    """The pieces a graph wrapper calls export as they are (no flags), with dynamic batch and length."""
    import onnxruntime as ort

    _, _, ours, config = generation("opt", True)
    image = [config.image_token_index] * NUM_QUERIES
    ids = torch.tensor([image + [2, 5, 6], image + [2, 7, 8]])
    path = tmp_path / "prefix.onnx"
    torch.onnx.export(_Prefix(ours), (pixels(), ids), str(path), input_names=["pixel_values", "input_ids"],
                      output_names=["inputs_embeds"], dynamo=False,
                      dynamic_axes={"pixel_values": {0: "B"}, "input_ids": {0: "B", 1: "S"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = pixels(3, seed=9)
    ids = torch.tensor([image + [2, 5, 6, 9], image + [2, 7, 8, 9], image + [2, 7, 10, 11]])
    got = session.run(None, {"pixel_values": x.numpy(), "input_ids": ids.numpy()})[0]
    assert_close(got, _Prefix(ours)(x, ids), REL, "ONNX image prefix merged into the prompt embeddings")
