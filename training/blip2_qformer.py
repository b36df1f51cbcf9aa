"""The easy-VQA BLIP-2's image side: the shipped BLIP vision encoder as a Blip2VisionModel, and the
Q-Former's first training stage (BLIP-2's representation learning: ITC, ITM, image-grounded text
generation) with the BERT-style text side of Blip2ForImageTextRetrieval.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def vision_config(blip_folder: Path) -> dict:
    """Blip2VisionConfig fields of the BLIP vision encoder. layer_norm_eps is BLIP's (1e-5), not
    BLIP-2's default 1e-6, so the converted encoder's outputs equal BLIP's."""
    v = json.loads((blip_folder / "config.json").read_text())["vision_config"]
    return {"hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
            "image_size": v["image_size"], "patch_size": v["patch_size"], "layer_norm_eps": v["layer_norm_eps"],
            "hidden_act": v["hidden_act"], "qkv_bias": True}


def vision_state(blip_folder: Path, vision) -> dict[str, torch.Tensor]:
    """BLIP's vision_model.* weights under Blip2VisionModel's names, every key checked.

    BLIP-2's attention has query and value biases only (transformers 5 keeps them as one qkv.bias
    with zeros for the keys). BLIP's key bias can go: it adds q·b_k to every score of a query, the
    same for each key, and softmax ignores a constant shift."""
    blip = {k[len("vision_model."):]: t for k, t in load_file(blip_folder / "model.safetensors").items()
            if k.startswith("vision_model.")}
    out = {}
    for name, param in vision.state_dict().items():
        if name not in blip:
            raise KeyError(f"BLIP vision has no {name!r}")
        t = blip.pop(name).clone()
        if name.endswith("self_attn.qkv.bias"):
            D = t.shape[0] // 3
            t[D: 2 * D] = 0  # (3D,) = q | k | v: drop the key bias
        if t.shape != param.shape:
            raise ValueError(f"{name}: BLIP {tuple(t.shape)} vs BLIP-2 {tuple(param.shape)}")
        out[name] = t
    if blip:
        raise KeyError(f"BLIP vision keys left unused: {sorted(blip)}")
    return out


def check_vision(blip_folder: Path, vision, pixels: torch.Tensor) -> float:
    """Max abs difference of the converted encoder's last_hidden_state from BLIP's on pixels [B, 3, H, W]."""
    from transformers import BlipForConditionalGeneration

    blip = BlipForConditionalGeneration.from_pretrained(blip_folder).eval()
    with torch.no_grad():
        a = blip.vision_model(pixel_values=pixels).last_hidden_state
        b = vision(pixel_values=pixels).last_hidden_state
    return float((a - b).abs().max())


def qformer_states(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """Query outputs [B, N, H] of the Q-Former over image embeddings [B, P, D]."""
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state


def stage1_losses(model, temp, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, same: torch.Tensor,
                  same_kind: torch.Tensor, dec_id: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """BLIP-2 stage 1 on a Blip2ForImageTextRetrieval `model`.

    embeds: float [B, P, D] frozen image embeddings; ids/mask: int64 [B, S] "[CLS] caption [SEP]";
    same: bool [B, B], captions equal (ITC positives of each other); same_kind: bool [B, B], captions
    naming the same colour and shape (never ITM negatives: size and position are fuzzy labels, and
    as negatives they taught the head to answer "no match" always); dec_id: the [DEC] id that starts
    generated text. Returns the three losses and ITM accuracy."""
    B, N = embeds.shape[0], model.config.num_query_tokens
    out = {}
    q = qformer_states(model, embeds)  # (B, N, H)
    image_feat = F.normalize(model.vision_projection(q), dim=-1)  # (B, N, d)
    t = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                      attention_mask=mask).last_hidden_state  # (B, S, H)
    text_feat = F.normalize(model.text_projection(t[:, 0]), dim=-1)  # (B, d)
    # a pair's similarity is its best query's (BLIP-2; Blip2ForImageTextRetrieval scores the same way)
    sim = torch.einsum("ind,td->int", image_feat, text_feat).max(1).values / temp.clamp(0.001, 0.5)  # (B, B)
    targets = same.float() / same.float().sum(1, keepdim=True)
    out["itc"] = (torch.sum(-F.log_softmax(sim, 1) * targets, 1).mean()
                  + torch.sum(-F.log_softmax(sim.t(), 1) * targets, 1).mean()) / 2

    # ITM: one hard negative text per image and image per text, drawn by ITC similarity.
    with torch.no_grad():
        w_i2t = F.softmax(sim, 1).masked_fill(same_kind, 0) + 1e-9 * (~same_kind)
        w_t2i = F.softmax(sim.t(), 1).masked_fill(same_kind, 0) + 1e-9 * (~same_kind)
        neg_text = torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)  # (B,)
        neg_image = torch.multinomial(w_t2i, 1, generator=gen).squeeze(1)
    idx = torch.arange(B)
    text_rows, image_rows = torch.cat([idx, idx, neg_text]), torch.cat([idx, neg_image, idx])
    queries = model.query_tokens.expand(3 * B, -1, -1)
    joint_mask = torch.cat([torch.ones(3 * B, N, dtype=torch.long), mask[text_rows]], 1)  # (3B, N+S)
    h = model.qformer(query_embeds=model.embeddings(input_ids=ids[text_rows], query_embeds=queries), query_length=N,
                      attention_mask=joint_mask, encoder_hidden_states=embeds[image_rows]).last_hidden_state
    itm_logits = model.itm_head(h[:, :N]).mean(1)  # (3B, 2), as Blip2ForImageTextRetrieval
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    out["itm"] = F.cross_entropy(itm_logits, labels)
    out["itm_acc"] = (itm_logits.argmax(-1) == labels).float().mean()

    # Image-grounded generation: "[DEC] caption" causal over the text, every text token sees all
    # queries, queries see only queries (BLIP-2's multimodal causal mask), so the caption must pass
    # through the queries. The LM head is the word embeddings (training only, not shipped).
    dec = ids.clone()
    dec[:, 0] = dec_id
    S = ids.shape[1]
    allowed = torch.zeros(B, 1, N + S, N + S, dtype=torch.bool)
    allowed[:, :, :, :N] = True
    allowed[:, :, N:, N:] = torch.tril(torch.ones(S, S, dtype=torch.bool)) & mask.bool()[:, None, None, :]
    g = model.qformer(query_embeds=model.embeddings(input_ids=dec, query_embeds=model.query_tokens.expand(B, -1, -1)),
                      query_length=N, attention_mask=allowed, encoder_hidden_states=embeds).last_hidden_state
    logits = g[:, N:-1] @ model.embeddings.word_embeddings.weight.t()  # (B, S-1, V)
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    out["itg"] = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    return out
