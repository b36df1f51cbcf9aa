"""Writing the easy-VQA BLIP-2 checkpoints with transformers' save_pretrained: model, generation
config and Blip2Processor (BLIP's 64 px image processor, the LM's tokenizer, num_query_tokens)."""

from __future__ import annotations

from pathlib import Path

import blip2_text as bt


def processor(blip_folder: Path, tokenizer, num_query_tokens: int):
    from transformers import Blip2Processor, BlipImageProcessor

    image = BlipImageProcessor.from_pretrained(blip_folder)  # 64 px, bicubic, BLIP's mean/std
    return Blip2Processor(image_processor=image, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def save_itm(model, out: Path, blip_folder: Path, bert_folder: Path, num_query_tokens: int) -> None:
    """Blip2ForImageTextRetrieval with the shipped BLIP WordPiece tokenizer plus <image> (last id)."""
    from tokenizers import AddedToken
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(bert_folder)
    tok.add_tokens([AddedToken(bt.IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    assert tok.convert_tokens_to_ids(bt.IMAGE_TOKEN) == model.config.image_token_index
    tok.image_token = bt.IMAGE_TOKEN
    model.config.architectures = ["Blip2ForImageTextRetrieval"]
    model.save_pretrained(out)
    processor(blip_folder, tok, num_query_tokens).save_pretrained(out)


def save_lm(model, kind: str, tok, out: Path, blip_folder: Path, num_query_tokens: int) -> None:
    """Blip2ForConditionalGeneration; greedy, at most 20 new tokens, OPT stopping at its "\\n" id."""
    from transformers import GenerationConfig

    text = model.config.text_config
    if kind == "opt":
        gen = GenerationConfig(max_new_tokens=20, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                               pad_token_id=text.pad_token_id, do_sample=False, num_beams=1)
    else:
        gen = GenerationConfig(max_new_tokens=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                               bos_token_id=1, do_sample=False, num_beams=1)
    model.generation_config = gen
    model.language_model.generation_config = gen
    model.config.architectures = ["Blip2ForConditionalGeneration"]
    model.save_pretrained(out)
    processor(blip_folder, bt.hf_tokenizer(tok, kind), num_query_tokens).save_pretrained(out)
