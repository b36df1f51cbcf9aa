"""blip_runtime.text against transformers' BlipProcessor built locally with a BLIP-shaped vocab:
BERT specials at their BERT ids, 30522 WordPiece entries, then [DEC]=30522 and [ENC]=30523."""

import numpy as np
import pytest

from blip_runtime.text import TextTokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers import BertTokenizerFast, BlipImageProcessorPil, BlipProcessor  # noqa: E402

WORDS = ("the a an of on in at to is are was what where how many color there this that it "
         "man woman dog cat cats table photo picture sitting standing red blue green white two "
         "hello world don caf naive uber over lazy quick brown fox jump jumps ##ed ##ing ##s ##ly "
         "##er ##e").split()
PUNCT = list(".,!?'\"-()[]:;/&")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]

TEXTS = [
    "A cat sitting on the table.",
    "What COLOR is the dog?",
    "Hello, World!!! (really)",
    "Café naïve Über — déjà vu",  # accents are stripped by the uncased normalizer
    "don't  stop:   tabs\tand\nnewlines",
    "€ 你好 ☃ unknown-glyphs",  # not in the vocab -> [UNK]
    "[SEP] and [DEC] written in the text",  # parsed as the special tokens, as transformers does
    "",
    "the quick brown fox jumps over the lazy dog " * 12,  # > 16 tokens: truncated below
]


def _vocab() -> dict:
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    real = iter(dict.fromkeys(WORDS + PUNCT + LETTERS + ["##" + c for c in LETTERS]))  # unique
    tokens = []
    for i in range(30522):
        if i in specials:
            tokens.append(specials[i])
        elif i < 1000:
            tokens.append(f"[unused{i}]")
        else:
            tokens.append(next(real, f"filler{i}"))
    assert len(set(tokens)) == 30522
    return {t: i for i, t in enumerate(tokens)}


def _save(tmp_path, **kwargs):
    # transformers 5.x: BertTokenizerFast is BertTokenizer and takes `vocab` (a dict); a
    # `vocab_file=` argument is silently ignored and leaves a 5-token vocabulary.
    # bos [DEC] + additional special [ENC] is how BLIP's hub tokenizer adds its two tokens.
    tok = BertTokenizerFast(vocab=_vocab(), bos_token="[DEC]", additional_special_tokens=["[ENC]"], **kwargs)
    BlipProcessor(BlipImageProcessorPil(), tok).save_pretrained(tmp_path)
    return BlipProcessor.from_pretrained(tmp_path)  # a local folder, like a checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers processor, our tokenizer) with BLIP's model_max_length=512."""
    d = tmp_path_factory.mktemp("blip_tok")
    proc = _save(d, model_max_length=512)
    return proc, TextTokenizer.from_file(d / "tokenizer.json", model_max_length=512, pad_token="[PAD]")


def _ref(proc, texts, **kw):
    enc = proc(text=texts, padding=kw.pop("padding", "longest"), truncation=True, return_tensors="np", **kw)
    assert set(enc) == {"input_ids", "attention_mask"}  # BlipProcessor drops token_type_ids
    return enc["input_ids"], enc["attention_mask"]


def _check(ours, ref, what):
    for name, a, b in zip(("input_ids", "attention_mask"), ours, ref):
        assert a.dtype == np.int64 and a.shape == b.shape, f"{what} {name}: {a.dtype} {a.shape} vs {b.shape}"
        err = int(np.abs(a - b).max())
        assert err == 0, f"{what} {name}: max abs err {err}\nours {a.tolist()}\nref  {b.tolist()}"


def test_special_ids(pair):
    proc, tok = pair
    hf = proc.tokenizer
    ours = (tok.pad_token_id, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"))
    assert ours == (0, 101, 102) == (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id)
    assert tok.token_to_id("[DEC]") == hf.bos_token_id == 30522
    assert tok.token_to_id("[ENC]") == 30523 and tok.token_to_id("no-such-token") is None
    assert tok.vocab_size == len(hf) == 30524 and tok.id_to_token(30522) == "[DEC]"


@pytest.mark.parametrize("max_length", [None, 2, 3, 8, 16, 40])
def test_encode_matches_processor(pair, max_length):
    proc, tok = pair
    _check(tok.encode(TEXTS, max_length=max_length), _ref(proc, TEXTS, max_length=max_length),
           f"batch max_length={max_length}")
    for t in TEXTS:  # one at a time: padding to its own length
        _check(tok.encode([t], max_length=max_length), _ref(proc, [t], max_length=max_length), repr(t[:30]))


def test_encode_max_length_padding(pair):
    proc, tok = pair
    _check(tok.encode(TEXTS[:3], max_length=20, padding="max_length"),
           _ref(proc, TEXTS[:3], max_length=20, padding="max_length"), "padding=max_length")


def test_model_max_length_truncates(pair):
    proc, tok = pair
    long = ["the quick brown fox jumps over the lazy dog " * 80, "short"]
    ids, mask = tok.encode(long)
    assert ids.shape == (2, 512) and ids[0, -1] == tok.token_to_id("[SEP]")
    _check((ids, mask), _ref(proc, long), "model_max_length=512")
    unlimited = TextTokenizer(tok._tok, pad_token_id=0)  # model_max_length None: no truncation at all
    assert unlimited.encode(long)[0].shape[1] > 512


def _decode_cases(tok):
    ids, _ = tok.encode(TEXTS, max_length=24)
    cases = [list(r) for r in ids]
    dec, enc, sep, pad = 30522, 30523, 102, 0
    cases += [
        [dec, 1001, 1002, 1003, 1004, sep, pad, pad],  # a generated caption: [DEC] ... [SEP] [PAD]
        [dec, enc, 1010, sep, 1011, 100, 1012],  # specials in the middle, [UNK]
        [],
    ]
    # "don ' t", "it ' s": where the cleanup flag makes a difference
    cases.append(tok.encode(["don't it's we're I'm you've , . ! ?"])[0][0].tolist())
    return cases


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_processor(pair, skip):
    proc, tok = pair
    cases = _decode_cases(tok)
    for ids in cases:
        ours, ref = tok.decode(ids, skip_special_tokens=skip), proc.decode(ids, skip_special_tokens=skip)
        assert ours == ref, f"ids {ids}: {ours!r} != {ref!r}"
    rows = [c for c in cases if c]
    assert tok.batch_decode(rows, skip) == proc.batch_decode(rows, skip_special_tokens=skip)
    width = max(map(len, rows))
    arr = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    assert tok.batch_decode(arr, skip) == proc.batch_decode(arr, skip_special_tokens=skip)


def test_cleanup_flag(tmp_path):
    """transformers 5.23 defaults clean_up_tokenization_spaces to False; older BLIP tokenizer
    configs set it True. The WordPiece decoder already drops spaces before . , ! ? either way."""
    text = ["don't stop, it's fine."]
    for flag, expected in ((False, "don ' t stop, it ' s fine."), (True, "don't stop, it's fine.")):
        proc = _save(tmp_path / str(flag), clean_up_tokenization_spaces=flag)
        tok = TextTokenizer.from_file(tmp_path / str(flag) / "tokenizer.json", clean_up_tokenization_spaces=flag,
                                      pad_token_id=0)
        ids, _ = tok.encode(text)
        assert tok.decode(ids[0]) == proc.decode(ids[0], skip_special_tokens=True) == expected


def test_bad_inputs(pair, tmp_path):
    _, tok = pair
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode([])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode("a bare string")
    with pytest.raises(ValueError, match=r"texts\[1\].*int"):
        tok.encode(["ok", 3])
    with pytest.raises(ValueError, match=r"texts\[1\]: not valid Unicode text \(lone surrogate U\+D800 at index 1\)"):
        tok.encode(["ok", "a\ud800"])  # tokenizers itself raises a bare TypeError
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["a"], max_length=1)
    with pytest.raises(ValueError, match="padding"):
        tok.encode(["a"], padding="do_not_pad")
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.array([1.5]))
    with pytest.raises(ValueError, match="missing.json"):
        TextTokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no pad token"):
        TextTokenizer(tok._tok)  # the pad token comes from the bundle, never from a name guessed here
    with pytest.raises(ValueError, match=r"special token '\[NOPE\]' is not in the tokenizer vocabulary"):
        TextTokenizer(tok._tok, pad_token="[NOPE]")
    with pytest.raises(ValueError, match="pad_token_id=99999: expected an id below"):
        TextTokenizer(tok._tok, pad_token_id=99999)
