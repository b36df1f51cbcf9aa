"""Learn the small BERT-style WordPiece tokenizer of the easy-VQA BLIP.

The pipeline is exactly the one transformers 5's `BertTokenizer` builds (BertNormalizer lowercasing,
BertPreTokenizer, WordPiece with "##" continuations, `[CLS] $A [SEP]` template, WordPiece decoder),
so `BlipProcessor` and the raw `tokenizers` library give the same ids. Ids: [PAD]=0, [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4, then the learned pieces, then BLIP's added specials [DEC] (the
decoder's bos) and [ENC], last, as in BLIP's 30522 + 2 layout.

    python training/tokenizer.py OUT_DIR     # writes OUT_DIR/tokenizer.json
"""

from __future__ import annotations

import argparse
import string
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's names
BLIP_SPECIALS = ("[DEC]", "[ENC]")  # added after the vocabulary


def build_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    """The BERT pipeline around a WordPiece `vocab` (token -> id, SPECIALS first), plus [DEC], [ENC]."""
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Registering the specials keeps their vocabulary ids, marks them special (skipped by decode,
    # never split) and appends [DEC], [ENC] after the vocabulary.
    tok.add_special_tokens(list(SPECIALS) + list(BLIP_SPECIALS))
    for i, name in enumerate(SPECIALS):
        assert tok.token_to_id(name) == i, f"{name} must have id {i}"
    return tok


def train_tokenizer(texts: list[str], min_count: int = 1) -> Tokenizer:
    """A WordPiece vocabulary learned from `texts`: every word seen at least `min_count` times whole,
    and every lowercase letter, digit and ASCII punctuation mark alone and as a "##" continuation,
    so a word the corpus lacks is spelled out in pieces instead of becoming [UNK].

    Not tokenizers' WordPieceTrainer: it breaks ties between equally frequent merges in hash-map
    order, so two runs on the same corpus gave different pieces and ids (and so different models).
    On easy-VQA's 37 words the trainer ends at whole words anyway; counting them is deterministic.
    Words are split exactly as the tokenizer will split them (its normalizer and pre-tokenizer).
    """
    splitter = build_tokenizer({name: i for i, name in enumerate(SPECIALS)})
    counts = Counter(
        word
        for text in texts
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text))
    )
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = {w for w, n in counts.items() if n >= min_count} | set(chars)
    pieces |= {"##" + c for c in string.ascii_lowercase + string.digits}  # punctuation is never continued
    return build_tokenizer({t: i for i, t in enumerate(list(SPECIALS) + sorted(pieces - set(SPECIALS)))})


def main(argv=None) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from data import all_texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write tokenizer.json into")
    ap.add_argument("--min-count", type=int, default=1)
    args = ap.parse_args(argv)
    tok = train_tokenizer(all_texts(), args.min_count)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    print(f"{args.out / 'tokenizer.json'}: {tok.get_vocab_size()} ids, [DEC]={tok.token_to_id('[DEC]')}")


if __name__ == "__main__":
    main()
