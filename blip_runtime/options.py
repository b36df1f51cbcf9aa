"""Generation options and their checks: what `generate` and the runtime's task methods accept.

Types are strict (1.5 beams, "3" beams or do_sample="false" are errors, not coerced) and every
option is checked once, in GenerationOptions; the manifest schema reads `_OPTION_CHECKS` for the
types of a bundle's generation defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    """int or numpy integer; bool is not an int here (True would silently mean 1)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and not isinstance(v, np.bool_)


_KINDS = {"int": _is_int, "float": _is_number, "bool": _is_bool}
_CASTS = {"int": int, "float": float, "bool": bool}
# Type and range of each option, checked once in GenerationOptions: (kind, in range, what is expected).
# Types are strict: 1.5 beams, "3" beams or do_sample="false" are errors, not coerced.
_OPTION_CHECKS = {
    "max_new_tokens": ("int", lambda v: v >= 1, "an int >= 1"),
    "min_new_tokens": ("int", lambda v: v >= 0, "an int >= 0 (above max_new_tokens: EOS never allowed)"),
    "num_beams": ("int", lambda v: v >= 1, "an int >= 1"),
    "length_penalty": ("float", lambda v: bool(np.isfinite(v)), "a finite number"),
    "do_sample": ("bool", lambda v: True, "True or False"),
    "temperature": ("float", lambda v: not np.isnan(v), "a number (> 0 when do_sample)"),
    "top_k": ("int", lambda v: v >= 0, "an int >= 0 (0 disables)"),
    "top_p": ("float", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "repetition_penalty": ("float", lambda v: 0.0 < v < np.inf, "a number > 0 (1.0 disables)"),
    "seed": ("int", lambda v: v >= 0, "None or an int >= 0"),
    "num_return_sequences": ("int", lambda v: v >= 1, "an int >= 1"),
}


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    eos_token_id: int | Sequence[int]  # ends a sequence (BLIP: [SEP] 102); kept in the output
    pad_token_id: int  # what transformers writes after a row's EOS; never in our output
    max_new_tokens: int = 20  # generated tokens at most, EOS included
    min_new_tokens: int = 0  # EOS is impossible (-inf) until this many tokens were generated
    num_beams: int = 1  # 1: greedy or sampling; >1: beam search
    length_penalty: float = 1.0  # beam score = sum log p / generated_length ** length_penalty
    early_stopping: bool | str = False  # beams: True stops at num_beams hypotheses; False: heuristic; "never"
    do_sample: bool = False  # multinomial draw instead of argmax (top-k of the accumulated scores for beams)
    temperature: float = 1.0  # sampling only: logits / temperature, > 0
    top_k: int = 50  # sampling only: keep the k best logits (ties kept); 0 disables
    top_p: float = 1.0  # sampling only: keep the smallest set with probability >= top_p; 1.0 disables
    repetition_penalty: float = 1.0  # > 1 discourages tokens already present, the prompt's included
    seed: int | None = None  # numpy generator seed for sampling; same seed, same output
    num_return_sequences: int = 1  # best n beams (<= num_beams), or n samples, per request

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, expected: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"GenerationOptions.{name}={value!r} ({type(value).__name__}): expected {expected}")

        for name, (kind, in_range, expected) in _OPTION_CHECKS.items():
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            require(_KINDS[kind](value) and in_range(value), name, expected)
            object.__setattr__(self, name, _CASTS[kind](value))  # numpy scalars become Python ones
        es = self.early_stopping
        require(_is_bool(es) or es == "never", "early_stopping", "True, False or 'never'")
        object.__setattr__(self, "early_stopping", bool(es) if _is_bool(es) else es)
        eos = self.eos_token_id
        ids = [eos] if _is_int(eos) else list(eos) if isinstance(eos, (list, tuple, np.ndarray)) else []
        require(len(ids) > 0 and all(_is_int(i) and i >= 0 for i in ids),
                "eos_token_id", "a token id (int >= 0) or a non-empty list of them")
        object.__setattr__(self, "eos_token_id", int(eos) if _is_int(eos) else [int(i) for i in ids])
        require(_is_int(self.pad_token_id) and self.pad_token_id >= 0, "pad_token_id", "a token id (int >= 0)")
        object.__setattr__(self, "pad_token_id", int(self.pad_token_id))
        require(not self.do_sample or 0.0 < self.temperature < np.inf, "temperature", "> 0 when do_sample")
        limit = self.num_beams if self.num_beams > 1 else (np.inf if self.do_sample else 1)
        require(self.num_return_sequences <= limit, "num_return_sequences",
                "in [1, num_beams] for beam search, 1 for greedy, >= 1 for sampling")

    @property
    def eos_ids(self) -> np.ndarray:
        """int64 [E]"""
        return np.atleast_1d(np.asarray(self.eos_token_id, dtype=np.int64))
