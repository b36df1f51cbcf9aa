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

The same numbers through exported ONNX Runtime bundles with --engines: the three bundles of each
--precisions form (default fp32) are exported there where missing, named "{model}-{form}" ("int8"
is written as int8-cpu, the form it resolves to on --target onnx), and run by blip_runtime with the
same images, prompts and texts. int4 applies to the two generation models only: its 4-bit form is
for the decoding loop's step graphs, which the ITM model has none of, so pipeline's int4 of it would
be its int8-cpu graphs again (precision.convert_bundle: the graphs of many rows as int8-cpu).

    python training/evaluate_blip2.py [--models DIR] [--engines DIR] [--precisions fp32,fp16,int8,int8-qdq,int4]
                                      [--limit N] [--json FILE]
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


def bundle_names(precision: str) -> tuple[str, ...]:
    """The checkpoints a bundle of `precision` is made of: int4's 4-bit form is for step graphs only."""
    return NAMES[:2] if precision == "int4" else NAMES


def export_bundles(models: Path, engines: Path, precision: str = "fp32") -> dict[str, Path]:
    """name -> ONNX Runtime bundle of `precision` of each checkpoint (bundle_names), exported into
    `engines` as "{name}-{form}" where missing (form: pipeline.resolve_precision, "int8" -> "int8-cpu")."""
    from blip_export.pipeline import export, resolve_precision

    form, out = resolve_precision(precision, "onnx"), {}
    for name in bundle_names(precision):
        out[name] = engines / f"{name}-{form}"
        if not (out[name] / "manifest.json").is_file():
            print(f"exporting {name} {form}", flush=True)
            start = time.time()
            export(models / name, out[name], precision=precision)
            print(f"exported {name} {form} in {time.time() - start:.0f} s", flush=True)
    return out


def evaluate_bundles(bundles: dict[str, Path], split, batch: int = 64) -> dict[str, dict]:
    """blip_runtime on the bundles (name -> folder, as export_bundles) -> {name: scores}, the same
    scores as `evaluate`."""
    from blip_runtime import BlipRuntime

    res, images, qi = {}, list(split.images), split.question_image
    for name in NAMES[:2]:
        if name not in bundles:
            continue
        start = time.time()
        rt = BlipRuntime.load(bundles[name])
        caps = [c.strip() for i in range(0, len(images), batch) for c in rt.caption(images[i: i + batch])]
        ans = [a.strip() for i in range(0, len(qi), batch)
               for a in rt.answer([images[n] for n in qi[i: i + batch]], list(split.questions[i: i + batch]))]
        res[name] = lm_scores(caps, ans, split, start)
        print(bundles[name].name, json.dumps(res[name]), flush=True)
    if NAMES[2] not in bundles:
        return res
    start = time.time()
    rt = BlipRuntime.load(bundles[NAMES[2]])
    texts = sorted(set(split.captions))
    image_feat = np.concatenate([rt.image_features(images[i: i + batch]) for i in range(0, len(images), batch)])
    text_feat = np.concatenate([rt.text_features(texts[i: i + batch]) for i in range(0, len(texts), batch)])
    rows, pair_texts, kinds = hard_negatives(split)
    p_match = np.concatenate([rt.match([images[n] for n in rows[i: i + batch]], pair_texts[i: i + batch])
                              for i in range(0, len(rows), batch)])
    res[NAMES[2]] = itm_scores(rt.similarity(image_feat, text_feat), texts, p_match, kinds, split, start)
    print(bundles[NAMES[2]].name, json.dumps(res[NAMES[2]]), flush=True)
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


# The by-precision table's columns per model: the scores a reduced form must keep within BAR of fp32.
PRECISION_COLUMNS = {NAMES[0]: ("vqa_accuracy", "caption_correct"), NAMES[1]: ("vqa_accuracy", "caption_correct"),
                     NAMES[2]: ("i2t_r1", "t2i_r1", "itm_auc_colour", "itm_auc_shape")}
BAR = 1.0  # points: percent for the % scores, 100 x AUC for the AUCs


def points(key: str, value: float) -> float:
    return 100.0 * value if key.startswith("itm_auc") else value


def misses(by_form: dict[str, dict[str, dict]]) -> list[str]:
    """The scores of a reduced form more than BAR points below fp32's, one line each (none without fp32)."""
    base, out = by_form.get("fp32"), []
    for form, res in by_form.items():
        for name, r in res.items() if base and form != "fp32" else ():
            for k in PRECISION_COLUMNS[name]:
                drop = points(k, base[name][k]) - points(k, r[k])
                if drop > BAR:
                    out.append(f"{name} {form} {COLUMNS[k]}: {r[k]:.4g} vs fp32 {base[name][k]:.4g} ({drop:.2f} points)")
    return out


def precision_table(by_form: dict[str, dict[str, dict]]) -> str:
    """One row per model and score, one column per form ({form: {name: scores}}, as main builds it);
    a reduced form's cell carries its difference from fp32 (in the score's own unit), "-" where the form
    has no bundle."""
    forms = list(by_form)
    lines = ["| model | score | " + " | ".join(forms) + " |", "|" + " --- |" * (len(forms) + 2)]
    for name, keys in PRECISION_COLUMNS.items():
        for k in keys:
            cells = []
            for form in forms:
                r, base = by_form[form].get(name), by_form.get("fp32", {}).get(name)
                if r is None:
                    cells.append("-")
                    continue
                auc = k.startswith("itm_auc")
                cell = f"{r[k]:.4f}" if auc else f"{r[k]:.2f}"
                if base is not None and form != "fp32":
                    cell += f" ({r[k] - base[k]:+.4f})" if auc else f" ({r[k] - base[k]:+.2f})"
                cells.append(cell)
            lines.append(f"| {name} | {COLUMNS[k]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "blip_export" / "models")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="only the first N images (and their questions)")
    ap.add_argument("--engines", type=Path, help="also export bundles here (where missing) and evaluate them")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated bundle precisions for --engines (fp32, fp16, int8, int8-cpu, int8-qdq, int4)")
    ap.add_argument("--no-transformers", action="store_true", help="only the bundles (with --engines)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_split(args.split)
    if args.limit:
        import evaluate_reference as ref

        split = ref.limit(split, args.limit)
    from blip_export.files import ExportError
    from blip_export.pipeline import resolve_precision

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        forms = [resolve_precision(p, "onnx") for p in precisions]
    except ExportError as e:  # the pipeline's one line: which name, which were expected
        ap.error(str(e))
    if args.no_transformers and not args.engines:
        ap.error("--no-transformers: expected --engines too (there is nothing else to evaluate)")
    res = {} if args.no_transformers else {f"{name} (transformers)": r for name, r in evaluate(args.models, split).items()}
    by_form = {}
    for precision, form in zip(precisions, forms) if args.engines else ():
        bundles = export_bundles(args.models, args.engines, precision)
        by_form[form] = evaluate_bundles(bundles, split)
        res.update({f"{name} (ONNX Runtime {form})": r for name, r in by_form[form].items()})
    print(f"easy-VQA {args.split}: {len(split.images)} images, {len(split.questions)} questions\n")
    print(table(res))
    if len(by_form) > 1:
        print(precision_table(by_form))
        res["by_precision"] = {"table": precision_table(by_form), "misses": misses(by_form)}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
