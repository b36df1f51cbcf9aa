"""Accuracy of the shipped easy-VQA BLIP-2 checkpoints in transformers (fp32, greedy) on a split.

- VQA (easyvqa-blip2-opt, easyvqa-blip2-t5): Blip2Processor(image, "Question: {q} Answer:") and
  `generate`; right when the new text, stripped, is the answer.
- Captions (same models, no prompt): correct when they name the image's colour and shape and no
  other (training/data.py caption_correct, as training/evaluate.py judges); exact when equal to the
  image's caption.
- ITC R@1 (easyvqa-blip2-itm, Blip2ForImageTextRetrieval's contrastive scores): image->text over the
  split's distinct captions and text->image over its images, right when the retrieved caption names
  the query's colour and shape.
- ITM (same model, its matching head): ROC AUC of p(match) of each image's caption against the same
  caption with another colour, and with another shape (the hard negatives of its training).

The same numbers through exported ONNX Runtime bundles with --engines: the three fp32 bundles are
exported there (where missing) and run by blip_runtime with the same images, prompts and texts.

    python training/evaluate_blip2.py [--models DIR] [--engines DIR] [--limit N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))

from data import COLORS, SHAPES, caption_correct, load_split  # noqa: E402

PROMPT = "Question: {} Answer:"
NAMES = ("easyvqa-blip2-opt", "easyvqa-blip2-t5", "easyvqa-blip2-itm")


def load(folder: Path, cls_name: str):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.Blip2Processor.from_pretrained(folder)


def new_text(model, processor, out: torch.Tensor, prompt_len: int) -> list[str]:
    """Generated ids -> text: a decoder-only LM's output repeats its input first."""
    if model.config.use_decoder_only_language_model:
        out = out[:, prompt_len:]
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


def captions(model, processor, images, batch: int) -> list[str]:
    texts = []
    for i in range(0, len(images), batch):
        inputs = processor(images=list(images[i: i + batch]), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs)
        # without a prompt generate starts from num_query_tokens image ids + bos
        texts += new_text(model, processor, out, model.config.num_query_tokens + 1)
    return texts


def answers(model, processor, images, questions, batch: int) -> list[str]:
    texts = []
    for i in range(0, len(questions), batch):
        inputs = processor(images=list(images[i: i + batch]), text=[PROMPT.format(q) for q in questions[i: i + batch]],
                           padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs)
        texts += new_text(model, processor, out, inputs["input_ids"].shape[1])
    return texts


def itc_similarity(model, processor, images, texts: list[str], batch: int) -> np.ndarray:
    """float [images, texts]: the best query's cosine similarity, as Blip2ForImageTextRetrieval scores."""
    rows = []
    for i in range(0, len(images), batch):
        inputs = processor(images=list(images[i: i + batch]), text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**inputs, use_image_text_matching_head=False).logits_per_image.numpy())
    return np.concatenate(rows)


def hard_negatives(split) -> tuple[list[int], list[str], list[str]]:
    """Per image: its caption (kind "match"), the caption with the next colour ("colour") and with
    the next shape ("shape"). -> (image index per pair, texts, kinds)."""
    rows, texts, kinds = [], [], []
    for n, (cap, col, shape) in enumerate(zip(split.captions, split.colors, split.shapes)):
        other_col = COLORS[(COLORS.index(col) + 1) % len(COLORS)]
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        for kind, text in (("match", cap), ("colour", cap.replace(f" {col} ", f" {other_col} ")),
                           ("shape", cap.replace(f" {shape} ", f" {other_shape} "))):
            rows.append(n)
            texts.append(text)
            kinds.append(kind)
    return rows, texts, kinds


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / (P N))."""
    above = (positive[:, None] > negative[None, :]).mean()
    return float(above + 0.5 * (positive[:, None] == negative[None, :]).mean())


def itm_aucs(p_match: np.ndarray, kinds: list[str]) -> dict[str, float]:
    kinds = np.array(kinds)
    pos = p_match[kinds == "match"]
    return {f"itm_auc_{k}": roc_auc(pos, p_match[kinds == k]) for k in ("colour", "shape")}


def lm_scores(caps: list[str], ans: list[str], split, start: float) -> dict:
    return {
        "vqa_accuracy": 100.0 * np.mean([a == b for a, b in zip(ans, split.answers)]),
        "vqa_yes_no": 100.0 * np.mean([a == b for a, b in zip(ans, split.answers) if b in ("yes", "no")]),
        "caption_correct": 100.0 * np.mean([caption_correct(c, col, s)
                                            for c, col, s in zip(caps, split.colors, split.shapes)]),
        "caption_exact": 100.0 * np.mean([c == r for c, r in zip(caps, split.captions)]),
        "examples": [[split.questions[q], ans[q]] for q in range(3)] + caps[:3],
        "seconds": time.time() - start,
    }


def itm_scores(sim: np.ndarray, texts: list[str], p_match: np.ndarray, kinds: list[str], split, start: float) -> dict:
    """sim float [images, texts] (ITC), p_match float [pairs] over hard_negatives(split)."""
    return {
        "i2t_r1": 100.0 * np.mean([caption_correct(texts[t], c, s)
                                   for t, c, s in zip(sim.argmax(1), split.colors, split.shapes)]),
        "t2i_r1": 100.0 * np.mean([caption_correct(t, split.colors[n], split.shapes[n])
                                   for n, t in zip(sim.argmax(0), texts)]),
        **itm_aucs(p_match, kinds),
        "seconds": time.time() - start,
    }


def evaluate(models: Path, split, batch: int = 64) -> dict[str, dict]:
    """transformers on the checkpoints in `models` -> {name: scores}."""
    res = {}
    qi = split.question_image
    for name in NAMES[:2]:
        start = time.time()
        model, proc = load(models / name, "Blip2ForConditionalGeneration")
        caps = captions(model, proc, split.images, batch)
        ans = answers(model, proc, split.images[qi], list(split.questions), batch)
        res[name] = lm_scores(caps, ans, split, start)
        print(name, json.dumps(res[name]), flush=True)
    start = time.time()
    model, proc = load(models / NAMES[2], "Blip2ForImageTextRetrieval")
    texts = sorted(set(split.captions))
    sim = itc_similarity(model, proc, split.images, texts, batch)
    rows, pair_texts, kinds = hard_negatives(split)
    p_match = []
    for i in range(0, len(rows), batch):
        inputs = proc(images=list(split.images[rows[i: i + batch]]), text=pair_texts[i: i + batch], padding=True,
                      return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs, use_image_text_matching_head=True).logits_per_image  # (B, 2)
        p_match.append(logits.softmax(-1)[:, 1].numpy())
    res[NAMES[2]] = itm_scores(sim, texts, np.concatenate(p_match), kinds, split, start)
    print(NAMES[2], json.dumps(res[NAMES[2]]), flush=True)
    return res


def export_bundles(models: Path, engines: Path) -> dict[str, Path]:
    """name -> fp32 ONNX Runtime bundle of each checkpoint, exported into `engines` where missing."""
    from blip_export.pipeline import export

    out = {}
    for name in NAMES:
        out[name] = engines / f"{name}-fp32"
        if not (out[name] / "manifest.json").is_file():
            print(f"exporting {name} fp32", flush=True)
            export(models / name, out[name])
    return out


def evaluate_bundles(bundles: dict[str, Path], split, batch: int = 64) -> dict[str, dict]:
    """blip_runtime on the bundles (name -> folder, as export_bundles) -> {name: scores}, the same
    scores as `evaluate`."""
    from blip_runtime import BlipRuntime

    res, images, qi = {}, list(split.images), split.question_image
    for name in NAMES[:2]:
        start = time.time()
        rt = BlipRuntime.load(bundles[name])
        caps = [c.strip() for i in range(0, len(images), batch) for c in rt.caption(images[i: i + batch])]
        ans = [a.strip() for i in range(0, len(qi), batch)
               for a in rt.answer([images[n] for n in qi[i: i + batch]], list(split.questions[i: i + batch]))]
        res[name] = lm_scores(caps, ans, split, start)
        print(name, "bundle", json.dumps(res[name]), flush=True)
    start = time.time()
    rt = BlipRuntime.load(bundles[NAMES[2]])
    texts = sorted(set(split.captions))
    image_feat = np.concatenate([rt.image_features(images[i: i + batch]) for i in range(0, len(images), batch)])
    text_feat = np.concatenate([rt.text_features(texts[i: i + batch]) for i in range(0, len(texts), batch)])
    rows, pair_texts, kinds = hard_negatives(split)
    p_match = np.concatenate([rt.match([images[n] for n in rows[i: i + batch]], pair_texts[i: i + batch])
                              for i in range(0, len(rows), batch)])
    res[NAMES[2]] = itm_scores(rt.similarity(image_feat, text_feat), texts, p_match, kinds, split, start)
    print(NAMES[2], "bundle", json.dumps(res[NAMES[2]]), flush=True)
    return res


COLUMNS = {"vqa_accuracy": "VQA accuracy %", "vqa_yes_no": "VQA yes/no %", "caption_correct": "captions correct %",
           "caption_exact": "captions exact %", "i2t_r1": "ITC R@1 i→t %", "t2i_r1": "ITC R@1 t→i %",
           "itm_auc_colour": "ITM AUC other colour", "itm_auc_shape": "ITM AUC other shape"}


def table(res: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, r in res.items():
        cells = ["" if r.get(k) is None else f"{r[k]:.4f}" if k.startswith("itm_auc") else f"{r[k]:.2f}"
                 for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "blip_export" / "models")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="only the first N images (and their questions)")
    ap.add_argument("--engines", type=Path, help="also export fp32 bundles here (where missing) and evaluate them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_split(args.split)
    if args.limit:
        import evaluate_reference as ref

        split = ref.limit(split, args.limit)
    res = {f"{name} (transformers)": r for name, r in evaluate(args.models, split).items()}
    if args.engines:
        bundles = export_bundles(args.models, args.engines)
        res.update({f"{name} (ONNX Runtime fp32)": r for name, r in evaluate_bundles(bundles, split).items()})
    print(f"easy-VQA {args.split}: {len(split.images)} images, {len(split.questions)} questions\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
