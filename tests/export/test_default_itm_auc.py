"""The shipped ITM head (blip_export/models/easyvqa-itm) separates each image's caption from its hard
negatives, the same caption with another colour and with another shape: ROC AUC >= 0.99 for each
kind on a CI-sized part of the easy-VQA test split, through the exported fp32 bundle and through
transformers, which agree pair by pair."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_export.defaults import default_models

ROOT = Path(__file__).resolve().parents[2]
SUBSET = 100  # test images: 1,000 pairs (own caption, 7 other colours, 2 other shapes each)
MIN_AUC = 0.99
MIN_ACCURACY = 0.95  # of every pair at p(match) > 0.5: right captions must also score high, not just rank


@pytest.fixture(scope="module")
def pairs():
    """(images uint8 [P, 64, 64, 3], captions [P], kinds [P]) over the first SUBSET test images."""
    pytest.importorskip("easy_vqa", reason="the easy-vqa package holds the data set (test extra)")
    sys.path.insert(0, str(ROOT / "training"))
    from evaluate_reference import hard_negative_pairs, limit

    from data import load_split

    split = limit(load_split("test"), SUBSET)
    rows, texts, kinds = hard_negative_pairs(split)
    return split.images[rows], texts, kinds


def check(p_match: np.ndarray, kinds: np.ndarray, what: str) -> None:
    from evaluate_reference import itm_auc

    auc = itm_auc(p_match, kinds)
    labels = kinds == "match"
    accuracy = float(np.mean((p_match > 0.5) == labels))
    right = p_match[labels]
    print(f"{what}: ITM ROC AUC {auc}, accuracy at 0.5 {accuracy:.4f}, p(match) of right captions "
          f"min {right.min():.3f} median {np.median(right):.3f}")
    assert min(auc.values()) >= MIN_AUC, f"{what}: {auc}"
    assert accuracy >= MIN_ACCURACY, f"{what}: accuracy at p(match) 0.5 is {accuracy:.4f}"


@torch.no_grad()
def test_shipped_itm_separates_hard_negatives(pairs, tmp_path):
    import transformers
    from PIL import Image

    from blip_export.pipeline import export
    from blip_runtime import BlipRuntime

    images, texts, kinds = pairs
    folder = default_models()["easyvqa-itm"]
    rt = BlipRuntime.load(export(folder, tmp_path / "itm", precision="fp32").bundle)
    ours = np.concatenate([rt.match(list(images[i : i + 250]), texts[i : i + 250]) for i in range(0, len(texts), 250)])
    check(ours, kinds, "fp32 bundle")

    model = transformers.BlipForImageTextRetrieval.from_pretrained(folder).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder)
    theirs = []
    for i in range(0, len(texts), 250):
        enc = processor(images=[Image.fromarray(im) for im in images[i : i + 250]], text=texts[i : i + 250],
                        padding=True, return_tensors="pt")
        theirs.append(model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1].numpy())
    theirs = np.concatenate(theirs)
    check(theirs, kinds, "transformers")
    err = float(np.abs(ours - theirs).max())
    print(f"p(match), bundle against transformers: max abs error {err:.2e}")
    assert err < 1e-4


def test_int8_qdq_calibrated_on_the_shipped_texts(pairs, tmp_path):
    """`--precision int8-qdq` on the shipped model calibrates with the shipped calibration set's own
    captions and questions (calibration.json "texts"): its ITM keeps AUC >= 0.99 on both kinds of hard
    negative (with generic English calibration texts the other-shape AUC fell to 0.981)."""
    from blip_export.pipeline import export
    from blip_runtime import BlipRuntime

    images, texts, kinds = pairs
    bundle = export(default_models()["easyvqa-itm"], tmp_path / "itm8", precision="int8-qdq").bundle
    rt = BlipRuntime.load(bundle)
    assert rt.manifest.data["precision"] == "int8-qdq"
    ours = np.concatenate([rt.match(list(images[i : i + 250]), texts[i : i + 250]) for i in range(0, len(texts), 250)])
    check(ours, kinds, "int8-qdq bundle")
