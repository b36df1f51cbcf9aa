"""Measure the shipped easy-VQA checkpoints with the reference PyTorch modules (greedy decoding).

On a split of easy-VQA (the full test split by default):

- VQA accuracy: the greedy answer string equals the data set's answer;
- caption correctness: the greedy caption names the image's colour and shape (and no other);
  exact-caption agreement (size and position too) is printed alongside;
- retrieval R@1 by ITC (cosine of the projected features), image->text over the split's distinct
  captions and text->image over its images, counted right when the retrieved caption / image's
  caption is the query's, or, looser, names the same colour and shape; and after re-ranking
  ITC's top-k by the ITM head, as BLIP retrieves;
- ITM ROC AUC: the ITM head's p(match) of each image's own caption against its hard negatives,
  the same caption with each other colour (same shape) and with each other shape (same colour),
  per kind and both together, pooled over the split (one threshold for every image).

With `--transformers N` the first N test images also go through transformers' BlipProcessor and
`generate` / ITM forward on the same folders, and must give the same text and scores.

    python training/evaluate_reference.py --models blip_export/models [--transformers 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from blip_export import load_model  # noqa: E402
from data import COLORS, SHAPES, caption, caption_correct, load_split  # noqa: E402

NEGATIVE_KINDS = ("colour", "shape")  # the hard negatives ITM must separate from the right caption


def preprocess(images: np.ndarray, folder: Path) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, S, S] as BlipImageProcessor: PIL bicubic resize to S
    (not needed for 64 px images at 64 px), rescale by 1/255, normalize with the config's mean/std."""
    from PIL import Image

    from blip_runtime.processor_config import image_processor_config

    pre, _ = image_processor_config(folder)  # processor_config.json (save_checkpoint) or preprocessor_config.json
    if pre is None:
        raise FileNotFoundError(f"{folder}: no processor_config.json or preprocessor_config.json")
    h, w = pre["size"]["height"], pre["size"]["width"]
    if images.shape[1:3] != (h, w):
        images = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images])
    x = images.astype(np.float64) * pre["rescale_factor"]
    x = (x.astype(np.float32) - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class Text:
    """tokenizer.json through the tokenizers library: [CLS] ... [SEP] rows, right-padded."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids for e in self.tok.encode_batch(texts)]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def greedy(decoder, cross, bos: int, sep: int, batch: int, max_new_tokens: int, cross_mask=None) -> list[list[int]]:
    """Greedy decoding from [DEC] with the KV cache; cross K/V computed once. -> ids up to [SEP]."""
    ids = torch.full((batch, 1), bos, dtype=torch.long)
    past, out = None, []
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        mask = torch.ones(batch, step + 1, dtype=torch.long)
        logits, past = decoder(ids, mask, encoder_attention_mask=cross_mask, past_key_values=past,
                               cross_key_values=cross)
        ids = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(ids[:, 0])
        done |= ids[:, 0] == sep
        if bool(done.all()):
            break
    tokens = torch.stack(out, 1).tolist()
    return [row[: row.index(sep)] if sep in row else row for row in tokens]


@torch.no_grad()
def captions(model, pixels: torch.Tensor, text: Text, cfg, chunk: int = 250) -> list[str]:
    result = []
    for i in range(0, len(pixels), chunk):
        embeds, _ = model.vision_model(pixels[i : i + chunk])
        cross = model.text_decoder.bert.cross_key_values(embeds)
        rows = greedy(model.text_decoder, cross, cfg.text.bos_token_id, cfg.text.sep_token_id, len(embeds), 20)
        result += [text.decode(r) for r in rows]
    return result


@torch.no_grad()
def answers(model, pixels: torch.Tensor, questions, question_image, text: Text, cfg, chunk: int = 500) -> list[str]:
    embeds_all = torch.cat([model.vision_model(pixels[i : i + 250])[0] for i in range(0, len(pixels), 250)])
    result = []
    for i in range(0, len(questions), chunk):
        ids, mask = text.encode(list(questions[i : i + chunk]))
        states, _, _ = model.text_encoder(ids, mask, encoder_hidden_states=embeds_all[question_image[i : i + chunk]])
        cross = model.text_decoder.bert.cross_key_values(states)
        rows = greedy(model.text_decoder, cross, cfg.text.bos_token_id, cfg.text.sep_token_id, len(ids), 5,
                      cross_mask=mask)
        result += [text.decode(r) for r in rows]
    return result


@torch.no_grad()
def retrieval(model, pixels, image_captions: list[str], colors, shapes, text: Text, top_k: int) -> dict:
    """R@1 by ITC and by ITM re-ranking of ITC's top_k, image->text over distinct captions and
    text->image over images."""
    texts = sorted(set(image_captions))
    embeds = torch.cat([model.vision_model(pixels[i : i + 250])[0] for i in range(0, len(pixels), 250)])
    image_feat = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
    ids, mask = text.encode(texts)
    states, _, _ = model.text_encoder(ids, mask)
    text_feat = F.normalize(model.text_proj(states[:, 0]), dim=-1)
    sim = image_feat @ text_feat.t()  # (images, texts)

    def itm(image_rows, text_rows):
        cross = model.text_encoder.cross_key_values(embeds)
        scores = []
        for s in range(0, len(image_rows), 2000):
            ir, tr = image_rows[s : s + 2000], text_rows[s : s + 2000]
            out, _, _ = model.text_encoder(ids[tr], mask[tr], cross_key_values=[(k[ir], v[ir]) for k, v in cross])
            scores.append(model.itm_head(out[:, 0]).softmax(-1)[:, 1])
        return torch.cat(scores)

    k = min(top_k, len(texts))
    i2t_itc = sim.argmax(1)
    cand = sim.topk(k, dim=1).indices  # (images, k)
    scores = itm(torch.arange(len(pixels)).repeat_interleave(k), cand.flatten()).view(-1, k)
    i2t_itm = cand.gather(1, scores.argmax(1, keepdim=True))[:, 0]
    k_img = min(top_k, len(pixels))
    t2i_itc = sim.argmax(0)
    cand = sim.t().topk(k_img, dim=1).indices  # (texts, k)
    scores = itm(cand.flatten(), torch.arange(len(texts)).repeat_interleave(k_img)).view(-1, k_img)
    t2i_itm = cand.gather(1, scores.argmax(1, keepdim=True))[:, 0]

    def pct(xs):
        return 100.0 * float(np.mean(xs))

    out = {}
    for name, i2t, t2i in (("itc", i2t_itc, t2i_itc), ("itm_rerank", i2t_itm, t2i_itm)):
        out[f"i2t_r1_{name}"] = pct([texts[t] == c for t, c in zip(i2t.tolist(), image_captions)])
        out[f"i2t_r1_{name}_color_shape"] = pct(
            [caption_correct(texts[t], c, s) for t, c, s in zip(i2t.tolist(), colors, shapes)])
        out[f"t2i_r1_{name}"] = pct([image_captions[n] == t for n, t in zip(t2i.tolist(), texts)])
        out[f"t2i_r1_{name}_color_shape"] = pct(
            [caption_correct(t, colors[n], shapes[n]) for n, t in zip(t2i.tolist(), texts)])
    out["texts"], out["images"] = len(texts), len(pixels)
    return out


def hard_negative_pairs(split) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Each image's caption and its hard negatives: the caption with each other colour (same shape,
    size, position) and with each other shape (same colour).

    -> image index int64 [P], caption [P], kind str [P] ("match", "colour" or "shape"); P = 10 N."""
    rows, texts, kinds = [], [], []
    for n, (c, s, z, p) in enumerate(zip(split.colors, split.shapes, split.sizes, split.positions)):
        pairs = [(caption(c, s, z, p), "match")]
        pairs += [(caption(other, s, z, p), "colour") for other in COLORS if other != c]
        pairs += [(caption(c, other, z, p), "shape") for other in SHAPES if other != s]
        for text, kind in pairs:
            rows.append(n)
            texts.append(text)
            kinds.append(kind)
    return np.array(rows, np.int64), texts, np.array(kinds)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of scores float [P] (label 1) against [N] (label 0): the probability that a random
    positive outscores a random negative, ties counting half (Mann-Whitney U over mid-ranks)."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied scores share their mean rank
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def itm_auc(p_match: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """p(match) float [P] over hard_negative_pairs -> {"itm_auc_colour", "itm_auc_shape", "itm_auc"}."""
    positive = p_match[kinds == "match"]
    out = {f"itm_auc_{kind}": roc_auc(positive, p_match[kinds == kind]) for kind in NEGATIVE_KINDS}
    out["itm_auc"] = roc_auc(positive, p_match[kinds != "match"])
    return out


@torch.no_grad()
def itm_hard_negatives(model, pixels: torch.Tensor, split, text: Text, chunk: int = 2000) -> dict[str, float]:
    """ITM ROC AUC (see itm_auc) of a BlipForImageTextRetrieval over pixels [N, 3, S, S] of `split`."""
    rows, texts, kinds = hard_negative_pairs(split)
    embeds = torch.cat([model.vision_model(pixels[i : i + 250])[0] for i in range(0, len(pixels), 250)])
    cross = model.text_encoder.cross_key_values(embeds)  # per layer (N, H, P, Dh)
    scores = []
    for s in range(0, len(rows), chunk):
        ids, mask = text.encode(texts[s : s + chunk])
        r = torch.from_numpy(rows[s : s + chunk])
        out, _, _ = model.text_encoder(ids, mask, cross_key_values=[(k[r], v[r]) for k, v in cross])
        scores.append(model.itm_head(out[:, 0]).softmax(-1)[:, 1])
    return itm_auc(torch.cat(scores).numpy(), kinds)


def check_transformers(models: Path, split, ours_captions, ours_answers, n_images: int) -> None:
    """transformers' BlipProcessor + generate / ITM on the same folders must agree with ours."""
    import transformers
    from PIL import Image

    folders = {k: models / f"easyvqa-{k}" for k in ("caption", "vqa", "itm")}
    cap = transformers.BlipForConditionalGeneration.from_pretrained(folders["caption"]).eval()
    vqa = transformers.BlipForQuestionAnswering.from_pretrained(folders["vqa"]).eval()
    itm = transformers.BlipForImageTextRetrieval.from_pretrained(folders["itm"]).eval()
    ours_itm, _ = load_model(folders["itm"])
    proc = transformers.BlipProcessor.from_pretrained(folders["caption"])
    for n in range(n_images):
        image = Image.fromarray(split.images[n])
        inputs = proc(images=image, return_tensors="pt")
        assert torch.equal(inputs.pixel_values, preprocess(split.images[n : n + 1], folders["caption"])), \
            "BlipProcessor pixel values differ from ours"
        with torch.no_grad():
            text = proc.decode(cap.generate(**inputs, max_new_tokens=20)[0], skip_special_tokens=True)
        print(f"image {n}: transformers caption {text!r}, ours {ours_captions[n]!r}")
        assert text == ours_captions[n], "captions differ"
        for q in np.nonzero(split.question_image == n)[0]:
            inputs = proc(images=image, text=split.questions[q], return_tensors="pt")
            with torch.no_grad():
                answer = proc.decode(vqa.generate(**inputs, max_new_tokens=5)[0], skip_special_tokens=True)
            print(f"  {split.questions[q]!r}: transformers {answer!r}, ours {ours_answers[q]!r}")
            assert answer == ours_answers[q], "answers differ"
        inputs = proc(images=image, text=[ours_captions[n], "a large green triangle at the top"], padding=True,
                      return_tensors="pt")
        with torch.no_grad():
            theirs = itm(**{k: v for k, v in inputs.items()}, use_itm_head=True).itm_score.softmax(-1)[:, 1]
            ours = ours_itm.itm_logits(inputs.pixel_values.expand(2, -1, -1, -1), inputs.input_ids,
                                       inputs.attention_mask).softmax(-1)[:, 1]
        print(f"  ITM match probability, transformers {theirs.tolist()}, ours {ours.tolist()}")
        assert torch.allclose(theirs, ours, atol=1e-5), "ITM scores differ"


def limit(split, n: int):
    """The first n images of `split` and their questions."""
    import dataclasses

    keep = np.nonzero(split.question_image < n)[0]
    return dataclasses.replace(
        split, image_ids=split.image_ids[:n], images=split.images[:n], colors=split.colors[:n],
        shapes=split.shapes[:n], sizes=split.sizes[:n], positions=split.positions[:n],
        questions=tuple(split.questions[q] for q in keep), answers=tuple(split.answers[q] for q in keep),
        question_image=split.question_image[keep])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "blip_export" / "models")
    ap.add_argument("--split", default="test")
    ap.add_argument("--top-k", type=int, default=16, help="ITC candidates the ITM head re-ranks")
    ap.add_argument("--transformers", type=int, default=0, metavar="N",
                    help="also check the first N images end to end with transformers")
    ap.add_argument("--limit", type=int, help="only the first N images of the split (and their questions)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    split = load_split(args.split)
    if args.limit:
        split = limit(split, args.limit)
    results = {"split": args.split}

    model, cfg = load_model(args.models / "easyvqa-caption")
    text = Text(args.models / "easyvqa-caption")
    pixels = preprocess(split.images, args.models / "easyvqa-caption")
    caps = captions(model, pixels, text, cfg)
    refs = split.captions
    results["caption_correct"] = 100.0 * np.mean([caption_correct(c, col, s) for c, col, s in
                                                  zip(caps, split.colors, split.shapes)])
    results["caption_exact"] = 100.0 * np.mean([c == r for c, r in zip(caps, refs)])
    wrong = [(n, caps[n], refs[n]) for n in range(len(caps)) if not caption_correct(caps[n], split.colors[n], split.shapes[n])]
    print(f"captions: {results['caption_correct']:.2f}% correct (colour and shape), "
          f"{results['caption_exact']:.2f}% exact; wrong e.g. {wrong[:5]}", flush=True)

    model, cfg = load_model(args.models / "easyvqa-vqa")
    preds = answers(model, pixels, split.questions, split.question_image, Text(args.models / "easyvqa-vqa"), cfg)
    right = np.array([p == a for p, a in zip(preds, split.answers)])
    results["vqa_accuracy"] = 100.0 * right.mean()
    kinds = np.array(["yes/no" if a in ("yes", "no") else "what" for a in split.answers])
    for kind in ("yes/no", "what"):
        results[f"vqa_accuracy_{kind}"] = 100.0 * right[kinds == kind].mean()
    wrong = [(split.questions[q], preds[q], split.answers[q]) for q in np.nonzero(~right)[0][:5]]
    print(f"VQA: {results['vqa_accuracy']:.2f}% of {len(preds)} (yes/no {results['vqa_accuracy_yes/no']:.2f}%, "
          f"what {results['vqa_accuracy_what']:.2f}%); wrong e.g. {wrong}", flush=True)

    model, cfg = load_model(args.models / "easyvqa-itm")
    results.update(retrieval(model, pixels, list(refs), split.colors, split.shapes,
                             Text(args.models / "easyvqa-itm"), args.top_k))
    print("retrieval R@1 (%): " + ", ".join(f"{k} {v:.2f}" for k, v in results.items() if "_r1_" in k), flush=True)
    results.update(itm_hard_negatives(model, pixels, split, Text(args.models / "easyvqa-itm")))
    print("ITM ROC AUC against hard negatives: " + ", ".join(
        f"{k} {v:.4f}" for k, v in results.items() if k.startswith("itm_auc")), flush=True)
    results["seconds"] = time.time() - start
    print(f"evaluated in {results['seconds']:.0f}s")
    if args.transformers:
        check_transformers(args.models, split, caps, preds, args.transformers)
        print(f"transformers agrees on {args.transformers} image(s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
