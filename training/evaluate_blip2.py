"""Accuracy of the shipped easy-VQA BLIP-2 checkpoints in transformers (fp32, greedy) on a split.

- VQA (easyvqa-blip2-opt, easyvqa-blip2-t5): Blip2Processor(image, "Question: {q} Answer:") and
  `generate`; right when the new text, stripped, is the answer.
- Captions (same models, no prompt): correct when they name the image's colour and shape and no
  other (training/data.py caption_correct, as training/evaluate.py judges); exact when equal to the
  image's caption.
- ITC R@1 (easyvqa-blip2-itm, Blip2ForImageTextRetrieval's contrastive scores): image->text over the
  split's distinct captions and text->image over its images, right when the retrieved caption names
  the query's colour and shape.

    python training/evaluate_blip2.py [--models DIR] [--limit N] [--json FILE]
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

from data import caption_correct, load_split  # noqa: E402

PROMPT = "Question: {} Answer:"


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


def evaluate(models: Path, split, batch: int = 64) -> dict[str, dict]:
    res = {}
    qi = split.question_image
    for name in ("easyvqa-blip2-opt", "easyvqa-blip2-t5"):
        start = time.time()
        model, proc = load(models / name, "Blip2ForConditionalGeneration")
        caps = captions(model, proc, split.images, batch)
        ans = answers(model, proc, split.images[qi], list(split.questions), batch)
        res[name] = {
            "vqa_accuracy": 100.0 * np.mean([a == b for a, b in zip(ans, split.answers)]),
            "caption_correct": 100.0 * np.mean([caption_correct(c, col, s)
                                                for c, col, s in zip(caps, split.colors, split.shapes)]),
            "caption_exact": 100.0 * np.mean([c == r for c, r in zip(caps, split.captions)]),
            "examples": [[split.questions[q], ans[q]] for q in range(3)] + caps[:3],
            "seconds": time.time() - start,
        }
        print(name, json.dumps(res[name]), flush=True)
    start = time.time()
    model, proc = load(models / "easyvqa-blip2-itm", "Blip2ForImageTextRetrieval")
    texts = sorted(set(split.captions))
    sim = itc_similarity(model, proc, split.images, texts, batch)
    res["easyvqa-blip2-itm"] = {
        "i2t_r1": 100.0 * np.mean([caption_correct(texts[t], c, s)
                                   for t, c, s in zip(sim.argmax(1), split.colors, split.shapes)]),
        "t2i_r1": 100.0 * np.mean([caption_correct(t, split.colors[n], split.shapes[n])
                                   for n, t in zip(sim.argmax(0), texts)]),
        "seconds": time.time() - start,
    }
    print("easyvqa-blip2-itm", json.dumps(res["easyvqa-blip2-itm"]), flush=True)
    return res


def table(res: dict[str, dict]) -> str:
    lines = ["| model | VQA accuracy % | captions correct % | captions exact % | ITC R@1 i→t % | ITC R@1 t→i % |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        cells = [r.get(k) for k in ("vqa_accuracy", "caption_correct", "caption_exact", "i2t_r1", "t2i_r1")]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "blip_export" / "models")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="only the first N images (and their questions)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_split(args.split)
    if args.limit:
        import evaluate_reference as ref

        split = ref.limit(split, args.limit)
    res = evaluate(args.models, split)
    print(f"easy-VQA {args.split}: {len(split.images)} images, {len(split.questions)} questions\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
