"""Tokenization with the `tokenizers` library only, for any family's `tokenizer.json`.

`TextTokenizer` reproduces what a transformers 5.23 processor's `(text=..., padding="longest",
truncation=True, max_length=...)` and `decode / batch_decode(..., skip_special_tokens=True)` give,
because it drives the same Rust tokenizer the same way: the specials from tokenizer.json's
post-processor (BERT's `[CLS] ... [SEP]` for BLIP), truncation by `enable_truncation(max_length,
longest_first, right)` before the specials are added, right padding with the pad token and mask 0.
Which token pads comes from the bundle (its special_tokens' pad_token_id), not from a name known
here; family conventions on top (BLIP's [CLS] -> [DEC] in prompts) live in the family's folder.

Decoding: the WordPiece decoder in `tokenizer.json` already joins "##" pieces and removes spaces
before punctuation (its `cleanup: true`). transformers' own `clean_up_tokenization_spaces` pass
comes on top only when `tokenizer_config.json` asks for it: 5.23 defaults it to False (4.x defaulted
BERT to True). It is not stored in `tokenizer.json`, so it is a constructor argument here.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer


def _clean_up_tokenization(text: str) -> str:
    # transformers.PreTrainedTokenizerBase.clean_up_tokenization, verbatim.
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )


def check_text(text: str, where: str) -> None:
    """Raise ValueError unless `text` is valid Unicode (encodes as UTF-8). A lone surrogate comes
    from a broken str, or from command-line bytes that were not UTF-8: Python turns byte 0xff into
    U+DCFF; tokenizers would fail on it with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        code = ord(bad)
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ValueError(f"{where}: not valid Unicode text ({what} at index {e.start}); expected UTF-8 text") from None


class TextTokenizer:
    """Encode prompts / questions to ids and decode generated ids, as the family's processor does.

    `encode` sets truncation on the shared Rust tokenizer for the call, under a lock, so that
    threads sharing one instance never see each other's setting.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        pad_token_id: int | None = None,
        pad_token: str | None = None,
    ):
        """`model_max_length`: truncation length when encode gets none (tokenizer_config.json's
        `model_max_length`, 512 for BLIP; None = no limit). `clean_up_tokenization_spaces`: the
        same-named tokenizer_config.json flag (transformers 5.23 default False). The pad token:
        `pad_token_id` (the bundle's special_tokens), else `pad_token` by name, else the padding
        that tokenizer.json itself declares; ValueError if none gives one."""
        self._tok = tokenizer
        declared = tokenizer.padding  # read before no_padding() clears it
        # We pad in numpy and set truncation per call; start from a tokenizer that does neither.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        if pad_token_id is not None:
            if not 0 <= int(pad_token_id) < self.vocab_size:
                raise ValueError(f"pad_token_id={pad_token_id!r}: expected an id below the tokenizer's {self.vocab_size}")
            self.pad_token_id = int(pad_token_id)
        elif pad_token is not None:
            self.pad_token_id = self._required_id(pad_token)
        elif declared is not None:
            self.pad_token_id = int(declared["pad_id"])
        else:
            raise ValueError("no pad token: give pad_token_id or pad_token (tokenizer.json declares no padding)")
        self._num_special = self._tok.num_special_tokens_to_add(False)
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> TextTokenizer:
        """Load a `tokenizer.json`; kwargs as in `__init__`."""
        try:
            tok = Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # the Rust side raises a bare Exception for missing/bad files
            raise ValueError(f"cannot load tokenizer file {os.fspath(path)!r}: {e}") from e
        return cls(tok, **kwargs)

    def _required_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (30524 for BLIP)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of `token` (e.g. "[DEC]" -> 30522), None if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(
        self, texts: list[str], max_length: int | None = None, padding: str = "longest"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids int64 [B, S], attention_mask int64 [B, S]).

        Each row is the post-processor's form (BLIP: `[CLS] tokens [SEP]`), truncated to `max_length` (default `model_max_length`)
        tokens including the specials, right-padded with the pad token to the longest row
        (padding="longest") or to max_length (padding="max_length").
        """
        if not isinstance(texts, (list, tuple)) or len(texts) == 0:
            raise ValueError(f"texts must be a non-empty list of str, got {type(texts).__name__} {texts!r:.80}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")
            check_text(t, f"texts[{i}]")
        if padding not in ("longest", "max_length"):
            raise ValueError(f'padding must be "longest" or "max_length", got {padding!r}')
        limit = self.model_max_length if max_length is None else max_length
        if padding == "max_length" and limit is None:
            raise ValueError('padding="max_length" needs max_length (or model_max_length)')
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < self._num_special):
            # transformers silently skips truncation below the number of specials; refuse instead.
            raise ValueError(f"max_length must be an int >= {self._num_special}, got {limit!r}")

        with self._lock:
            if limit is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(int(limit), stride=0, strategy="longest_first", direction="right")
            try:
                rows = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]
            finally:
                self._tok.no_truncation()

        width = limit if padding == "max_length" else max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """One sequence of ids (list or 1-D int array) -> text, as `processor.decode`."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
        text = self._tok.decode(arr.tolist(), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, ids: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = True) -> list[str]:
        """Sequences of ids (list of lists, or int array [B, S]) -> B texts."""
        if isinstance(ids, np.ndarray) and ids.ndim != 2:
            raise ValueError(f"ids must be [B, S], got shape {ids.shape}")
        return [self.decode(row, skip_special_tokens) for row in ids]
