"""Evaluate the shipped easy-VQA models on the test split: the reference PyTorch modules and every
exported bundle (ONNX fp32 and each reduced precision), as one table.

Metrics (as training/evaluate_reference.py defines them): VQA accuracy (exact answer string),
caption correctness (the caption names the image's colour and shape and no other), and ITC
retrieval R@1 image->text over the split's distinct captions and text->image over its images
(counted right when the retrieved caption names the query's colour and shape), and the ITM head's
ROC AUC of p(match) for each image's caption against the same caption with another colour and with
another shape (each kind, and both together).

    python training/evaluate.py [--precisions fp32 int8-qdq fp16 int8-cpu] [--limit N] [--out table.md]

Bundles are exported (or converted) into --engines first when missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the packages, also when not pip-installed
sys.path.insert(0, str(ROOT / "training"))

from data import caption_correct, load_split  # noqa: E402

MODELS = ("easyvqa-caption", "easyvqa-vqa", "easyvqa-itm")


def ensure_bundles(engines: Path, precision: str) -> dict[str, Path]:
    """name -> bundle folder of `precision`, exporting whatever is missing or was exported from other
    weights than the shipped checkpoint's (the manifest's source checksum differs)."""
    from blip_export.bundle import folder_checksum
    from blip_export.defaults import default_models
    from blip_export.pipeline import export, resolve_precision

    out = {}
    for name, folder in default_models("blip").items():
        dest = engines / f"{name}-{resolve_precision(precision)}"  # "int8" is int8-cpu's folder
        manifest = dest / "manifest.json"
        source = json.loads(manifest.read_text()).get("build", {}).get("source_sha256") if manifest.is_file() else None
        if source != folder_checksum(folder):
            print(f"exporting {name} {precision}{' (stale bundle)' if source else ''}", flush=True)
            export(folder, dest, precision=precision)
        out[name] = dest
    return out


def batched(fn, items, size):
    out = []
    for i in range(0, len(items), size):
        out.extend(fn(items[i : i + size]))
    return out


def evaluate_bundles(bundles: dict[str, Path], split, batch: int = 64) -> dict:
    import evaluate_reference as ref
    from blip_runtime import BlipRuntime

    images = list(split.images)
    res = {}
    start = time.time()
    rt = BlipRuntime.load(bundles["easyvqa-caption"])
    caps = batched(lambda xs: rt.caption(xs), images, batch)
    res["caption_correct"] = 100.0 * np.mean([caption_correct(c, col, s) for c, col, s in
                                              zip(caps, split.colors, split.shapes)])
    res["caption_exact"] = 100.0 * np.mean([c == r for c, r in zip(caps, split.captions)])
    rt = BlipRuntime.load(bundles["easyvqa-vqa"])
    qi = split.question_image
    answers = []
    for i in range(0, len(split.questions), batch):
        idx = range(i, min(i + batch, len(split.questions)))
        answers.extend(rt.answer([images[qi[q]] for q in idx], [split.questions[q] for q in idx]))
    res["vqa_accuracy"] = 100.0 * np.mean([a == b for a, b in zip(answers, split.answers)])
    rt = BlipRuntime.load(bundles["easyvqa-itm"])
    texts = sorted(set(split.captions))
    sim = rt.similarity(np.stack(batched(lambda xs: list(rt.image_features(xs)), images, batch)),
                        np.stack(batched(lambda xs: list(rt.text_features(xs)), texts, batch)))
    res["i2t_r1"] = 100.0 * np.mean([caption_correct(texts[t], c, s)
                                     for t, c, s in zip(sim.argmax(1), split.colors, split.shapes)])
    res["t2i_r1"] = 100.0 * np.mean([caption_correct(t, split.colors[n], split.shapes[n])
                                     for n, t in zip(sim.argmax(0), texts)])
    rows, pair_texts, kinds = ref.hard_negative_pairs(split)
    p_match = np.concatenate([rt.match([images[r] for r in rows[i : i + 4 * batch]], pair_texts[i : i + 4 * batch])
                              for i in range(0, len(rows), 4 * batch)])
    res.update(ref.itm_auc(p_match, kinds))
    res["seconds"] = time.time() - start
    return res


def evaluate_reference(split_name: str, limit: int | None) -> dict:
    import evaluate_reference as ref

    out = ROOT / "training" / ".reference.json"
    ref.main(["--split", split_name, "--json", str(out)] + (["--limit", str(limit)] if limit else []))
    data = json.loads(out.read_text())
    out.unlink()
    return {"caption_correct": data["caption_correct"], "caption_exact": data["caption_exact"],
            "vqa_accuracy": data["vqa_accuracy"], "i2t_r1": data["i2t_r1_itc_color_shape"],
            "t2i_r1": data["t2i_r1_itc_color_shape"], "seconds": data["seconds"],
            **{k: v for k, v in data.items() if k.startswith("itm_auc")}}


def table(rows: dict[str, dict], split, limit) -> str:
    head = (f"easy-VQA {split.name} split{f' (first {limit} images)' if limit else ''}: "
            f"{len(split.images)} images, {len(split.questions)} questions\n\n")
    lines = ["| model | VQA accuracy % | captions correct % | captions exact % | ITC R@1 i→t % | ITC R@1 t→i % "
             "| ITM AUC other colour | ITM AUC other shape | ITM AUC both | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['vqa_accuracy']:.2f} | {r['caption_correct']:.2f} | {r['caption_exact']:.2f} | "
                     f"{r['i2t_r1']:.2f} | {r['t2i_r1']:.2f} | {r['itm_auc_colour']:.4f} | {r['itm_auc_shape']:.4f} | "
                     f"{r['itm_auc']:.4f} | {r['seconds']:.0f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8-qdq", "fp16", "int8-cpu"],
                    help="blip-export precisions (int8 means int8-cpu on ONNX Runtime; int8-qdq the Q/DQ form)")
    ap.add_argument("--engines", type=Path, default=ROOT / "engines")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="only the first N images (and their questions)")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference row")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    split = load_split(args.split)
    if args.limit:
        import evaluate_reference as ref

        split = ref.limit(split, args.limit)
    rows = {}
    if not args.no_reference:
        rows["reference PyTorch fp32"] = evaluate_reference(args.split, args.limit)
    for precision in args.precisions:
        rows[f"ONNX Runtime {precision}"] = evaluate_bundles(ensure_bundles(args.engines, precision), split)
        print(table(rows, split, args.limit), flush=True)
    text = table(rows, split, args.limit)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
