"""BLIP's graphs: its model dimensions (Dims, the manifest's "dims"), the I/O table of each task's
graphs and the bounds of their symbolic axes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...graphs import BATCH, ENC, PAST, ROLE_GEMV, ROLE_LOOP, TEXT, GraphSpec, Limits, TensorSpec, kv_names

ROWS, TOTAL = "rows", "total"  # decoder rows (batch x beams); past + new tokens


@dataclass(frozen=True)
class Dims:
    """Model dimensions the graphs depend on (stored in the manifest and in ONNX metadata)."""

    image_size: int
    num_image_tokens: int
    vision_hidden: int
    text_hidden: int
    num_layers: int  # text layers
    num_heads: int  # text heads
    head_dim: int
    vocab_size: int
    itc_dim: int  # size of the ITC features (0 when the checkpoint has no ITC head)
    max_position_embeddings: int = 0  # text position table size: prompt + new tokens fit in it (0: not recorded)

    def to_dict(self) -> dict:
        return asdict(self)


def cross_specs(rows, heads: int, head_dim: int, layers: int, keys_transposed: bool = True) -> list[TensorSpec]:
    """cross_key.i [rows, H, Dh, enc] (transposed; [rows, H, enc, Dh] with keys_transposed=False) and
    cross_value.i [rows, H, enc, Dh], layer by layer."""
    key = (rows, heads, head_dim, ENC) if keys_transposed else (rows, heads, ENC, head_dim)
    return [TensorSpec(n, "float32", key if n.startswith("cross_key") else (rows, heads, ENC, head_dim))
            for n in kv_names("cross", layers)]


def cross_keys_transposed(spec: GraphSpec) -> bool:
    """Whether `spec` (cross_kv or decoder_step) carries the cross-attention keys as [.., Dh, enc]."""
    key = next(t for t in (*spec.inputs, *spec.outputs) if t.name == "cross_key.0")
    return key.shape[-1] == ENC


def graphs(dims: Dims, tasks: set[str], keys_transposed: bool = True) -> dict[str, GraphSpec]:
    """The graphs a BLIP checkpoint needs for `tasks` (subset of caption, vqa, itm, itc).
    keys_transposed=False: cross-attention keys in the [.., enc, Dh] layout of ONNX Runtime's
    MultiHeadAttention (the ONNX Runtime forms, exported with modeling.common.ort_attention)."""
    f32, i64 = "float32", "int64"
    H, Dh, L = dims.num_heads, dims.head_dim, dims.num_layers
    graphs: dict[str, GraphSpec] = {}
    vision_out = [TensorSpec("image_embeds", f32, (BATCH, dims.num_image_tokens, dims.vision_hidden))]
    if "itc" in tasks:
        vision_out.append(TensorSpec("image_feat", f32, (BATCH, dims.itc_dim)))
    graphs["vision"] = GraphSpec(
        "vision",
        (TensorSpec("pixel_values", f32, (BATCH, 3, dims.image_size, dims.image_size)),),
        tuple(vision_out),
        "ViT over the preprocessed image; image_feat is the L2-normalized ITC projection of [CLS].",
    )
    text_in = (TensorSpec("input_ids", i64, (BATCH, TEXT), high=dims.vocab_size), TensorSpec("attention_mask", i64, (BATCH, TEXT)))
    image_in = (TensorSpec("image_embeds", f32, (BATCH, dims.num_image_tokens, dims.vision_hidden)),)
    if "vqa" in tasks:
        graphs["text_encoder"] = GraphSpec(
            "text_encoder", text_in + image_in,
            (TensorSpec("question_states", f32, (BATCH, TEXT, dims.text_hidden)),),
            "Text encoder in multimodal mode (cross-attention to the image): the VQA question states.",
        )
    if "itm" in tasks:
        graphs["itm"] = GraphSpec(
            "itm", text_in + image_in, (TensorSpec("itm_logits", f32, (BATCH, 2)),),
            "Text encoder in multimodal mode (cross-attention to the image), then the ITM head on [CLS]: "
            "logits of (no match, match).",
        )
    if "itc" in tasks:
        graphs["text_features"] = GraphSpec(
            "text_features", text_in, (TensorSpec("text_feat", f32, (BATCH, dims.itc_dim)),),
            "Text encoder in text-only mode: the L2-normalized ITC projection of [CLS].",
        )
    if "caption" in tasks or "vqa" in tasks:
        enc_width = dims.text_hidden if "vqa" in tasks else dims.vision_hidden
        cross = cross_specs(BATCH, H, Dh, L, keys_transposed)
        graphs["cross_kv"] = GraphSpec(
            "cross_kv",
            (TensorSpec("encoder_states", f32, (BATCH, ENC, enc_width)),),
            tuple(cross),
            "Per-layer cross-attention K/V of the decoder over the image (caption) or question (VQA) states; "
            "computed once per request. Keys come transposed ([.., Dh, enc]) so each decoding step's "
            "scores are a plain matmul, not a transposed-operand one"
            + ("." if keys_transposed else " (here not: [.., enc, Dh], MultiHeadAttention's layout)."),
        )
        rows = "rows"  # batch x beams
        graphs["decoder_step"] = GraphSpec(
            "decoder_step",
            (
                TensorSpec("input_ids", i64, (rows, TEXT), high=dims.vocab_size),
                TensorSpec("attention_mask", i64, (rows, "total")),
                TensorSpec("position_ids", i64, (rows, TEXT)),
                TensorSpec("encoder_attention_mask", i64, (rows, ENC)),
                TensorSpec("beam_idx", i64, (rows,)),
                *[TensorSpec(n, f32, (rows, H, PAST, Dh)) for n in kv_names("past", L)],
                *cross_specs(rows, H, Dh, L, keys_transposed),
            ),
            (
                TensorSpec("logits", f32, (rows, dims.vocab_size)),
                *[TensorSpec(n, f32, (rows, H, "total", Dh)) for n in kv_names("present", L)],
            ),
            "One decoding step: the new tokens attend to the past (gathered by beam_idx) and to the cross "
            "K/V; returns the logits of the last position and the grown cache. attention_mask covers past "
            "and new tokens (total = past + text).",
            roles=(ROLE_LOOP, ROLE_GEMV),
        )
    return graphs


def dims_from_dict(data: dict) -> Dims:
    """The manifest's "dims" (a newer exporter may record more keys: ignored)."""
    known = {f.name for f in fields(Dims)}
    return Dims(**{k: v for k, v in data.items() if k in known})


def axes(dims: Dims, limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis of BLIP's graphs for `limits`."""
    rows = limits.max_batch * limits.num_beams  # decoder rows: batch x beams
    past = (0, min(16, limits.max_text_len + limits.max_new_tokens), limits.max_text_len + limits.max_new_tokens)
    text = (1, min(8, limits.max_text_len), limits.max_text_len)
    n = dims.num_image_tokens
    return {
        BATCH: (1, limits.opt_batch, limits.max_batch),
        TEXT: text,
        PAST: past,
        ENC: (1, n, max(n, limits.max_text_len)),
        ROWS: (1, limits.opt_batch, rows),
        TOTAL: tuple(a + b for a, b in zip(past, text)),
    }
