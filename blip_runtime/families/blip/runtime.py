"""BLIP's task API: captioning, VQA, image-text matching and retrieval features.

transformers' own batched generate lets padding leak into results (a shorter caption prompt keeps
its [SEP] and restarts position ids after the pads; VQA answers attend to the question's pad
states); we mask padding and count positions per row instead, so results never depend on what
else is in the batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...decoding import generate_scored
from ...manifest import BundleError, Manifest
from ...options import GenerationOptions
from ...runtime import BlipRuntime, _as_list, _check_return_scores, _texts, match_probability
from ...session import Session
from .text import check_bert_specials, prompt_rows


class DecoderInference:
    """The decoding loop's view of the `decoder_step` graph: keeps the KV cache, the cross K/V and
    the encoder mask per row, and turns beam reordering into the graph's `beam_idx` input."""

    def __init__(self, session: Session, manifest: Manifest, cross: dict[str, np.ndarray], encoder_mask: np.ndarray):
        self.session = session
        self.dims = manifest.dims
        self.cross = cross  # cross_key.i [R, H, Dh, N] (transposed; [R, H, N, Dh] in ONNX Runtime forms), cross_value.i [R, H, N, Dh]
        self.encoder_mask = encoder_mask  # [R, N]
        self.request = np.arange(encoder_mask.shape[0])  # which request each row serves
        self.past: dict[str, np.ndarray] | None = None
        self.beam_idx: np.ndarray | None = None

    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows, new = tokens.shape
        d = self.dims
        if self.past is None:
            empty = np.zeros((rows, d.num_heads, 0, d.head_dim), np.float32)
            self.past = {f"past_{k}.{i}": empty for i in range(d.num_layers) for k in ("key", "value")}
        # Position of each token = number of real tokens before it in its row, so padding in a
        # batch changes nothing.
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -new:]
        feeds = {
            "input_ids": tokens.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": positions.astype(np.int64),
            "encoder_attention_mask": self.encoder_mask,
            "beam_idx": self.beam_idx if self.beam_idx is not None else np.arange(rows, dtype=np.int64),
            **self.past,
            **self.cross,
        }
        out = self.session.run("decoder_step", feeds, keep=("present_*",))
        self.beam_idx = None
        self.past = {name.replace("present_", "past_"): v for name, v in out.items() if name.startswith("present_")}
        return out["logits"]

    def rearrange(self, source_indices: np.ndarray) -> None:
        source = np.asarray(source_indices, dtype=np.int64)
        moved = self.request[source]
        if len(source) != len(self.request) or not np.array_equal(moved, self.request):
            # Rows change request (the expansion to beams before the first step): gather the
            # per-request state. Reordering beams within a request leaves it as it is.
            self.cross = {k: v[source] for k, v in self.cross.items()}
            self.encoder_mask = self.encoder_mask[source]
            self.request = moved
        if self.past is not None:
            if self.beam_idx is not None:
                source = self.beam_idx[source]
            if len(source) == next(iter(self.past.values())).shape[0]:
                self.beam_idx = source  # gathered inside the graph on the next step
            else:
                self.past = {k: v[source] for k, v in self.past.items()}


class BlipFamilyRuntime(BlipRuntime):
    """A BLIP bundle's runtime (what BlipRuntime.load returns for family "blip")."""

    def __init__(self, manifest: Manifest, session: Session):
        super().__init__(manifest, session)
        self.dims = manifest.dims
        try:
            check_bert_specials(self.tokenizer)
        except ValueError as e:
            raise BundleError(f"{manifest.folder / manifest.data['tokenizer']['file']}: {e}") from None

    def eos_token_default(self) -> int:
        return self.special["sep_token_id"]  # BLIP stops at [SEP]

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size

    @property
    def max_positions(self) -> int | None:
        """Positions the text decoder's table has (dims.max_position_embeddings, else the tokenizer's
        model_max_length), None if unknown."""
        if self.dims.max_position_embeddings > 0:
            return self.dims.max_position_embeddings
        # bundles that do not record it: the tokenizer's model_max_length, which the exporter caps at it
        limit = self.manifest.data["tokenizer"].get("model_max_length")
        return limit if isinstance(limit, int) and limit > 0 else None

    def vision(self, images) -> dict[str, np.ndarray]:
        return self.session.run("vision", {"pixel_values": self.pixels(images)})

    def _check_positions(self, longest: int, options: GenerationOptions) -> None:
        """Refuse a request whose tokens would run past the decoder's position table (ONNX Runtime
        would fail inside a Gather). The last generated token is never fed back, so a prompt of P
        tokens (with [DEC]) and N new tokens use positions 0 .. P + N - 2."""
        limit = self.max_positions
        if limit is None or longest + options.max_new_tokens - 1 <= limit:
            return
        fits = limit + 1 - longest
        what = f"a prompt of {longest} tokens ([DEC] included)" if longest > 1 else "[DEC]"
        raise ValueError(
            f"{what} plus max_new_tokens={options.max_new_tokens} needs "
            f"{longest + options.max_new_tokens - 1} positions; the model has {limit} "
            f"(max_position_embeddings): give max_new_tokens <= {fits}"
            + (" or a shorter prompt" if longest > 1 else "")
        )

    def _decode(self, encoder_states, encoder_mask, prompt_ids, prompt_mask, options) -> tuple[list, np.ndarray]:
        """(generated ids per row, request-major; their scores float32 [rows], see Generated.score)"""
        cross = self.session.run("cross_kv", {"encoder_states": encoder_states}, keep=("cross_*",))
        inference = DecoderInference(self.session, self.manifest, cross, encoder_mask.astype(np.int64))
        return generate_scored(inference, prompt_ids, prompt_mask, options)

    # -- tasks ------------------------------------------------------------------------------
    def caption(self, images, prompt: str | Sequence[str] | None = None, *, return_scores: bool = False,
                **generation) -> list:
        """Captions, one per image; with a prompt, the caption continues it (and includes it, as
        transformers' decode of the generated sequence does). With num_return_sequences=n > 1: one
        list of n captions per image, best first. return_scores=True: a Generated (text, tokens,
        score) in place of each caption."""
        tokens = self.caption_tokens(images, prompt, return_scores=return_scores, **generation)
        return tokens if return_scores else self._decode_text(tokens, self._sequences(generation))

    def caption_tokens(self, images, prompt: str | Sequence[str] | None = None, *, return_scores: bool = False,
                       **generation) -> list:
        """Token ids per image: [DEC], the prompt's tokens, the generated tokens (with [SEP] if reached);
        with num_return_sequences=n > 1, one list of n such sequences per image. return_scores=True:
        a Generated in place of each sequence."""
        _check_return_scores(return_scores)
        self._need("caption")
        images = _as_list(images)
        bos = self.special["bos_token_id"]
        if prompt is None:
            rows = [[bos] for _ in images]
        else:
            # As transformers: the prompt's [CLS] becomes [DEC] and its [SEP] is dropped (per row).
            rows = prompt_rows(self.tokenizer, _texts(prompt, "prompt", len(images)), bos)
        prompt_ids, prompt_mask = self._pad(rows)
        options = self.options(prompt_ids.shape[1], generation)
        self._check_positions(prompt_ids.shape[1], options)
        embeds = self.vision(images)["image_embeds"]
        enc_mask = np.ones(embeds.shape[:2], np.int64)
        generated, scores = self._decode(embeds, enc_mask, prompt_ids, prompt_mask, options)
        n = options.num_return_sequences
        return self._results([rows[i // n] + g for i, g in enumerate(generated)], scores, n, return_scores)

    def answer(self, images, questions: str | Sequence[str], *, return_scores: bool = False, **generation) -> list:
        """Answers, one per image/question pair; with num_return_sequences=n > 1, one list of n
        answers per pair, best first. return_scores=True: a Generated in place of each answer."""
        tokens = self.answer_tokens(images, questions, return_scores=return_scores, **generation)
        return tokens if return_scores else self._decode_text(tokens, self._sequences(generation))

    def answer_tokens(self, images, questions: str | Sequence[str], *, return_scores: bool = False,
                      **generation) -> list:
        """Token ids per pair: [DEC] and the generated answer (with [SEP] if reached); with
        num_return_sequences=n > 1, one list of n such sequences per pair. return_scores=True: a
        Generated in place of each sequence."""
        _check_return_scores(return_scores)
        self._need("vqa")
        images = _as_list(images)
        questions = _texts(questions, "questions", len(images))
        bos = np.full((len(images), 1), self.special["bos_token_id"], np.int64)
        options = self.options(1, generation)
        self._check_positions(1, options)
        embeds = self.vision(images)["image_embeds"]
        ids, mask = self.tokenizer.encode(questions)
        states = self.session.run("text_encoder", {"input_ids": ids, "attention_mask": mask, "image_embeds": embeds})
        generated, scores = self._decode(states["question_states"], mask, bos, np.ones_like(bos), options)
        sequences = [[int(bos[0, 0])] + g for g in generated]
        return self._results(sequences, scores, options.num_return_sequences, return_scores)

    def match(self, images, texts: str | Sequence[str]) -> np.ndarray:
        """ITM: probability float32 [B] that image i matches text i."""
        self._need("itm")
        images = _as_list(images)
        embeds = self.vision(images)["image_embeds"]
        ids, mask = self.tokenizer.encode(_texts(texts, "texts", len(images)))
        logits = self.session.run("itm", {"input_ids": ids, "attention_mask": mask, "image_embeds": embeds})
        return match_probability(logits["itm_logits"])

    def image_features(self, images) -> np.ndarray:
        """ITC image features, L2-normalized: float32 [B, E]."""
        self._need("itc")
        return self.vision(images)["image_feat"]

    def text_features(self, texts: str | Sequence[str]) -> np.ndarray:
        """ITC text features, L2-normalized: float32 [T, E]."""
        self._need("itc")
        ids, mask = self.tokenizer.encode(_texts(texts, "texts"))
        return self.session.run("text_features", {"input_ids": ids, "attention_mask": mask})["text_feat"]

    @staticmethod
    def similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """Cosine similarity float32 [I, T] between normalized features; rank with argsort."""
        return image_features @ text_features.T
