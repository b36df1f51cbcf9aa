"""Reference modules against transformers: each built from a config with re-randomized weights,
saved with save_pretrained, loaded by blip_export.load_model. fp32 relative error < 1e-5."""

from __future__ import annotations

import pytest
import torch

from blip_export import load_model
from oracle import BASE_TEXT, BASE_VISION, assert_close, hf_config, make_checkpoint

REL = 1e-5
ARCHS = ["BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """arch -> (transformers model, our model), built once per module."""
    made = {}

    def get(arch):
        if arch not in made:
            folder = tmp_path_factory.mktemp(arch)
            theirs = make_checkpoint(arch, folder, seed=len(made) + 1)
            ours, _ = load_model(folder)
            made[arch] = (theirs, ours)
        return made[arch]

    return get


def inputs(batch=3, seq=7, image=32, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image, image, generator=g)
    ids = torch.randint(4, vocab - 2, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(1, batch):  # right padding of different lengths, as BlipProcessor pads
        mask[i, seq - 2 * i :] = 0
        ids[i, seq - 2 * i :] = 0
    return pixels, ids, mask


@torch.no_grad()
def test_vision_embeddings(pair):
    theirs, ours = pair("BlipForConditionalGeneration")
    pixels, _, _ = inputs()
    out = theirs.vision_model(pixel_values=pixels)
    embeds, pooled = ours.vision_model(pixels)
    assert embeds.shape == (3, 17, 32)
    assert_close(embeds, out.last_hidden_state, REL, "vision last_hidden_state")
    assert_close(pooled, out.pooler_output, REL, "vision pooler_output")


@torch.no_grad()
def test_text_encoder_multimodal_and_itm(pair):
    theirs, ours = pair("BlipForImageTextRetrieval")
    pixels, ids, mask = inputs()
    image_embeds = theirs.vision_model(pixel_values=pixels).last_hidden_state
    ref = theirs.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
    states, pooled, _ = ours.text_encoder(ids, mask, encoder_hidden_states=image_embeds)
    assert pooled is None
    keep = mask.bool()  # padded positions are never read downstream
    assert_close(states[keep], ref.last_hidden_state[keep], REL, "text encoder (multimodal) states")
    itm = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    assert_close(ours.itm_logits(pixels, ids, mask), itm, REL, "ITM logits")
    assert_close(ours(pixels, ids, mask, use_itm_head=True), itm, REL, "ITM forward")


@torch.no_grad()
def test_text_encoder_text_only_and_itc(pair):
    theirs, ours = pair("BlipForImageTextRetrieval")
    pixels, ids, mask = inputs(seed=1)
    ref = theirs.text_encoder(input_ids=ids, attention_mask=mask)
    states, _, _ = ours.text_encoder(ids, mask)
    keep = mask.bool()
    assert_close(states[keep], ref.last_hidden_state[keep], REL, "text encoder (text-only) states")
    sim = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    assert_close(ours(pixels, ids, mask, use_itm_head=False), sim, REL, "ITC similarity")
    feats = ours.image_feat(pixels)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3)), "image_feat must be L2-normalized"
    ref_feat = torch.nn.functional.normalize(
        theirs.vision_proj(theirs.vision_model(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
    assert_close(feats, ref_feat, REL, "ITC image features")


@torch.no_grad()
def test_blip_model_features(pair):
    theirs, ours = pair("BlipModel")
    pixels, ids, mask = inputs(seed=2)

    def tensor(x):  # transformers 5 returns an output object with the projection as pooler_output
        return x.pooler_output if hasattr(x, "pooler_output") else x

    assert_close(ours.get_image_features(pixels), tensor(theirs.get_image_features(pixel_values=pixels)),
                 REL, "get_image_features")
    assert_close(ours.get_text_features(ids, mask),
                 tensor(theirs.get_text_features(input_ids=ids, attention_mask=mask)), REL, "get_text_features")


@torch.no_grad()
def test_decoder_logits_with_and_without_past(pair):
    theirs, ours = pair("BlipForConditionalGeneration")
    pixels, ids, mask = inputs(seed=3)
    ref = theirs(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    logits = ours(pixels, ids, mask)
    keep = mask.bool()
    assert_close(logits[keep], ref[keep], REL, "caption decoder logits (full sequence)")

    # Incremental: a prefix, then one token at a time with the KV cache and cross K/V computed once.
    image_embeds, _ = ours.vision_model(pixels)
    decoder = ours.text_decoder
    cross = decoder.bert.cross_key_values(image_embeds)
    split = 3
    step_logits, past = decoder(ids[:, :split], mask[:, :split], cross_key_values=cross)
    collected = [step_logits]
    for t in range(split, ids.shape[1]):
        step_logits, past = decoder(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=past, cross_key_values=cross)
        collected.append(step_logits)
    assert past[0][0].shape == (3, 4, ids.shape[1], 8)
    incremental = torch.cat(collected, dim=1)
    assert_close(incremental[keep], ref[keep], REL, "caption decoder logits (KV cache)")


@torch.no_grad()
def test_vqa_answer_logits(pair):
    """The answer decoder attends to the question states under the question's padding mask.

    transformers 5.x drops that mask inside BlipTextSelfAttention (it reads `encoder_attention_mask`,
    which BlipTextAttention never passes), so a padded question changes its own answer there. We keep
    the mask, as BLIP was trained; the oracle is transformers run on each question without padding,
    where the mask is moot, and it must equal our padded batch row for row.
    """
    theirs, ours = pair("BlipForQuestionAnswering")
    pixels, ids, mask = inputs(seed=4)
    _, answers, answer_mask = inputs(seed=5, seq=5)
    answers[:, 0] = 97  # answers start from [DEC]
    logits = ours(pixels, ids, answers, mask, answer_mask)
    states = ours.encode_question(pixels, ids, mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        ref = theirs(input_ids=ids[i : i + 1, :n], pixel_values=pixels[i : i + 1],
                     decoder_input_ids=answers[i : i + 1], decoder_attention_mask=answer_mask[i : i + 1])
        # transformers' forward returns no logits without labels: recompute them from its own modules.
        q = theirs.text_encoder(input_ids=ids[i : i + 1, :n], encoder_hidden_states=ref.image_embeds)
        ref_logits = theirs.text_decoder(input_ids=answers[i : i + 1], attention_mask=answer_mask[i : i + 1],
                                         encoder_hidden_states=q.last_hidden_state).logits
        keep = answer_mask[i].bool()
        assert_close(states[i, :n], q.last_hidden_state[0], REL, f"VQA question states, row {i} ({n} tokens)")
        assert_close(logits[i, keep], ref_logits[0, keep], REL, f"VQA answer logits, row {i}")


@pytest.mark.slow
@torch.no_grad()
def test_blip_base_size_caption(tmp_path):
    """What only full size shows: 577 image tokens, the 30524-token vocabulary, 12 layers."""
    folder = tmp_path / "base"
    theirs = make_checkpoint("BlipForConditionalGeneration", folder, hf_config(BASE_VISION, BASE_TEXT), seed=7)
    ours, config = load_model(folder)
    assert config.vision.num_positions == 577 and config.text.vocab_size == 30524
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384, generator=g)
    ids = torch.tensor([[30522, 1037, 3861, 1997, 1037, 4937]])
    ref = theirs(pixel_values=pixels, input_ids=ids)
    embeds, _ = ours.vision_model(pixels)
    assert embeds.shape == (1, 577, 768)
    assert_close(embeds, ref.image_embeds, REL, "base vision embeddings")
    assert_close(ours(pixels, ids), ref.logits, REL, "base decoder logits")
