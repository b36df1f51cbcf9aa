"""BLIP-2's I/O table: every exported graph's inputs and outputs, declared once (pure data, no torch).

The exporter (ONNX names, dynamic axes), the TensorRT profiles (`axes`), the runtime's input checks and
the tests read it. Shapes: B requests, R decoder rows (requests x beams), N image tokens, Q query tokens,
D_q the Q-Former width (768), D the LM width, V its vocabulary, E the ITC width, H/Dh the LM's heads and
head size, L its decoder layers.

Where the image goes into the LM: OPT's step graph (its prompt call) and T5's encoder take the prompt's
ids and the projected queries and place the queries at the ids equal to `image_token_id`, in the graph.
So the runtime never handles embeddings (no `embed` graph, no second copy of the token table: the step
graph holds it already, and on TensorRT the prompt's embeddings never leave the device).

OPT has one LM graph, `opt_step`, for the prompt (past 0, the queries given) and for every later step
(no queries): one copy of the LM's weights, where a prefill graph beside the step held a second one
(5.7 GB of the 14.3 GB an fp32 OPT-1.3b runtime held after load). A reduced-precision bundle may carry
`opt_prefill`, the same graph (same inputs) in a form for many rows, when the step's own form is one
for one row per beam (int8-cpu's 8-bit MatMulNBits, int4): the runtime then runs the prompt through
it (`prompt_call` tells the two kinds of call apart).

Checkpoints of the legacy convention (no `<image>` token; transformers concatenates the queries before the text) get
`image_token_id = V`, an id no token has: the runtime prepends Q of them (mask ones), which is the same
concatenation, and the graph maps the marker to a real row before its table lookup.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from blip_runtime.graphs import ROLE_GEMV, ROLE_LOOP, GraphSpec, TensorSpec, kv_names

# Symbolic axes.
BATCH = "batch"  # requests (images)
ROWS = "rows"  # decoder rows: requests x beams (or samples)
TEXT = "text"  # Q-Former text tokens (retrieval)
PROMPT = "prompt"  # LM prompt tokens, image tokens included; T5's encoder length
NEW = "new"  # tokens one decoding step feeds (1 in the loop)
PAST = "past"  # cached decoder tokens
TOTAL = "total"  # past + new
PREFIX = "prefix"  # the queries opt_step places: Q in the prompt's call, 0 in later steps

# generate: captions, answers, instructions through the LM; features: Blip2Model's get_*_features
TASKS = ("generate", "features", "itm", "itc")
LMS = ("opt", "t5")
F32, I64 = "float32", "int64"


@dataclass(frozen=True)
class Blip2Dims:
    """What the graphs' shapes depend on (stored in the manifest; `from_dict` reads it back)."""

    image_size: int
    num_image_tokens: int  # N: (image_size / patch)^2 + 1, 257 at 224 px, 677 at 364
    vision_hidden: int  # D_v (1408 for ViT-g)
    num_query_tokens: int  # Q (32)
    qformer_hidden: int  # D_q (768)
    qformer_vocab_size: int  # the Q-Former's BERT vocabulary (retrieval text ids)
    itc_dim: int = 0  # E: image_text_hidden_size (0: no ITC head)
    lm: str = ""  # "opt" | "t5" | "" (retrieval: no language model)
    lm_hidden: int = 0  # D: the projected queries' and the token embeddings' width
    lm_layers: int = 0  # decoder layers (the K/V lists)
    lm_heads: int = 0
    lm_head_dim: int = 0
    vocab_size: int = 0  # V
    image_token_id: int = 0  # the id the queries replace: image_token_index, or V for the legacy convention
    max_position_embeddings: int = 0  # OPT's position table (prompt + new tokens fit in it); 0 for T5
    # The LM graphs' KV cache dtype: "float16" for an LM exported in fp16 end to end (the cache then
    # crosses the graph boundary at half the bytes); logits stay float32 (the LM casts them).
    lm_dtype: str = F32

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Blip2Dims":
        names = {f.name for f in fields(Blip2Dims)}
        unknown = sorted(d.keys() - names)
        if unknown:
            raise ValueError(f"Blip2Dims: unknown fields {unknown}, expected some of {sorted(names)}")
        return Blip2Dims(**d)

    @property
    def lm_id_high(self) -> int:
        """Bound of the LM's prompt ids: the vocabulary, plus the legacy marker id V."""
        return max(self.vocab_size, self.image_token_id + 1)


def _kv(prefix: str, rows: str, length: str, dims: Blip2Dims) -> list[TensorSpec]:
    """past_key.i / present_value.i ...: [rows, H, length, Dh] per decoder layer, in dims.lm_dtype."""
    shape = (rows, dims.lm_heads, length, dims.lm_head_dim)
    return [TensorSpec(n, dims.lm_dtype, shape) for n in kv_names(prefix, dims.lm_layers)]


def _cross(rows: str, dims: Blip2Dims) -> list[TensorSpec]:
    """cross_key.i [rows, H, Dh, prompt] (transposed: each step's scores are a plain MatMul) and
    cross_value.i [rows, H, prompt, Dh]."""
    H, Dh = dims.lm_heads, dims.lm_head_dim
    return [TensorSpec(n, dims.lm_dtype, (rows, H, Dh, PROMPT) if "_key." in n else (rows, H, PROMPT, Dh))
            for n in kv_names("cross", dims.lm_layers)]


def prompt_call(feeds: dict) -> bool:
    """Whether feeds of opt_step (or its twin) are a prompt's call: the queries given (image_prefix
    [rows, Q, D], Q > 0); later steps give none (and a bundle of the earlier layout no image_prefix)."""
    prefix = feeds.get("image_prefix")
    return prefix is not None and prefix.shape[1] > 0


def opt_step_spec(dims: Blip2Dims) -> GraphSpec:
    """OPT's one LM graph (see the module doc)."""
    D, V = dims.lm_hidden, dims.vocab_size
    return GraphSpec(
        "opt_step",
        (TensorSpec("input_ids", I64, (ROWS, NEW), dims.lm_id_high), TensorSpec("image_prefix", F32, (ROWS, PREFIX, D)),
         TensorSpec("attention_mask", I64, (ROWS, TOTAL)), TensorSpec("position_ids", I64, (ROWS, NEW)),
         TensorSpec("beam_idx", I64, (ROWS,)), *_kv("past", ROWS, PAST, dims)),
        (TensorSpec("logits", F32, (ROWS, V)), *_kv("present", ROWS, TOTAL, dims)),
        "OPT over new tokens behind a cache. The prompt's call: the whole prompt (past 0), the row's Q "
        "queries in image_prefix taking its Q image tokens (the i-th image token the i-th query), left "
        "padding (mask 0). Later steps: image_prefix [rows, 0, D], every id embedded as text (a generated "
        "image token too, as transformers does), the past rows gathered by beam_idx (row i continues old "
        "row beam_idx[i]). position_ids as transformers derives them (cumsum(mask) * mask - 1: -1 on pads, "
        "which are masked), below dims.max_position_embeddings. Returns the last position's logits and "
        "the grown cache (total = past + new).",
        roles=(ROLE_LOOP, ROLE_GEMV))


def graphs(dims: Blip2Dims, tasks) -> dict[str, GraphSpec]:
    """The graphs a BLIP-2 checkpoint needs for `tasks` (a subset of TASKS)."""
    tasks = set(tasks)
    if not tasks or tasks - set(TASKS):
        raise ValueError(f"tasks: expected a non-empty subset of {TASKS}, got {sorted(tasks)}")
    if tasks & {"generate", "features"} and dims.lm not in LMS:
        raise ValueError(f"tasks: 'generate' and 'features' need a language model (dims.lm one of {LMS}), "
                         f"got {dims.lm!r}")
    if "itc" in tasks and not dims.itc_dim:
        raise ValueError("tasks: 'itc' needs the ITC projections (dims.itc_dim > 0)")
    N, Q, Dq, D, V = dims.num_image_tokens, dims.num_query_tokens, dims.qformer_hidden, dims.lm_hidden, dims.vocab_size
    image_embeds = TensorSpec("image_embeds", F32, (BATCH, N, dims.vision_hidden))
    out: dict[str, GraphSpec] = {}
    pooled = (TensorSpec("pooled_output", F32, (BATCH, dims.vision_hidden)),) if "features" in tasks else ()
    out["vision"] = GraphSpec(
        "vision", (TensorSpec("pixel_values", F32, (BATCH, 3, dims.image_size, dims.image_size)),),
        (image_embeds, *pooled),
        "ViT-g over the preprocessed image: every token's last hidden state (and, for features, "
        "pooled_output: the class token normalized once more, as get_image_features returns it).")
    q_out = [TensorSpec("query_output", F32, (BATCH, Q, Dq))]
    if "generate" in tasks:
        q_out.append(TensorSpec("image_prefix", F32, (BATCH, Q, D)))
    if "itc" in tasks:
        q_out.append(TensorSpec("image_feat", F32, (BATCH, Q, dims.itc_dim)))
    out["qformer"] = GraphSpec(
        "qformer", (image_embeds,), tuple(q_out),
        "The Q-Former's learned queries cross-attending to the image: query_output; image_prefix, the "
        "language_projection of it (the LM's image tokens); image_feat, the per-query L2-normalized ITC "
        "projection. Kept in fp32 in every precision, as transformers keeps it (_keep_in_fp32_modules).")
    qtext = (TensorSpec("input_ids", I64, (BATCH, TEXT), dims.qformer_vocab_size),
             TensorSpec("attention_mask", I64, (BATCH, TEXT)))
    if "itm" in tasks:
        out["itm"] = GraphSpec(
            "itm", (image_embeds, *qtext), (TensorSpec("itm_logits", F32, (BATCH, 2)),),
            "Q-Former over [queries; text] cross-attending to the image; the 2-way head averaged over the "
            "query positions (index 1 = match). Text ids without image tokens. fp32, as the Q-Former.")
    if "itc" in tasks:
        out["text_features"] = GraphSpec(
            "text_features", qtext, (TensorSpec("text_feat", F32, (BATCH, dims.itc_dim)),),
            "Q-Former in text-only mode: the L2-normalized ITC projection of the first token. fp32.")
    if "features" in tasks:
        out["text_states"] = GraphSpec(
            "text_states",
            (TensorSpec("input_ids", I64, (BATCH, PROMPT), V), TensorSpec("attention_mask", I64, (BATCH, PROMPT))),
            (TensorSpec("text_states", F32, (BATCH, PROMPT, D)),),
            "get_text_features: the LM over text alone (no image), OPT's decoder last hidden state with "
            "positions from the mask, or T5's encoder output.")
    if "generate" not in tasks:
        return out
    if dims.lm == "opt":
        out["opt_step"] = opt_step_spec(dims)
        return out
    prompt_ids = TensorSpec("input_ids", I64, (BATCH, PROMPT), dims.lm_id_high)
    loop = (ROLE_LOOP, ROLE_GEMV)
    out["t5_encoder"] = GraphSpec(
        "t5_encoder",
        (prompt_ids, TensorSpec("image_prefix", F32, (BATCH, Q, D)),
         TensorSpec("attention_mask", I64, (BATCH, PROMPT))),
        (TensorSpec("encoder_states", F32, (BATCH, PROMPT, D)),),
        "T5's encoder over the prompt, the row's queries in place of its image tokens (Q per row).")
    out["t5_cross_kv"] = GraphSpec(
        "t5_cross_kv", (TensorSpec("encoder_states", F32, (BATCH, PROMPT, D)),), tuple(_cross(BATCH, dims)),
        "Per-decoder-layer cross-attention K/V over the encoder states, once per request. Keys come "
        "transposed ([.., Dh, prompt]) so each step's scores are a plain MatMul.")
    out["t5_step"] = GraphSpec(
        "t5_step",
        (TensorSpec("decoder_input_ids", I64, (ROWS, NEW), V),
         TensorSpec("encoder_attention_mask", I64, (ROWS, PROMPT)),
         TensorSpec("beam_idx", I64, (ROWS,)), *_kv("past", ROWS, PAST, dims), *_cross(ROWS, dims)),
        (TensorSpec("logits", F32, (ROWS, V)), *_kv("present", ROWS, TOTAL, dims)),
        "One decoder step: the self-attention past is gathered by beam_idx, the cross K/V are the rows' "
        "own (beams of one request share them); returns the last position's logits and the grown cache. "
        "The first step feeds decoder_start_token_id with past 0.", roles=loop)
    return out


def axes(dims: Blip2Dims, limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis, for TensorRT profiles. `limits`: blip_runtime.graphs.Limits
    (max_batch, max_text_len, max_new_tokens, num_beams, opt_batch)."""
    Q = dims.num_query_tokens
    text = (1, min(8, limits.max_text_len), limits.max_text_len)
    prompt = (1, Q + text[1], Q + limits.max_text_len)  # queries count as prompt tokens
    # OPT's cache holds the prompt too; T5's only the generated tokens. The last generated token is never
    # fed, so an OPT step's past is at most prompt + max_new_tokens - 2 (and the prompt alone, for the
    # first step), and its positions reach past + 1 <= max_position_embeddings (the runtime's own check).
    n = limits.max_new_tokens
    past_max = max(prompt[2], prompt[2] + n - 2) if dims.lm == "opt" else n
    # opt: the middle of a typical request's decoding (TensorRT tunes its kernels for this shape)
    past_opt = min(past_max, prompt[1] + n // 2) if dims.lm == "opt" else min(past_max, max(1, n // 2))
    past = (0, past_opt, past_max)
    new = (1, 1, limits.max_text_len)  # OPT's prompt call has a profile of its own (prompt_axes)
    if dims.lm == "opt" and dims.max_position_embeddings and past[2] + 1 > dims.max_position_embeddings:
        raise ValueError(f"limits: {Q} queries + max_text_len {limits.max_text_len} + max_new_tokens "
                         f"{limits.max_new_tokens} exceed OPT's {dims.max_position_embeddings} positions")
    return {
        BATCH: (1, limits.opt_batch, limits.max_batch),
        ROWS: (1, limits.opt_batch, limits.max_batch * limits.num_beams),
        TEXT: text,
        PROMPT: prompt,
        NEW: new,
        PAST: past,
        TOTAL: tuple(a + b for a, b in zip(past, new)),
        PREFIX: (0, 0, 0),  # the steps place no queries; the prompt call's profile takes Q
    }


def prompt_axes(dims: Blip2Dims, limits) -> dict[str, tuple[int, int, int]]:
    """opt_step's second TensorRT profile, for the prompt's call: the whole prompt as new tokens, the Q
    queries, an empty past. The first profile (`axes`) is tuned for the one-token steps and takes no
    queries, so each call fits exactly one of the two."""
    table = axes(dims, limits)
    Q, prompt = dims.num_query_tokens, table[PROMPT]
    return {**table, NEW: prompt, PAST: (0, 0, 0), TOTAL: prompt, PREFIX: (Q, Q, Q)}
