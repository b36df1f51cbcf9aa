"""BLIP-2's processor without torch or transformers: text to input_ids / attention_mask, ids to text,
images to pixel_values, as transformers 5.24's `Blip2Processor` gives them.

Text (`Blip2TextProcessor`) drives the checkpoint's own Rust tokenizer (`tokenizer.json`) the way
transformers' `TokenizersBackend` does, for both LMs BLIP-2 ships with:
- OPT: byte-level BPE (tokenizer_class GPT2Tokenizer); the post-processor prepends the bos `</s>`
  (id 2) and appends nothing;
- Flan-T5: SentencePiece Unigram (T5Tokenizer); the post-processor appends `</s>` (id 1).

The pipeline runs as tokenizer.json writes it. transformers 5 loads the Salesforce BLIP-2 hub
checkpoints the same way (they are listed in `MODEL_IDS_TO_TOKENIZERS_BACKEND`, i.e. TokenizersBackend
over the file); for other folders its GPT2Tokenizer / T5Tokenizer classes rebuild normalizer,
pre-tokenizer and decoder from their own code, which for files written by transformers 5 gives the
same pipeline (a test compares them), and for files written by other tools may not.

Blip2Processor adds `<image>` to the tokenizer as a special, non-normalized token. transformers 5's
`save_pretrained` writes it into tokenizer.json's added tokens; folders written before the processor
knew image tokens lack it, and transformers then appends it at the next free id on load: so do we,
and the id must equal the model config's `image_token_index`.

Two conventions for where the query embeddings go:
- current (`image_token_index` set): `<image>` x num_query_tokens at the start of every row, before
  the bos, never padded or truncated; the text after them is padded, so under left padding the pads
  sit between the image tokens and the bos. A `max_length` counts the image tokens
  (Blip2Processor truncates the text to `max_length - num_query_tokens`).
- legacy (`image_token_index` None): no image tokens; the model puts the query embeddings before the
  text itself. `max_length` then applies to the text as the tokenizer alone applies it
  (transformers' Blip2Processor has no number to subtract and fails on a max_length there).

Decoding is `processor.batch_decode(ids, skip_special_tokens=True)`: the Rust decoder, then
transformers' `clean_up_tokenization` when tokenizer_config.json asks for it, which transformers 5
skips for BPE models (OPT) unless forced. Ids past the vocabulary decode to nothing, as there.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, processors

from ...image import ImageSettings, preprocess
from ...processor_config import image_processor_config
from ...text import _clean_up_tokenization, check_text
from .text_settings import CLASS_MODEL, Blip2TextSettings, read_json_object

__all__ = ["Blip2Processor", "Blip2TextProcessor", "Blip2TextSettings"]

KINDS = {"BPE": "bpe", "Unigram": "unigram"}  # tokenizers model class -> our name


def check_texts(texts, name: str = "texts") -> list[str]:
    """A non-empty list of str the Rust tokenizer can take (no lone surrogates), else ValueError."""
    if not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise ValueError(f"{name} must be a non-empty list of str, got {type(texts).__name__} {texts!r:.80}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(t).__name__}")
        check_text(t, f"{name}[{i}]")
    return list(texts)


class Blip2TextProcessor:
    """BLIP-2 prompts to (input_ids, attention_mask) and generated ids to text.

    `encode` sets truncation on the shared Rust tokenizer for the call, under a lock, so threads
    sharing one instance never see each other's setting.
    """

    def __init__(self, tokenizer: Tokenizer, settings: Blip2TextSettings):
        self._tok = tokenizer
        self.settings = settings
        self._tok.no_padding()  # padded in numpy below, truncation set per call
        self._tok.no_truncation()
        model = type(self._tok.model).__name__
        if model not in KINDS:
            raise ValueError(
                f"tokenizer model {model} is not a BLIP-2 LM tokenizer; expected BPE (OPT) or Unigram (Flan-T5)"
            )
        self.kind = KINDS[model]
        s = settings
        if s.add_bos_token is not None or s.add_eos_token is not None or self._tok.post_processor is None:
            self._tok.post_processor = self._template(bool(s.add_bos_token), bool(s.add_eos_token))

        # What Blip2Processor.__init__ does to the tokenizer: add the image token (a no-op if present).
        self._tok.add_tokens([AddedToken(s.image_token, normalized=False, special=True)])
        self.image_token_id = self._tok.token_to_id(s.image_token)
        if s.image_token_index is not None and self.image_token_id != s.image_token_index:
            raise ValueError(
                f"image_token_index {s.image_token_index} (model config) differs from {s.image_token!r}'s id "
                f"{self.image_token_id} in the tokenizer; expected the tokenizer of the same checkpoint"
            )
        self.bos_token_id = self._token_id(s.bos_token, "bos_token")
        self.eos_token_id = self._token_id(s.eos_token, "eos_token")
        self.pad_token_id = self._token_id(s.pad_token, "pad_token")
        self.unk_token_id = self._token_id(s.unk_token, "unk_token")
        self._num_special = self._tok.num_special_tokens_to_add(False)
        # transformers 5: clean_up_tokenization is "destructive for BPE" and skipped there unless forced.
        self.clean_up = s.clean_up_tokenization_spaces and (self.kind != "bpe" or s.clean_up_bpe)
        self._lock = threading.Lock()

    def _template(self, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
        # TokenizersBackend.update_post_processor: "[bos:0] $A:0 [eos:0]"; a flag without its token is dropped.
        s = self.settings
        bos = s.bos_token if add_bos else None
        eos = s.eos_token if add_eos else None
        single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
        pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
        special = [(t, self._token_id(t, n)) for t, n in ((bos, "bos_token"), (eos, "eos_token")) if t]
        return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)

    def _token_id(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer vocabulary")
        return i

    @classmethod
    def from_file(cls, path: str | os.PathLike, settings: Blip2TextSettings) -> Blip2TextProcessor:
        """From a `tokenizer.json` and the settings a bundle carries."""
        try:
            tok = Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # the Rust side raises a bare Exception for missing or bad files
            raise ValueError(f"cannot load tokenizer file {os.fspath(path)!r}: {e}") from e
        return cls(tok, settings)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, num_query_tokens: int | None, image_token_index: int | None
    ) -> Blip2TextProcessor:
        """From a checkpoint folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
        and the model config's `num_query_tokens` and `image_token_index` (None: legacy convention)."""
        folder = Path(folder)
        settings, tokenizer_class = Blip2TextSettings.from_folder(folder, num_query_tokens, image_token_index)
        processor_nq = _processor_num_query_tokens(folder)
        if image_token_index is not None and processor_nq is not None and processor_nq != num_query_tokens:
            raise ValueError(
                f"num_query_tokens {num_query_tokens} (model config) differs from {processor_nq} in "
                f"{folder / 'processor_config.json'}"
            )
        out = cls.from_file(folder / "tokenizer.json", settings)
        want = CLASS_MODEL.get(tokenizer_class or "")
        if want is not None and KINDS[want] != out.kind:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: tokenizer_class {tokenizer_class} needs a {want} "
                f"tokenizer.json, found {type(out._tok.model).__name__}"
            )
        return out

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens and `<image>`."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(
        self,
        texts: list[str],
        max_length: int | None = None,
        padding: str = "longest",
        padding_side: str | None = None,
        image_tokens: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids int64 [B, S], attention_mask int64 [B, S]).

        Each row: `<image>` x num_query_tokens (current convention, unless `image_tokens` is False:
        Blip2Processor called without images), then the tokenizer's own specials around the text
        (OPT `</s>` text, T5 text `</s>`), padded with pad_token to the longest row (or to
        `max_length` with padding="max_length") on `padding_side` (default: tokenizer_config.json's).
        `max_length` None: no truncation; else rows are cut to it, image tokens included, on
        tokenizer_config.json's truncation side; the specials are kept.
        """
        texts = check_texts(texts)
        s = self.settings
        if padding not in ("longest", "max_length"):
            raise ValueError(f'padding must be "longest" or "max_length", got {padding!r}')
        side = s.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f'padding_side must be "left", "right" or None, got {padding_side!r}')
        if padding == "max_length" and max_length is None:
            raise ValueError('padding="max_length" needs max_length')
        prefix = [self.image_token_id] * s.num_query_tokens if s.image_tokens and image_tokens else []
        # Blip2Processor subtracts num_query_tokens whenever it has them, with or without images.
        reserved = s.num_query_tokens if s.image_tokens else 0
        limit = None
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
                raise ValueError(f"max_length must be an int or None, got {type(max_length).__name__} {max_length!r}")
            limit = int(max_length) - reserved
            if limit < max(self._num_special, 1):
                # Below the specials transformers skips truncation with a log line; refuse instead.
                raise ValueError(
                    f"max_length must be >= {reserved + max(self._num_special, 1)} (num_query_tokens {reserved} "
                    f"+ {max(self._num_special, 1)} text token(s)), got {max_length}"
                )

        with self._lock:
            if limit is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(limit, stride=0, strategy="longest_first", direction=s.truncation_side)
            try:
                rows = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]
            finally:
                self._tok.no_truncation()

        width = limit if padding == "max_length" else max(len(r) for r in rows)
        if self.pad_token_id is None and any(len(r) < width for r in rows):
            raise ValueError("texts of different lengths need a pad_token; tokenizer_config.json names none")
        n = len(prefix)
        ids = np.full((len(rows), n + width), self.pad_token_id or 0, dtype=np.int64)  # no pad cells without a pad
        mask = np.zeros((len(rows), n + width), dtype=np.int64)
        ids[:, :n], mask[:, :n] = prefix, 1
        for b, r in enumerate(rows):
            start = n + (width - len(r) if side == "left" else 0)  # left: pads between image tokens and text
            ids[b, start : start + len(r)] = r
            mask[b, start : start + len(r)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """One sequence of ids (list or 1-D int array) -> text, as `processor.decode`."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"ids must be >= 0, got {int(arr.min())}")
        text = self._tok.decode(arr.tolist(), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up else text

    def batch_decode(self, ids: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = True) -> list[str]:
        """Sequences of ids (list of lists, or int array [B, S]) -> B texts."""
        if isinstance(ids, np.ndarray) and ids.ndim != 2:
            raise ValueError(f"ids must be [B, S], got shape {ids.shape}")
        return [self.decode(row, skip_special_tokens) for row in ids]


def _processor_num_query_tokens(folder: Path) -> int | None:
    path = folder / "processor_config.json"
    return read_json_object(path).get("num_query_tokens") if path.is_file() else None


class Blip2Processor:
    """Images and prompts -> the feeds of a BLIP-2 model, as transformers' `Blip2Processor(images=, text=)`."""

    def __init__(self, text: Blip2TextProcessor, image: ImageSettings):
        self.text = text
        self.image = image

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, num_query_tokens: int | None, image_token_index: int | None
    ) -> Blip2Processor:
        """From a checkpoint folder: the text side as `Blip2TextProcessor.from_folder`, the image side
        from processor_config.json's "image_processor" (transformers 5) or preprocessor_config.json."""
        folder = Path(folder)
        config, path = image_processor_config(folder)
        if config is None:
            raise ValueError(
                f"{folder}: no processor_config.json with an image_processor, nor preprocessor_config.json"
            )
        try:
            image = ImageSettings.from_preprocessor_config(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(Blip2TextProcessor.from_folder(folder, num_query_tokens, image_token_index), image)

    def __call__(
        self,
        images: list,
        texts: list[str],
        max_length: int | None = None,
        padding: str = "longest",
        padding_side: str | None = None,
    ) -> dict[str, np.ndarray]:
        """One prompt per image -> {"pixel_values": float32 [B, 3, H, W], "input_ids": int64 [B, S],
        "attention_mask": int64 [B, S]}; texts as in `Blip2TextProcessor.encode`."""
        texts = check_texts(texts)
        if not isinstance(images, (list, tuple)) or len(images) != len(texts):
            n = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
            raise ValueError(f"images must be a list with one image per text ({len(texts)}), got {n}")
        ids, mask = self.text.encode(texts, max_length=max_length, padding=padding, padding_side=padding_side)
        return {"pixel_values": preprocess(list(images), self.image), "input_ids": ids, "attention_mask": mask}
