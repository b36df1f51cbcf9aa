"""CapFilt (BLIP's dataset bootstrapping) as a Ray Data pipeline of BlipRuntime actors.

For every image the captioner writes a synthetic caption by nucleus sampling (top_p 0.9, as BLIP
does), and the filter's ITM head scores it and the image's web text; each text whose match
probability reaches the threshold is kept. Output: parquet shards of kept pairs with columns
image (the listing's name for it), text, source ("synthetic" | "web") and score (float32).

Resumable and reproducible: the listing is sorted and cut into fixed shards (shard k = items
k*S .. k*S+S-1), each shard's sampling seed is derived from the run's seed and k alone, and a
shard's file is written aside and renamed into place when complete. A rerun skips the shards whose
file exists and produces, for the rest, exactly what an uninterrupted run would.

The unit of parallel work is a shard: a Ray Data dataset of shard descriptions mapped by a callable
class (`CapFiltWorker`) that loads both bundles once per actor. It runs on a local Ray or, with an
address, on a cluster (the output folder must then be shared by the nodes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inputs import bundle_tasks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Measured on the first 400 easy-VQA train-split images, web texts half their own caption, half the
# caption of an image of another colour or shape (tests/serve/test_serve_capfilt.py): at 0.5 the
# filter keeps every right text at precision 1.000 on those 400 and on 200 test images (the
# best threshold chosen on train is ~0.57). Right texts score >= 0.87 there, wrong ones <= 0.28: the
# ITM head is trained on exactly these hard negatives (training/train_itm.py).
DEFAULT_THRESHOLD = 0.5
SCHEMA_COLUMNS = ("image", "text", "source", "score")


@dataclass(frozen=True)
class CapFiltConfig:
    captioner: str  # bundle folder with the caption task
    filter: str  # bundle folder with the itm task
    threshold: float = DEFAULT_THRESHOLD  # ITM match probability a text needs to be kept
    top_p: float = 0.9  # nucleus sampling of the synthetic captions (BLIP's CapFilt)
    max_new_tokens: int = 20
    seed: int = 0  # the run's seed; shard k samples with shard_seed(seed, k)
    shard_size: int = 64  # images per shard (the unit of resumption)
    batch_size: int = 8  # images per runtime call inside a shard
    threads: int | None = 1  # ONNX Runtime threads per actor


def shard_seed(seed: int, shard: int) -> int:
    """Depends on the run's seed and the shard index only: a rerun samples what the first run did."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def choose_threshold(right: np.ndarray, wrong: np.ndarray) -> float:
    """The ITM threshold that best separates a labelled set: scores of texts that describe their
    image (`right`) and of texts that do not (`wrong`). Maximizes F1 of keeping the right ones; of
    equally good thresholds, the middle one (the widest margin either side)."""
    right, wrong = np.asarray(right, np.float64), np.asarray(wrong, np.float64)
    if not len(right) or not len(wrong):
        raise ValueError("choose_threshold: expected scores of right and of wrong texts")
    scores = np.unique(np.concatenate([right, wrong]))
    candidates = (scores[1:] + scores[:-1]) / 2 if len(scores) > 1 else scores
    tp = (right[None, :] >= candidates[:, None]).sum(1)
    fp = (wrong[None, :] >= candidates[:, None]).sum(1)
    f1 = 2 * tp / (2 * tp + fp + (len(right) - tp))
    best = candidates[f1 == f1.max()]
    return float(best[len(best) // 2])


def read_listing(images: str | Path, web_texts: str | Path | None = None) -> list[dict]:
    """-> sorted [{"image": name, "path": file, "text": web text or None}].

    `images`: a folder (every image file in it, names relative to it), or a .jsonl / .parquet
    listing with an `image` column (paths relative to the listing's folder, or absolute) and an
    optional `text` column. `web_texts`: a .jsonl of {"image": name, "text": ...} for a folder."""
    src = Path(images)
    if src.is_dir():
        root = src
        rows = [{"image": p.relative_to(src).as_posix()} for p in sorted(src.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES]
    elif src.suffix == ".jsonl":
        root = src.parent
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif src.suffix == ".parquet":
        import pyarrow.parquet as pq

        root = src.parent
        rows = pq.read_table(src).to_pylist()
    else:
        raise ValueError(f"images: {src} is not a folder, a .jsonl or a .parquet listing")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str):
            raise ValueError(f"{src}: row {i}: expected an object with a string 'image'")
    texts = {}
    if web_texts is not None:
        for i, line in enumerate(Path(web_texts).read_text(encoding="utf-8").splitlines()):
            if line.strip():
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("text"), str):
                    raise ValueError(f"{web_texts}: line {i + 1}: expected {{\"image\": str, \"text\": str}}")
                texts[item["image"]] = item["text"]
    out = []
    for r in sorted(rows, key=lambda r: r["image"]):
        path = Path(r["image"]) if Path(r["image"]).is_absolute() else root / r["image"]
        out.append({"image": r["image"], "path": str(path), "text": texts.get(r["image"], r.get("text"))})
    if not out:
        raise ValueError(f"images: no images in {src}")
    return out


def shards(listing: list[dict], shard_size: int) -> list[dict]:
    return [{"shard": k, "items": json.dumps(listing[i : i + shard_size])}
            for k, i in enumerate(range(0, len(listing), shard_size))]


def shard_path(output: Path, shard: int) -> Path:
    return output / f"shard-{shard:05d}.parquet"


def capfilt_items(captioner, filt, items: list[dict], config: CapFiltConfig, seed: int) -> list[dict]:
    """Caption and filter `items` with two BlipRuntimes -> the kept rows, in item order."""
    rows = []
    for i in range(0, len(items), config.batch_size):
        chunk = items[i : i + config.batch_size]
        paths = [c["path"] for c in chunk]
        captions = captioner.caption(paths, do_sample=True, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                                     seed=seed + i)
        synthetic = filt.match(paths, captions)
        web = [(j, c["text"]) for j, c in enumerate(chunk) if c["text"]]
        web_scores = filt.match([paths[j] for j, _ in web], [t for _, t in web]) if web else []
        web_score = {j: float(s) for (j, _), s in zip(web, web_scores)}
        for j, c in enumerate(chunk):
            if synthetic[j] >= config.threshold:
                rows.append({"image": c["image"], "text": captions[j], "source": "synthetic", "score": float(synthetic[j])})
            if j in web_score and web_score[j] >= config.threshold:
                rows.append({"image": c["image"], "text": c["text"], "source": "web", "score": web_score[j]})
    return rows


def write_shard(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": pa.array([r["image"] for r in rows], pa.string()),
                      "text": pa.array([r["text"] for r in rows], pa.string()),
                      "source": pa.array([r["source"] for r in rows], pa.string()),
                      "score": pa.array([r["score"] for r in rows], pa.float32())})
    staged = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, staged)
    staged.rename(path)  # a killed run leaves no half shard behind


class CapFiltWorker:
    """Ray Data callable class: loads the captioner and the filter once per actor, then turns each
    shard description into its parquet file (skipped when it exists)."""

    def __init__(self, config: CapFiltConfig, output: str):
        from blip_runtime import BlipRuntime

        self.config, self.output = config, Path(output)
        self.captioner = BlipRuntime.load(config.captioner, threads=config.threads)
        self.filter = BlipRuntime.load(config.filter, threads=config.threads)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "images": [], "kept": [], "seconds": []}
        for shard, items in zip(batch["shard"], batch["items"]):
            shard, items = int(shard), json.loads(items)
            start = time.perf_counter()
            path = shard_path(self.output, shard)
            kept = -1  # done by an earlier run
            if not path.exists():
                rows = capfilt_items(self.captioner, self.filter, items, self.config, shard_seed(self.config.seed, shard))
                write_shard(rows, path)
                kept = len(rows)
            for k, v in (("shard", shard), ("images", len(items)), ("kept", kept),
                         ("seconds", time.perf_counter() - start)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


def run_capfilt(listing: list[dict], output: str | Path, config: CapFiltConfig, actors: int = 1,
                cpus_per_actor: float = 0.5, max_shards: int | None = None, progress=print) -> dict:
    """Run CapFilt over `listing` on the connected Ray (ray.init first). max_shards: process at
    most this many missing shards, then stop (a partial run; rerun to finish).
    Returns {"shards", "done_before", "processed", "images", "kept", "seconds"}."""
    import ray.data

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for bundle, task in ((config.captioner, "caption"), (config.filter, "itm")):
        if task not in bundle_tasks(bundle):
            raise ValueError(f"{bundle}: does {bundle_tasks(bundle)}; CapFilt needs {task!r} there")
    (output / "capfilt.json").write_text(json.dumps({"config": config.__dict__, "images": len(listing)}, indent=1))
    all_shards = shards(listing, config.shard_size)
    todo = [s for s in all_shards if not shard_path(output, s["shard"]).exists()]
    done_before = len(all_shards) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    progress(f"capfilt: {len(all_shards)} shards of {config.shard_size} images, {done_before} done before, "
             f"{len(todo)} to run on {actors} actor(s)")
    start = time.perf_counter()
    images = kept = processed = 0
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            CapFiltWorker, fn_constructor_args=(config, str(output)), batch_size=1, concurrency=actors,
            num_cpus=cpus_per_actor)
        for row in ds.iter_rows():
            processed += 1
            images += int(row["images"])
            kept += max(0, int(row["kept"]))
            progress(f"capfilt: shard {int(row['shard'])} done ({int(row['kept'])} kept of {int(row['images'])} "
                     f"images, {float(row['seconds']):.1f} s); {processed}/{len(todo)}")
    seconds = time.perf_counter() - start
    return {"shards": len(all_shards), "done_before": done_before, "processed": processed, "images": images,
            "kept": kept, "seconds": seconds}


def read_output(output: str | Path):
    """All shards of a CapFilt output as one pyarrow table, in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(output).glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None
