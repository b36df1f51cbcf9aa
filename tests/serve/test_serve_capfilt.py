"""CapFilt on Ray Data with the embedded models: on easy-VQA test images whose web texts are half
right and half wrong, the ITM filter (threshold measured on the train split, never on these
images) keeps the right texts and drops the wrong ones; a run cut short (a shard limit, then a
driver killed mid-run) and rerun gives the same parquet as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
easy_vqa = pytest.importorskip("easy_vqa")

from blip_runtime import BlipRuntime  # noqa: E402
from serve_bundles import shared_bundles  # noqa: E402
from blip_serve.capfilt import (DEFAULT_THRESHOLD, CapFiltConfig, choose_threshold, read_listing,  # noqa: E402
                                read_output, run_capfilt)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))
from data import caption_correct, load_split  # noqa: E402

TRAIN_IMAGES = 400  # threshold measurement
TEST_IMAGES = 200  # precision / recall


def web_texts(split, indices, seed: int) -> tuple[list[str], list[bool]]:
    """For each image: its own caption (even positions) or the caption of an image of another
    colour or shape (odd positions) -> (texts, right)."""
    rng = np.random.default_rng(seed)
    texts, right = [], []
    for k, n in enumerate(indices):
        if k % 2 == 0:
            texts.append(split.captions[n])
            right.append(True)
            continue
        while True:
            m = int(rng.integers(len(split.captions)))
            if (split.colors[m], split.shapes[m]) != (split.colors[n], split.shapes[n]):
                break
        texts.append(split.captions[m])
        right.append(False)
    return texts, right


def listing_file(folder: Path, split_name: str, count: int, seed: int) -> tuple[Path, dict]:
    """A .jsonl listing of `count` images of the split with web texts -> (file, image -> right)."""
    split = load_split(split_name)
    paths = (easy_vqa.get_train_image_paths if split_name == "train" else easy_vqa.get_test_image_paths)()
    texts, right = web_texts(split, range(count), seed)
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / f"{split_name}.jsonl"
    rows = [{"image": paths[int(split.image_ids[n])], "text": texts[n]} for n in range(count)]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return listing, {r["image"]: ok for r, ok in zip(rows, right)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    bundles = shared_bundles(tmp_path_factory)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield {"bundles": bundles, "address": ray.get_runtime_context().gcs_address}
    finally:
        ray.shutdown()


def test_capfilt_keeps_right_web_texts_drops_wrong(cluster, tmp_path):
    bundles = cluster["bundles"]
    # The threshold, measured on train-split images only.
    split = load_split("train")
    texts, right = web_texts(split, range(TRAIN_IMAGES), seed=1)
    itm = BlipRuntime.load(bundles["itm"])
    scores = np.concatenate([itm.match(list(split.images[i : i + 16]), texts[i : i + 16])
                             for i in range(0, TRAIN_IMAGES, 16)])
    right = np.array(right)
    threshold = choose_threshold(scores[right], scores[~right])
    for t in (threshold, DEFAULT_THRESHOLD):
        kept = scores >= t
        print(f"train: threshold {t:.4f}: precision {right[kept].mean():.4f} recall {kept[right].mean():.4f}")
    default_kept = scores >= DEFAULT_THRESHOLD
    assert right[default_kept].mean() >= 0.95 and default_kept[right].mean() >= 0.95  # the shipped default holds

    listing, truth = listing_file(tmp_path, "test", TEST_IMAGES, seed=2)
    config = CapFiltConfig(captioner=str(bundles["caption"]), filter=str(bundles["itm"]), threshold=threshold,
                           shard_size=50)
    report = run_capfilt(read_listing(listing), tmp_path / "out", config, actors=2, cpus_per_actor=0.5)
    assert report["processed"] == 4 and report["images"] == TEST_IMAGES
    table = read_output(tmp_path / "out").to_pylist()
    assert set(table[0]) == {"image", "text", "source", "score"}
    assert all(r["score"] >= threshold for r in table)
    web = {r["image"] for r in table if r["source"] == "web"}
    kept_right = sum(truth[i] for i in web)
    precision, recall = kept_right / max(len(web), 1), kept_right / sum(truth.values())
    print(f"test: {TEST_IMAGES} images, web texts kept {len(web)}: precision {precision:.4f} recall {recall:.4f} "
          f"(threshold {threshold:.4f} from train; shipped default {DEFAULT_THRESHOLD})")
    assert precision >= 0.95 and recall >= 0.95

    test = load_split("test")
    labels = {easy_vqa.get_test_image_paths()[int(i)]: (c, s) for i, c, s in zip(test.image_ids, test.colors, test.shapes)}
    synthetic = [r for r in table if r["source"] == "synthetic"]
    correct = np.mean([caption_correct(r["text"], *labels[r["image"]]) for r in synthetic])
    print(f"synthetic captions (top_p 0.9) kept: {len(synthetic)} of {TEST_IMAGES}, {100 * correct:.1f}% name the "
          "image's colour and shape")
    assert len(synthetic) >= 0.8 * TEST_IMAGES and correct >= 0.95


def _cli(listing, bundles, out, address, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blip_serve.capfilt_cli", str(listing), "--captioner", str(bundles["caption"]),
           "--filter", str(bundles["itm"]), "--output", str(out), "--shard-size", "4", "--batch-size", "2",
           "--address", address, *extra]
    # A session of its own: the test kills the driver's process group, and only that.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=ROOT)


def test_capfilt_killed_and_rerun_gives_the_same_output(cluster, tmp_path):
    bundles, address = cluster["bundles"], cluster["address"]
    listing, _ = listing_file(tmp_path, "test", 120, seed=3)  # 30 shards of 4
    config = CapFiltConfig(captioner=str(bundles["caption"]), filter=str(bundles["itm"]), shard_size=4, batch_size=2)
    full = run_capfilt(read_listing(listing), tmp_path / "full", config, actors=2)
    assert full["processed"] == 30

    out = tmp_path / "resumed"
    p = _cli(listing, bundles, out, address, "--max-shards", "3")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert len(list(out.glob("shard-*.parquet"))) == 3, log

    p = _cli(listing, bundles, out, address)
    lines = []
    for line in p.stdout:  # bounded: the driver ends by itself after 27 shards
        lines.append(line)
        if "done (" in line:
            os.killpg(p.pid, signal.SIGKILL)  # the driver dies mid-run, its actors with it
            break
    p.wait(timeout=60)
    p.stdout.close()
    after_kill = len(list(out.glob("shard-*.parquet")))
    print(f"killed after {after_kill} of 30 shards")
    assert 3 < after_kill < 30, "".join(lines)

    p = _cli(listing, bundles, out, address)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert f"{after_kill} done before" in log, log
    a, b = read_output(tmp_path / "full"), read_output(out)
    print(f"uninterrupted: {a.num_rows} rows; cut, killed and rerun: {b.num_rows} rows")
    assert a.equals(b)


def test_read_listing_folder_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    web = tmp_path / "web.jsonl"
    web.write_text(json.dumps({"image": "b.png", "text": "a web text"}) + "\n")
    rows = read_listing(tmp_path / "imgs", web)
    assert [(r["image"], r["text"]) for r in rows] == [("a.jpg", None), ("b.png", "a web text"), ("sub/c.png", None)]
    assert rows[0]["path"] == str(tmp_path / "imgs" / "a.jpg")

    pq.write_table(pa.table({"image": ["imgs/sub/c.png", "imgs/a.jpg"], "text": ["t1", None]}), tmp_path / "l.parquet")
    rows = read_listing(tmp_path / "l.parquet")
    assert [(r["image"], r["path"], r["text"]) for r in rows] == [
        ("imgs/a.jpg", str(tmp_path / "imgs" / "a.jpg"), None), ("imgs/sub/c.png", str(tmp_path / "imgs/sub/c.png"), "t1")]
    (tmp_path / "bad.jsonl").write_text('{"img": "a.jpg"}\n')
    with pytest.raises(ValueError, match="row 0: expected an object with a string 'image'"):
        read_listing(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no images"):
        read_listing(tmp_path / "empty.jsonl")
    assert choose_threshold([0.9, 0.8, 0.3], [0.1, 0.2]) == pytest.approx(0.25)
