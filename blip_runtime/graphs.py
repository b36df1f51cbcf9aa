"""The I/O table of every exported graph, declared once.

The exporter (dynamic axes, ONNX names), the TensorRT optimization profiles, the runtime's input
checks and the tests all read this table. It is pure data (no torch), so it lives in the runtime
and the exporter imports it. Axis entries are either an int (fixed by the model) or the name of a
symbolic axis whose TensorRT min/opt/max come from `Limits`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Symbolic axes. "past" is the number of cached tokens (0 on the first decoding step).
BATCH, TEXT, PAST, ENC = "batch", "text", "past", "enc"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple  # ints and axis names

    def check(self, graph: str, value: np.ndarray, bound: dict) -> None:
        """Raise ValueError if `value` does not fit; record axis sizes in `bound` so that every
        use of one axis name within a call agrees."""
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{graph}: input {self.name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(self.dtype):
            raise ValueError(f"{graph}: input {self.name!r} has dtype {value.dtype}, expected {self.dtype}")
        if value.ndim != len(self.shape):
            raise ValueError(f"{graph}: input {self.name!r} has shape {value.shape}, expected {self.shape}")
        for size, axis in zip(value.shape, self.shape):
            if isinstance(axis, int):
                if size != axis:
                    raise ValueError(f"{graph}: input {self.name!r} has shape {value.shape}, expected {self.shape}")
            elif bound.setdefault(axis, size) != size:
                raise ValueError(
                    f"{graph}: input {self.name!r} has {axis}={size}, but another input has {axis}={bound[axis]}"
                )


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: axis name}} for torch.onnx.export."""
        return {
            t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in (*self.inputs, *self.outputs)
        }

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        names = {t.name for t in self.inputs}
        missing = names - feeds.keys()
        extra = feeds.keys() - names
        if missing or extra:
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}, unexpected inputs {sorted(extra)}")
        bound: dict[str, int] = {}
        for spec in self.inputs:
            spec.check(self.name, feeds[spec.name], bound)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "GraphSpec":
        tensors = lambda items: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)  # noqa: E731
        return GraphSpec(d["name"], tensors(d["inputs"]), tensors(d["outputs"]), d.get("doc", ""))


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


@dataclass(frozen=True)
class Limits:
    """Bounds of the symbolic axes, for TensorRT profiles: (min, opt, max) each."""

    max_batch: int = 8
    max_text_len: int = 40  # prompt / question / text tokens
    max_new_tokens: int = 30
    num_beams: int = 3
    opt_batch: int = 1

    def axis(self, name: str, num_image_tokens: int) -> tuple[int, int, int]:
        rows = self.max_batch * self.num_beams  # decoder rows: batch x beams
        table = {
            BATCH: (1, self.opt_batch, self.max_batch),
            TEXT: (1, min(8, self.max_text_len), self.max_text_len),
            PAST: (0, min(16, self.max_text_len + self.max_new_tokens), self.max_text_len + self.max_new_tokens),
            ENC: (1, num_image_tokens, max(num_image_tokens, self.max_text_len)),
            "rows": (1, self.opt_batch, rows),
        }
        return table[name]


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """Cache tensor names, optimum style: `past_key.0`, `past_value.0`, ..."""
    return [f"{prefix}_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


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


def blip_graphs(dims: Dims, tasks: set[str], architecture: str, keys_transposed: bool = True) -> dict[str, GraphSpec]:
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
    text_in = (TensorSpec("input_ids", i64, (BATCH, TEXT)), TensorSpec("attention_mask", i64, (BATCH, TEXT)))
    if "vqa" in tasks or "itm" in tasks:
        out = TensorSpec("itm_logits", f32, (BATCH, 2)) if "itm" in tasks else TensorSpec(
            "question_states", f32, (BATCH, TEXT, dims.text_hidden))
        graphs["text_encoder"] = GraphSpec(
            "text_encoder",
            text_in + (TensorSpec("image_embeds", f32, (BATCH, dims.num_image_tokens, dims.vision_hidden)),),
            (out,),
            "Text encoder in multimodal mode (cross-attention to the image): ITM logits or VQA question states.",
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
                TensorSpec("input_ids", i64, (rows, TEXT)),
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
        )
    return graphs


def profile_shapes(spec: GraphSpec, dims: Dims, limits: Limits) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT optimization profile for `spec`: {input: (min shape, opt shape, max shape)}."""
    def size(axis, which):
        if isinstance(axis, int):
            return axis
        if axis == "total":  # past + text
            return tuple(a + b for a, b in zip(limits.axis(PAST, dims.num_image_tokens), limits.axis(TEXT, dims.num_image_tokens)))[which]
        return limits.axis(axis, dims.num_image_tokens)[which]

    return {
        t.name: tuple(tuple(size(a, w) for a in t.shape) for w in range(3)) for t in spec.inputs
    }


def random_feeds(spec: GraphSpec, dims: Dims, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs for `spec` at the given axis sizes (batch, text, past, enc; rows defaults
    to batch): used to trace the exporter and to verify graphs at several dynamic sizes."""
    rng = np.random.default_rng(seed)
    sizes = {"rows": sizes.get(BATCH, 1), **sizes}
    sizes["total"] = sizes.get(PAST, 0) + sizes.get(TEXT, 1)
    feeds = {}
    for t in spec.inputs:
        shape = tuple(a if isinstance(a, int) else sizes[a] for a in t.shape)
        if t.name in ("input_ids",):
            feeds[t.name] = rng.integers(1, dims.vocab_size, shape, dtype=np.int64)
        elif t.name == "position_ids":
            start = sizes.get(PAST, 0)
            feeds[t.name] = np.broadcast_to(np.arange(start, start + shape[1], dtype=np.int64), shape).copy()
        elif t.name == "beam_idx":
            feeds[t.name] = rng.permutation(shape[0]).astype(np.int64)
        elif t.dtype == "int64":  # masks: right padding of r positions on row r, keeping one real token
            mask = np.ones(shape, np.int64)
            for r in range(1, shape[0]):
                mask[r, shape[1] - min(r, shape[1] - 1) :] = 0
            feeds[t.name] = mask
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds
