"""Tokenizers and text pretraining of the two small language models of the easy-VQA BLIP-2.

- OPT-style: byte-level BPE with OPT's conventions: <s>=0, <pad>=1, </s>=2, <unk>=3, every text
  starts with </s> (the post-processor prepends it, as OPT's tokenizer does), and generation stops
  at the "\\n" token (Ċ), as the public BLIP-2 OPT checkpoints stop at theirs (50118).
- Flan-T5-style: Unigram with T5's conventions: <pad>=0, </s>=1, <unk>=2, Metaspace pieces, </s>
  appended to every text, no sentinel ids.

Both get BLIP-2's `<image>` placeholder as their last id (Blip2Processor prepends num_query_tokens of
them; the model scatters the Q-Former's prefix over them).

The LMs are pretrained on easy-VQA text with a caption as context in front of the text they
predict: "caption </s> caption \\n" and "caption </s> Question: q Answer: a \\n" (OPT; T5 reads the
context and prompt in its encoder). The caption stands where BLIP-2 puts the image prefix, so the
frozen LM already reads colour, shape, size and position from the positions the Q-Former will fill.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram
from tokenizers.trainers import BpeTrainer

IMAGE_TOKEN = "<image>"
PROMPT = "Question: {} Answer:"


def corpus(split) -> list[str]:
    """The tokenizers' training texts: the split's prompts as the models see them, answers, captions
    (repeated as often as they occur: BPE merges and Unigram scores follow frequency)."""
    return [PROMPT.format(q) for q in split.questions] + [" " + a for a in split.answers] + list(split.captions)


def opt_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE learned on `texts` (in their order: the same texts give the same merges)."""
    tok = Tokenizer(BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN])
    for i, name in enumerate(["<s>", "<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(name) == i, f"{name} must have id {i}"
    assert tok.token_to_id("Ċ") is not None, "the byte-level alphabet must hold the newline token Ċ"
    return tok


def t5_tokenizer(texts: list[str]) -> Tokenizer:
    """A Unigram model over `texts`: every whitespace word of the corpus one piece ("▁word", scored by
    its log frequency), and every character alone and after "▁" as a fallback (scored far lower), so
    an unseen word is spelled, never <unk>.

    Not tokenizers' UnigramTrainer: its pruning gave different pieces from run to run on this corpus
    (and a poor split of it: "color" in five pieces); counting words is deterministic."""
    from collections import Counter

    counts = Counter(w for t in texts for w in t.split())
    total = sum(counts.values())
    pieces = [(s, 0.0) for s in ("<pad>", "</s>", "<unk>")]
    pieces += [("▁" + w, math.log(n / total)) for w, n in sorted(counts.items())]
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    pieces += [("▁", -20.0)] + [(c, -20.0) for c in chars] + [("▁" + c, -20.0) for c in chars
                                                            if ("▁" + c) not in dict(pieces)]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", IMAGE_TOKEN])
    for i, name in enumerate(["<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(name) == i, f"{name} must have id {i}"
    return tok


def hf_tokenizer(tok: Tokenizer, kind: str):
    """The transformers tokenizer around `tok` (what save_pretrained writes next to the model)."""
    from transformers import GPT2Tokenizer, T5Tokenizer

    if kind == "opt":
        # left padding, so that batched prompts end where generation continues; given to the constructor,
        # as only init arguments reach tokenizer_config.json (an attribute set afterwards is not saved,
        # and transformers then pads batched prompts on the right and generates after the pads)
        out = GPT2Tokenizer(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", add_prefix_space=False, padding_side="left")
    else:
        out = T5Tokenizer(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    out.image_token = IMAGE_TOKEN  # Blip2Processor reads it instead of adding another <image>
    return out


def pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids int64 [B, S] and mask int64 [B, S]."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def ids_of(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Without special tokens (the callers place </s> themselves)."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def opt_rows(tok: Tokenizer, prefix: list[list[int]], targets: list[str], prompts: list[str] | None):
    """OPT training rows: prefix ids + </s> + prompt + target + Ċ, and which positions are predicted
    (the target and Ċ only). -> (ids [B, S], mask [B, S], labels [B, S] with -100 elsewhere)."""
    eos, nl, padid = tok.token_to_id("</s>"), tok.token_to_id("Ċ"), tok.token_to_id("<pad>")
    prompt_ids = ids_of(tok, prompts) if prompts else [[] for _ in targets]
    # a target follows "Answer:" after a space, a caption starts the text
    target_ids = ids_of(tok, [(" " + t) if prompts else t for t in targets])
    rows, labels = [], []
    for pre, pr, tg in zip(prefix, prompt_ids, target_ids):
        head = pre + [eos] + pr
        rows.append(head + tg + [nl])
        labels.append([-100] * len(head) + tg + [nl])
    ids, mask = pad(rows, padid)
    lab, _ = pad(labels, -100)
    return ids, mask, lab


def t5_rows(tok: Tokenizer, prefix: list[list[int]], targets: list[str], prompts: list[str] | None):
    """T5 rows: encoder prefix + prompt + </s>, decoder labels target + </s>.
    -> (enc ids [B, S], enc mask [B, S], labels [B, T] with -100 on padding)."""
    eos = tok.token_to_id("</s>")
    prompt_ids = ids_of(tok, prompts) if prompts else [[] for _ in targets]
    enc, _ = zip(*[(pre + pr + [eos], None) for pre, pr in zip(prefix, prompt_ids)])
    ids, mask = pad(list(enc), 0)
    lab, _ = pad([t + [eos] for t in ids_of(tok, targets)], -100)
    return ids, mask, lab


def lm_loss(kind: str, lm, embeds, mask, labels) -> torch.Tensor:
    """Next-token loss of a frozen or training LM on input embeddings [B, S, D]."""
    if kind == "opt":
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]  # (B, S-1, V)
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def pretrain(kind: str, lm, tok: Tokenizer, split, steps: int, batch: int, seed: int, log,
             questions: float = 0.75, shuffle: float = 0.5) -> None:
    """Text pretraining with the caption as context (see the module docstring); AdamW, cosine.

    `questions` of each batch are questions, the rest captions (copying the context is learnt in a few
    dozen steps). For OPT three quarters questions: yes/no questions ("is there not a red shape?") are
    learnt late and abruptly (the loss drops from ~0.07 to ~0.001 somewhere after step 400), and 600 steps
    of half questions left one OPT at 93 % on them, which no Q-Former trained through it could then
    exceed.

    A `shuffle` share of the contexts (OPT: half) is the caption with its words in random order. Read in
    caption order only, both LMs answered yes/no from the text perfectly, but a Q-Former prefix trained
    through them got only 85-89 % of the yes/no questions right (captions 99 %; stage-2 loss stuck near
    0.3): what they had learnt to read depended on word positions, which a prefix of 8 query outputs does
    not reproduce. With shuffled contexts OPT's stage-2 loss at step 500 fell from 0.40 to 0.12. T5 gained
    far less from them (train_blip2.py's --t5-lm-* options)."""
    if not 0.0 < questions < 1.0 or not 0.0 <= shuffle <= 1.0:
        raise ValueError(f"pretrain: questions must lie in (0, 1) and shuffle in [0, 1], "
                         f"got {questions}, {shuffle}")
    rng, order = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    captions = split.captions
    rows_of = opt_rows if kind == "opt" else t5_rows
    opt = torch.optim.AdamW(lm.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    lm.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        q = rng.integers(0, len(split.questions), batch)
        img = split.question_image[q]
        ctx = ids_of(tok, [shuffled(captions[i], order, shuffle) for i in img])
        n = batch - round(batch * questions)  # captions first
        a = rows_of(tok, ctx[:n], [captions[i] for i in img[:n]], None)
        b = rows_of(tok, ctx[n:], [split.answers[i] for i in q[n:]], [PROMPT.format(split.questions[i]) for i in q[n:]])
        loss = sum(lm_loss(kind, lm, lm.get_input_embeddings()(ids), mask, lab) for ids, mask, lab in (a, b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"{kind} pretrain step {step + 1} loss {float(loss.detach()) / 2:.4f}")
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)


def shuffled(text: str, rng, share: float = 0.5) -> str:
    """`text` as it is, or (a `share` of the time) its words in a random order. One draw whatever
    the share, so that the generator's stream does not depend on it."""
    words = text.split()
    return text if rng.random() < 1.0 - share else " ".join(words[i] for i in rng.permutation(len(words)))


@torch.no_grad()
def text_accuracy(kind: str, lm, tok: Tokenizer, split, n: int, seed: int) -> dict[str, float]:
    """Greedy answers of the text-only LM to `n` of the split's questions with the image's caption as
    context -> {"yes/no": %, "other": %}: what stage 2 can reach at best (a Q-Former prefix only
    stands in for the caption)."""
    q = np.random.default_rng(seed).choice(len(split.questions), n, replace=False)
    ctx = ids_of(tok, [split.captions[i] for i in split.question_image[q]])
    prompts = [PROMPT.format(split.questions[i]) for i in q]
    eos, pad_id, right = tok.token_to_id("</s>"), tok.token_to_id("<pad>"), {"yes/no": [], "other": []}
    for s in range(0, n, 250):
        if kind == "opt":  # context </s> prompt, left-padded so that generation continues every row
            rows = [c + [eos] + p for c, p in zip(ctx[s: s + 250], ids_of(tok, prompts[s: s + 250]))]
            width = max(map(len, rows))
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              eos_token_id=tok.token_to_id("Ċ"), pad_token_id=pad_id)[:, width:]
        else:
            ids, mask, _ = t5_rows(tok, ctx[s: s + 250], ["x"] * len(ctx[s: s + 250]), prompts[s: s + 250])
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0)
        for i, row in zip(q[s: s + 250], out.tolist()):
            answer = split.answers[i]
            said = tok.decode(row, skip_special_tokens=True).strip()
            right["yes/no" if answer in ("yes", "no") else "other"].append(said == answer)
    return {k: 100.0 * float(np.mean(v)) for k, v in right.items()}
