"""The tokenizer settings of a BLIP-2 checkpoint, read from its JSON files as transformers 5 reads them.

`tokenizer.json` holds the Rust pipeline; what transformers adds on top comes from
`tokenizer_config.json` (and, for folders written before `added_tokens_decoder` existed, from
`special_tokens_map.json`, whose entries then win): the named special tokens, the padding and
truncation sides, `clean_up_tokenization_spaces`, and `add_bos_token` / `add_eos_token`, which, when
present, replace the file's post-processor by `[bos] $A [eos]` (`TokenizersBackend.update_post_processor`).
transformers 5 writes no `special_tokens_map.json`; hub checkpoints written by 4.x carry one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ...processor_config import read_json_object

# tokenizer_config.json's `tokenizer_class` -> the tokenizers model it must wrap. Classes not listed
# (TokenizersBackend, PreTrainedTokenizerFast) run whatever tokenizer.json holds.
CLASS_MODEL = {
    "GPT2Tokenizer": "BPE", "GPT2TokenizerFast": "BPE",  # OPT: byte-level BPE, bos "</s>"
    "T5Tokenizer": "Unigram", "T5TokenizerFast": "Unigram",  # Flan-T5: SentencePiece Unigram, "</s>" appended
}
NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value, where: str) -> str | None:
    # A named token is stored as a string or as a serialized AddedToken {"content": ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a string or an AddedToken object with 'content', got {value!r:.80}")


@dataclass(frozen=True)
class Blip2TextSettings:
    """Everything besides `tokenizer.json` that Blip2Processor's text side depends on (a bundle
    carries it as a dict: `asdict` / `from_dict`)."""

    num_query_tokens: int | None  # the model config's; the number of `<image>` tokens prepended
    image_token_index: int | None  # the model config's id of `<image>`; None = legacy convention
    # Blip2Processor adds it to the tokenizer (special, not normalized). It would take a tokenizer's
    # own `image_token` attribute instead, but transformers 5.24 then fails (it expects an AddedToken).
    image_token: str = "<image>"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    padding_side: str = "right"  # transformers' default when tokenizer_config.json names none
    truncation_side: str = "right"
    add_bos_token: bool | None = None  # None: keep tokenizer.json's post-processor
    add_eos_token: bool | None = None
    clean_up_tokenization_spaces: bool = False  # transformers 5's default
    # transformers 5 skips the clean-up for BPE models unless this (long-named) flag is set.
    clean_up_bpe: bool = False

    def __post_init__(self):
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in ("left", "right"):
                raise ValueError(f'{name} must be "left" or "right", got {getattr(self, name)!r}')
        for name in ("num_query_tokens", "image_token_index"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        if self.image_token_index is not None and not self.num_query_tokens:
            raise ValueError(
                f"num_query_tokens must be a positive int with image_token_index={self.image_token_index}, "
                f"got {self.num_query_tokens!r}"
            )
        if not isinstance(self.image_token, str) or not self.image_token:
            raise ValueError(f"image_token must be a non-empty str, got {self.image_token!r}")

    @property
    def image_tokens(self) -> bool:
        """True for the current convention (`<image>` x num_query_tokens in input_ids)."""
        return self.image_token_index is not None

    @classmethod
    def from_dict(cls, d: dict) -> Blip2TextSettings:
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_folder(
        cls, folder: Path, num_query_tokens: int | None, image_token_index: int | None
    ) -> tuple[Blip2TextSettings, str | None]:
        """(settings, tokenizer_config.json's `tokenizer_class`) from a checkpoint folder."""
        folder = Path(folder)
        path = folder / "tokenizer_config.json"
        config = read_json_object(path) if path.is_file() else {}
        specials_path = folder / "special_tokens_map.json"
        named = {k: config.get(k) for k in NAMED_TOKENS}
        where = {k: f"{path.name} {k}" for k in NAMED_TOKENS}
        if specials_path.is_file() and "added_tokens_decoder" not in config:
            # transformers' legacy path: special_tokens_map.json overrides tokenizer_config.json.
            for k, v in read_json_object(specials_path).items():
                if k in named:
                    named[k], where[k] = v, f"{specials_path.name} {k}"
        tokens = {k: _token_content(v, where[k]) for k, v in named.items()}

        def flag(key):
            v = config.get(key)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{path.name} {key} must be true or false, got {v!r}")
            return v

        # transformers rebuilds the post-processor when either key is present, even as false.
        rebuild = "add_bos_token" in config or "add_eos_token" in config
        settings = cls(
            num_query_tokens=num_query_tokens,
            image_token_index=image_token_index,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            add_bos_token=bool(flag("add_bos_token")) if rebuild else None,
            add_eos_token=bool(flag("add_eos_token")) if rebuild else None,
            clean_up_tokenization_spaces=bool(flag("clean_up_tokenization_spaces")),
            clean_up_bpe=bool(flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")),
            **tokens,
        )
        tokenizer_class = config.get("tokenizer_class")
        return settings, tokenizer_class if isinstance(tokenizer_class, str) else None
