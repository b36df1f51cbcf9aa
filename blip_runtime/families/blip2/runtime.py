"""BLIP-2's task API: captions and VQA through OPT or Flan-T5, ITM, ITC features and retrieval.

Each request gets what transformers' `processor.batch_decode(model.generate(**processor(images=image,
text=prompt)), skip_special_tokens=True)` gives for it alone. Prompts are tokenized one by one and
left-padded as whole rows (pads before the image tokens; the graphs place the queries wherever the
image tokens are): positions count real tokens only, so padding changes nothing. Legacy checkpoints
(no `<image>` token) get Q marker ids (dims.image_token_id = V) in front of the text, which is the
concatenation transformers 4.x made.

No prompt: transformers' generate(pixel_values) starts OPT from the image tokens and the LM's bos;
Flan-T5 (whose config has no bos) from the processor's encoding of "" (the image tokens and `</s>`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import numpy as np

from ...decoding import generate_scored
from ...manifest import BundleError, Manifest
from ...options import GenerationOptions
from ...runtime import BlipRuntime, _as_list, _check_return_scores, _texts, match_probability
from ...session import Session
from .inference import OptInference, T5Inference
from .processor import Blip2TextProcessor
from .text_settings import Blip2TextSettings

_SETTINGS = {f.name for f in fields(Blip2TextSettings)}


class Blip2FamilyRuntime(BlipRuntime):
    """A BLIP-2 bundle's runtime (what BlipRuntime.load returns for family "blip-2")."""

    # blip-run's commands -> this family's bundle tasks
    COMMAND_TASKS = {"caption": "generate", "vqa": "generate", "itm": "itm", "embed": "itc"}

    def __init__(self, manifest: Manifest, session: Session):
        super().__init__(manifest, session)  # self.tokenizer: plain tokenizer.json (the Q-Former's BERT texts)
        self.dims = manifest.dims
        self.text: Blip2TextProcessor | None = None
        if self.dims.lm:
            tok = manifest.data["tokenizer"]
            path = manifest.folder / tok["file"]
            try:
                settings = Blip2TextSettings.from_dict({k: v for k, v in tok.items() if k in _SETTINGS})
                self.text = Blip2TextProcessor.from_file(path, settings)
            except (TypeError, ValueError) as e:
                raise BundleError(f"{manifest.folder / 'manifest.json'}: 'tokenizer': {e}") from None
            want = self.dims.image_token_id if settings.image_tokens else None
            if settings.image_token_index != want:
                raise BundleError(f"{path}: image_token_index {settings.image_token_index} differs from the graphs' "
                                  f"{self.dims.image_token_id}; re-export the bundle")

    # -- options ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size if self.dims.lm else self.dims.qformer_vocab_size

    def options(self, prompt_len: int, overrides: dict) -> GenerationOptions:
        """As BlipRuntime.options, with transformers 5's default length: a bundle whose generation entry
        sets neither max_new_tokens nor max_length (generation_config.json set none) generates 20 new
        tokens, the whole sequence capped at OPT's position table."""
        defaults = self.manifest.data["generation"]
        if not {"max_new_tokens", "max_length"} & (defaults.keys() | overrides.keys()):
            new, limit = 20, self.dims.max_position_embeddings
            if self.dims.lm == "opt" and limit:
                new = max(1, min(new, limit - prompt_len))
            overrides = {**overrides, "max_new_tokens": new}
        return super().options(prompt_len, overrides)

    def _decode_text(self, groups, n: int):
        decode = self.text.batch_decode if self.text is not None else self.tokenizer.batch_decode
        return decode(groups) if n == 1 else [decode(g) for g in groups]

    def _check_positions(self, longest: int, options: GenerationOptions) -> None:
        """OPT: refuse a prompt (image tokens included) whose tokens and max_new_tokens would run past the
        position table (the last generated token is never fed back: positions 0 .. P + N - 2)."""
        limit = self.dims.max_position_embeddings
        if self.dims.lm != "opt" or not limit or longest + options.max_new_tokens - 1 <= limit:
            return
        raise ValueError(
            f"a prompt of {longest} tokens ({self.dims.num_query_tokens} image tokens included) plus "
            f"max_new_tokens={options.max_new_tokens} needs {longest + options.max_new_tokens - 1} positions; the "
            f"model has {limit} (max_position_embeddings): give max_new_tokens <= {limit + 1 - longest} or a "
            "shorter prompt")

    # -- stages -----------------------------------------------------------------------------
    def vision(self, images) -> dict[str, np.ndarray]:
        """{"image_embeds": float32 [B, N, Dv], ("pooled_output" [B, Dv] in feature bundles)}"""
        return self.session.run("vision", {"pixel_values": self.pixels(images)})

    def qformer(self, images) -> dict[str, np.ndarray]:
        """{"query_output": [B, Q, 768], "image_prefix": [B, Q, D] (generation), "image_feat": [B, Q, E] (ITC)}"""
        return self.session.run("qformer", {"image_embeds": self.vision(images)["image_embeds"]})

    def _rows(self, texts: list[str] | None, n: int) -> list[list[int]]:
        """Per request: the LM prompt as ids (image tokens or legacy markers first), unpadded."""
        d, t = self.dims, self.text
        if texts is None and d.lm == "opt":
            text_rows = [[self.special["bos_token_id"]]] * n
        else:
            text_rows = [t.encode([s], image_tokens=False)[0][0].tolist() for s in (texts or [""] * n)]
        return [[d.image_token_id] * d.num_query_tokens + r for r in text_rows]

    def _generate(self, images, texts: list[str] | None,
                  generation: dict) -> tuple[list, list[list[int]], int, np.ndarray]:
        """(generated ids per row, request-major; the prompt rows; num_return_sequences; the rows' scores
        float32 [rows], see Generated.score)."""
        self._need("generate")
        images = _as_list(images)
        rows = self._rows(texts, len(images))
        if self.dims.lm == "opt":
            return self._generate_opt(images, rows, generation)
        start = self.special["decoder_start_token_id"]
        options = self.options(1, generation)
        ids, mask = self._pad(rows)
        prefix = self.qformer(images)["image_prefix"]
        states = self.session.run("t5_encoder", {"input_ids": ids, "image_prefix": prefix, "attention_mask": mask})
        cross = self.session.run("t5_cross_kv", {"encoder_states": states["encoder_states"]}, keep=("cross_*",))
        first = np.full((len(rows), 1), start, np.int64)
        inference = T5Inference(self.session, self.dims, cross, mask)
        generated, scores = generate_scored(inference, first, np.ones_like(first), options)
        return generated, rows, options.num_return_sequences, scores

    def _generate_opt(self, images: list, rows: list[list[int]], generation: dict):
        """OPT: requests whose options agree decode together. A bundle default of max_length / min_length
        counts the prompt (image tokens included), as transformers does, so prompts of different lengths
        get different limits: each request gets the limits it has alone."""
        groups: dict[str, list[int]] = {}
        chosen = {}
        for i, r in enumerate(rows):
            options = self.options(len(r), generation)
            self._check_positions(len(r), options)
            groups.setdefault(repr(options), []).append(i)
            chosen[repr(options)] = options
        prefix = self.qformer(images)["image_prefix"]  # [B, Q, D]
        out: list = [None] * len(rows)
        out_scores: list = [None] * len(rows)
        for key, members in groups.items():
            options = chosen[key]
            ids, mask = self._pad([rows[i] for i in members])
            inference = OptInference(self.session, self.dims, self.manifest.graphs, prefix[members])
            generated, scores = generate_scored(inference, ids, mask, options)
            n = options.num_return_sequences
            for j, i in enumerate(members):
                out[i], out_scores[i] = generated[j * n : (j + 1) * n], scores[j * n : (j + 1) * n]
        return ([g for per_request in out for g in per_request], rows, options.num_return_sequences,
                np.concatenate(out_scores))

    def _text_part(self, row: list[int]) -> list[int]:
        return row[self.dims.num_query_tokens:]

    # -- generation tasks -------------------------------------------------------------------
    def caption(self, images, prompt: str | Sequence[str] | None = None, *, return_scores: bool = False,
                **generation) -> list:
        """Captions, one per image (OPT: the prompt and its continuation, as transformers decodes
        OPT's output; T5: the generated text). With num_return_sequences=n > 1: one list of n per image.
        return_scores=True: a Generated (text, tokens, score) in place of each caption."""
        tokens = self.caption_tokens(images, prompt, return_scores=return_scores, **generation)
        return tokens if return_scores else self._decode_text(tokens, self._sequences(generation))

    def caption_tokens(self, images, prompt: str | Sequence[str] | None = None, *, return_scores: bool = False,
                       **generation) -> list:
        """Token ids per image, as transformers' generate returns them without the image tokens and pads:
        OPT the prompt's ids (bos first) then the generated ones, T5 decoder_start_token_id then the
        generated ones; EOS included when reached. num_return_sequences=n > 1: one list of n per image.
        return_scores=True: a Generated in place of each sequence."""
        _check_return_scores(return_scores)
        n_images = len(_as_list(images))
        texts = None if prompt is None else _texts(prompt, "prompt", n_images)
        generated, rows, n, scores = self._generate(images, texts, generation)
        return self._results([self._lead(rows[i // n]) + g for i, g in enumerate(generated)], scores, n, return_scores)

    def _lead(self, row: list[int]) -> list[int]:
        """What transformers puts before the generated tokens: OPT's prompt, T5's start token."""
        return self._text_part(row) if self.dims.lm == "opt" else [self.special["decoder_start_token_id"]]

    def answer(self, images, questions: str | Sequence[str], template: str = "Question: {} Answer:", *,
               return_scores: bool = False, **generation) -> list:
        """Answers (the generated text only), one per image/question pair; the question goes into
        `template` at its "{}". num_return_sequences=n > 1: one list of n per pair. return_scores=True:
        a Generated (text, tokens, score) in place of each answer."""
        tokens = self.answer_tokens(images, questions, template, return_scores=return_scores, **generation)
        return tokens if return_scores else self._decode_text(tokens, self._sequences(generation))

    def answer_tokens(self, images, questions: str | Sequence[str], template: str = "Question: {} Answer:", *,
                      return_scores: bool = False, **generation) -> list:
        """Generated ids per pair (EOS included when reached; T5: decoder_start_token_id first).
        return_scores=True: a Generated in place of each sequence."""
        _check_return_scores(return_scores)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template={template!r}: expected a str with one '{{}}' where the question goes")
        questions = _texts(questions, "questions", len(_as_list(images)))
        generated, _, n, scores = self._generate(images, [template.format(q) for q in questions], generation)
        lead = [] if self.dims.lm == "opt" else [self.special["decoder_start_token_id"]]
        return self._results([lead + g for g in generated], scores, n, return_scores)

    # -- matching and features --------------------------------------------------------------
    def match(self, images, texts: str | Sequence[str]) -> np.ndarray:
        """ITM: probability float32 [B] that image i matches text i (softmax of the itm logits)."""
        self._need("itm")
        images = _as_list(images)
        ids, mask = self.tokenizer.encode(_texts(texts, "texts", len(images)))
        embeds = self.vision(images)["image_embeds"]
        logits = self.session.run("itm", {"image_embeds": embeds, "input_ids": ids, "attention_mask": mask})
        return match_probability(logits["itm_logits"])

    def image_features(self, images) -> np.ndarray:
        """ITC image features, one per query, L2-normalized: float32 [B, Q, E]."""
        self._need("itc")
        return self.qformer(images)["image_feat"]

    def text_features(self, texts: str | Sequence[str]) -> np.ndarray:
        """ITC text features, L2-normalized: float32 [T, E]."""
        self._need("itc")
        ids, mask = self.tokenizer.encode(_texts(texts, "texts"))
        return self.session.run("text_features", {"input_ids": ids, "attention_mask": mask})["text_feat"]

    def qformer_features(self, images) -> np.ndarray:
        """The Q-Former's query outputs float32 [B, Q, 768] (transformers' get_qformer_features)."""
        return self.qformer(images)["query_output"]

    @staticmethod
    def similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """float32 [I, T]: the best query's cosine similarity per pair, as transformers' ITC.
        image_features [I, Q, E] (or [I, E]), text_features [T, E]."""
        img = np.asarray(image_features)
        if img.ndim == 2:
            return img @ text_features.T
        return np.einsum("iqe,te->iqt", img, text_features).max(axis=1)
