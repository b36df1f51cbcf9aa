"""Test helpers for BLIP-2: tiny transformers Blip2 configs (OPT or Flan-T5-style T5, with `<image>`
tokens or the legacy convention), re-randomized models, and checkpoint folders as public ones are:
save_pretrained of the model and of a Blip2Processor (tokenizer built with the `tokenizers` library)."""

from __future__ import annotations

import torch

WORDS = ("a picture of the an photo cat dog two on with red blue green circle square triangle what is "
         "color shape there in small large left right top bottom and question answer").split()

TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=42, patch_size=14)  # 3x3 patches + class token = 10 image tokens
TINY_QFORMER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=40, max_position_embeddings=64, cross_attention_frequency=2)
NUM_QUERIES = 4
LM_VOCAB = 320  # above the tiny tokenizers' sizes, so their `<image>` id fits
TINY_OPT = dict(model_type="opt", vocab_size=LM_VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                num_attention_heads=4, max_position_embeddings=96, word_embed_proj_dim=32,
                bos_token_id=2, eos_token_id=2, pad_token_id=1)
TINY_T5 = dict(model_type="t5", vocab_size=LM_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
               num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
               tie_word_embeddings=False, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


def opt_tokenizer():
    """A byte-level BPE with OPT's special ids: <s>=0 <pad>=1 </s>=2 <unk>=3."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    # OPT's tokenizer.json prepends </s> (its bos) to every text; an empty prompt is then one token.
    bpe._tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    return transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                          pad_token="<pad>", unk_token="<unk>")


def t5_tokenizer():
    """A Unigram (SentencePiece-style) tokenizer with T5's special ids: <pad>=0 </s>=1 <unk>=2."""
    import transformers
    from tokenizers import SentencePieceUnigramTokenizer

    uni = SentencePieceUnigramTokenizer()
    uni.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                            unk_token="<unk>")
    return transformers.T5TokenizerFast(tokenizer_object=uni._tokenizer, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_ids=0)


def processor(lm: str, num_query_tokens: int | None, image_size: int = TINY_VISION["image_size"]):
    """Blip2Processor: BLIP image processor at `image_size`, the LM's tokenizer, and (when
    num_query_tokens is set) `<image>` tokens expanded in front of each prompt."""
    import transformers

    tok = opt_tokenizer() if lm == "opt" else t5_tokenizer()
    image = transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return transformers.Blip2Processor(image, tok, num_query_tokens=num_query_tokens)


def hf_config(lm: str = "opt", image_tokens: bool = True, vision=TINY_VISION, qformer=TINY_QFORMER,
              num_query_tokens: int = NUM_QUERIES, text_input: bool = False, text_overrides=None, **top):
    """transformers.Blip2Config. image_tokens: image_token_index = the processor's `<image>` id
    (else None, the legacy convention). text_input: the Q-Former's text feed-forward (retrieval)."""
    import transformers

    text = {**(TINY_OPT if lm == "opt" else TINY_T5), **(text_overrides or {})}
    image_token_index = None
    if image_tokens:
        proc = processor(lm, num_query_tokens)
        image_token_index = proc.tokenizer.convert_tokens_to_ids("<image>")
    return transformers.Blip2Config(
        vision_config=dict(vision), qformer_config={**qformer, "use_qformer_text_input": text_input},
        text_config=text, num_query_tokens=num_query_tokens, image_token_index=image_token_index,
        image_text_hidden_size=top.pop("image_text_hidden_size", 12), **top,
    )


@torch.no_grad()
def rerandomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with a spread that makes outputs vary: transformers' own init leaves
    the vision tower near zero (initializer_range 1e-10) and the query tokens at zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("query_tokens"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g) * (5.0 if "embed" in name or "shared" in name else 1.0))
    return model


def make_checkpoint(arch: str, folder, config, seed: int = 0, std: float = 0.05, with_processor: bool = True,
                    untie_head: bool = False, **save_kwargs):
    """Build transformers' `arch` from `config`, re-randomize, save_pretrained it (and its
    Blip2Processor) to `folder`. Returns the transformers model (eval, fp32).

    untie_head: a language-model head of its own, not the input embedding (transformers 5 ties T5's
    always; Flan-T5's files hold a different one), so that a tiny LM does not predict its input."""
    import transformers

    model = getattr(transformers, arch)(config).eval()
    if untie_head:
        head = model.language_model.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    rerandomize(model, seed=seed, std=std)
    model.save_pretrained(folder, **save_kwargs)
    if with_processor:
        lm = "t5" if config.text_config.model_type == "t5" else "opt"
        q = config.num_query_tokens if config.image_token_index is not None else None
        processor(lm, q, config.vision_config.image_size).save_pretrained(folder)
    return model


def pixels(batch: int = 2, size: int = TINY_VISION["image_size"], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def generation_checkpoint(lm: str, folder, image_tokens: bool = True):
    """The tiny Blip2ForConditionalGeneration the generation tests share, saved at `folder`; returns
    the transformers model. Both heads untied: tied to its spread-out embeddings, a tiny LM repeats
    its input."""
    if lm == "opt":
        config = hf_config("opt", image_tokens, text_overrides={"tie_word_embeddings": False})
        return make_checkpoint("Blip2ForConditionalGeneration", folder, config, seed=7, std=0.1)
    return make_checkpoint("Blip2ForConditionalGeneration", folder, hf_config("t5", image_tokens), seed=8, std=0.1,
                           untie_head=True)


def bert_processor(num_query_tokens: int):
    """The retrieval model's processor: BLIP's image processor and a tiny BERT WordPiece tokenizer
    (ids below the Q-Former's 99), `<image>` added by Blip2Processor."""
    import transformers
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=90, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = transformers.BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    size = TINY_VISION["image_size"]
    image = transformers.BlipImageProcessorPil(size={"height": size, "width": size})
    return transformers.Blip2Processor(image, tok, num_query_tokens=num_query_tokens)
