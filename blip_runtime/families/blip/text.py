"""BLIP's tokenizer conventions on top of the family-neutral TextTokenizer.

A BLIP `tokenizer.json` is BERT uncased WordPiece (30522 tokens) plus the added specials `[DEC]`
(30522, the decoder's bos) and `[ENC]` (30523); its post-processor writes `[CLS] ... [SEP]`. The
text encoder reads that form as it is; a caption prompt is turned into a decoder prompt the way
transformers' BlipForConditionalGeneration.generate does: [CLS] becomes [DEC] (the bundle's
bos_token_id) and [SEP] is dropped.
"""

from __future__ import annotations

from ...text import TextTokenizer


def prompt_rows(tokenizer: TextTokenizer, prompts: list[str], bos: int) -> list[list[int]]:
    """Decoder prompt ids per text: [DEC] and the prompt's tokens, without [CLS] and [SEP] (per row,
    so padding never enters a row)."""
    ids, mask = tokenizer.encode(prompts)
    return [[bos] + ids[i, 1 : int(mask[i].sum()) - 1].tolist() for i in range(len(prompts))]


def check_bert_specials(tokenizer: TextTokenizer) -> None:
    """ValueError unless the tokenizer has BERT's [CLS] and [SEP], which prompt_rows and the text
    encoder assume."""
    for token in ("[CLS]", "[SEP]"):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer vocabulary")
