"""Tiny stand-ins for BLIP-2's two LM tokenizers, trained here with `tokenizers` (no downloads) and
wrapped in transformers' own classes, so transformers writes every file a checkpoint carries.

- OPT: byte-level BPE in a GPT2TokenizerFast with OPT's specials (`<s>`=0, `<pad>`=1, `</s>`=2,
  `<unk>`=3; bos = eos = `</s>`). OPT's hub tokenizer.json prepends `</s>` through a
  TemplateProcessing post-processor and appends nothing; `add_bos_token=True` in the constructor is
  the other way a checkpoint says the same (tokenizer_config.json then carries the flag).
- Flan-T5: a Unigram model in a T5TokenizerFast (`<pad>`=0, `</s>`=1, `<unk>`=2), with T5's own
  pre-tokenizer and decoder (the ones T5Tokenizer rebuilds on load) and `</s>` appended.
"""

from __future__ import annotations

import random

CORPUS_WORDS = (
    "a an the of on in at to is are was what where how many color there this that it man woman dog "
    "cat table photo picture sitting standing red blue green white two question answer describe image "
    "café naïve über déjà vu straße 你好 世界 猫 🙂 🐈 don't it's we're"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """n pseudo-sentences over CORPUS_WORDS with punctuation: enough for merges beyond bytes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(CORPUS_WORDS, k=rng.randint(3, 12))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ""]))
    return out


def opt_tokenizer(vocab_size: int = 600, add_bos_token: bool | None = None, **kwargs):
    """transformers.GPT2TokenizerFast shaped like OPT's. add_bos_token None: the bos comes from
    tokenizer.json's post-processor (OPT's hub files); True/False: from the flag in tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if add_bos_token is None:
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kwargs["add_bos_token"] = add_bos_token
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )


def t5_tokenizer(vocab_size: int = 300, extra_ids: int = 3, **kwargs):
    """transformers.T5TokenizerFast over a Unigram model trained here; `extra_ids` sentinels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=extra_ids, **kwargs
    )


def t5_sentencepiece_tokenizer(folder, vocab_size: int = 150, extra_ids: int = 3):
    """A T5 tokenizer the way Flan-T5's was made: a SentencePiece Unigram model (NFKC rules, so
    tokenizer.json gets a Precompiled normalizer) converted by transformers from `spiece.model`.
    Needs the `sentencepiece` package; `folder` receives the model."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, minloglevel=2,
    )
    return T5TokenizerFast.from_pretrained(folder, extra_ids=extra_ids)
