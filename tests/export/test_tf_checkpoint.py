"""BLIP checkpoints saved by transformers 4.x's TensorFlow classes (tf_model.h5), read without
TensorFlow: our reference modules on their weights reproduce the TF model's outputs.

The fixtures in tests/fixtures/tf/ were made by tools/make_tf_fixtures.py in a TensorFlow
environment of their own: tiny TFBlip* models with re-randomized weights, saved with
save_pretrained, with the inputs and the TF model's outputs in expected.npz.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_export import CheckpointError, load_model
from blip_export.config import read_config
from blip_export.families.blip.modeling import MODEL_CLASSES
from blip_export.tf_weights import read_tf_h5
from oracle import assert_close, errors

REL = 1e-5
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
NAMES = ["caption", "caption_untied_head", "vqa", "retrieval", "features"]
# transformers shares the LM head's decoder.bias with cls.predictions.bias; TF stores only the latter.
SHARED = {"cls.predictions.decoder.bias": "cls.predictions.bias"}


def load_tf(folder: Path, state: dict[str, torch.Tensor] | None = None):
    """Our reference model for `folder/config.json` with every parameter from `state` (default: the
    folder's tf_model.h5), checked key by key: nothing missing, nothing left over, shapes equal.
    The LM head's decoder.weight comes from the file, as transformers 4.x's from_tf takes it."""
    config = read_config(folder)
    model = MODEL_CLASSES[config.architecture](config).eval()
    state = read_tf_h5(folder / "tf_model.h5") if state is None else state
    full, used = {}, set()
    for name in model.state_dict():
        key = next((name[: -len(k)] + v for k, v in SHARED.items() if name.endswith(k)), name)
        assert key in state, f"{name}: no tensor in tf_model.h5"
        full[name] = state[key]
        used.add(key)
    assert not set(state) - used, f"tf_model.h5 keys the model does not have: {sorted(set(state) - used)}"
    model.load_state_dict(full, strict=True)
    return model


def expected(name: str) -> dict[str, torch.Tensor]:
    """expected.npz: int32 inputs as int64 (what our modules take), float outputs as they are."""
    data = np.load(FIXTURES / name / "expected.npz")
    return {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in data.items()}


@torch.no_grad()
def outputs(name: str, model, e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's counterparts of every output recorded for fixture `name`."""
    pix, ids, mask = e["pixel_values"], e["input_ids"], e["attention_mask"]
    image_embeds = model.vision_model(pix)[0]
    if name.startswith("caption"):
        return {"logits": model(pix, ids, mask), "image_embeds": image_embeds}
    if name == "vqa":
        return {
            "logits": model(pix, ids, e["decoder_input_ids"], mask, e["decoder_attention_mask"]),
            "question_embeds": model.encode_question(pix, ids, mask),
            "image_embeds": image_embeds,
        }
    if name == "retrieval":
        return {
            "itm_logits": model(pix, ids, mask, use_itm_head=True),
            "itc_similarity": model(pix, ids, mask, use_itm_head=False),
            "image_embeds": image_embeds,
        }
    image_features, text_features = model.get_image_features(pix), model.get_text_features(ids, mask)
    image_n = image_features / image_features.norm(dim=-1, keepdim=True)
    text_n = text_features / text_features.norm(dim=-1, keepdim=True)
    return {
        "image_features": image_features,
        "text_features": text_features,
        "image_embeds": image_n,
        "text_embeds": text_n,
        "logits_per_image": model.logit_scale.exp() * image_n @ text_n.t(),
    }


@pytest.mark.parametrize("loader", ["load_model", "read_tf_h5"])
@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_tensorflow(name, loader):
    """Through load_model (which finds tf_model.h5 in the folder) and straight from read_tf_h5."""
    e = expected(name)
    model = load_model(FIXTURES / name)[0] if loader == "load_model" else load_tf(FIXTURES / name)
    ours = outputs(name, model, e)
    assert set(ours) == set(e) - {k for k in e if e[k].dtype == torch.int64 or k == "pixel_values"}
    for key, value in ours.items():
        assert_close(value, e[key], REL, f"{name} {key} ({loader})")
    assert "tensorflow" not in sys.modules, "reading tf_model.h5 must not need TensorFlow"


def test_untied_head_is_read_from_the_file():
    """TF's LM head is a Dense of its own: a TF-fine-tuned file may hold one that differs from the
    word embeddings, and the TF model computed with it. Tying it instead changes the logits."""
    folder = FIXTURES / "caption_untied_head"
    state = read_tf_h5(folder / "tf_model.h5")
    head, emb = state["text_decoder.cls.predictions.decoder.weight"], state["text_decoder.bert.embeddings.word_embeddings.weight"]
    assert head.shape == emb.shape == (99, 32) and not torch.allclose(head, emb)
    e = expected("caption_untied_head")
    tied = dict(state, **{"text_decoder.cls.predictions.decoder.weight": emb})
    _, rel = errors(outputs("caption_untied_head", load_tf(folder, tied), e)["logits"], e["logits"])
    print(f"logits with the head tied to the word embeddings: relative error {rel:.3e}")
    assert rel > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_layout_fails_the_comparison(name):
    """Each tensor whose wrong layout has its right shape (square Dense kernels left untransposed,
    the patch Conv2D with kh and kw swapped) moves the outputs far past REL: the shape checks cannot
    catch those mistakes, the comparison with TF's outputs does."""
    folder = FIXTURES / name
    state = read_tf_h5(folder / "tf_model.h5")
    e = expected(name)
    checked, weakest = 0, (float("inf"), "")
    for key, w in state.items():
        if name == "features" and ".crossattention." in key:
            continue  # BlipModel's text features run the text model without cross-attention
        if w.ndim == 4:
            wrong = w.transpose(2, 3)
        elif w.ndim == 2 and w.shape[0] == w.shape[1]:
            wrong = w.t()
        else:
            continue
        ours = outputs(name, load_tf(folder, dict(state, **{key: wrong})), e)
        rel = max(errors(ours[k], e[k])[1] for k in ours)
        assert rel > 100 * REL, f"{key} in the wrong layout: outputs' relative error only {rel:.3e}"
        checked, weakest = checked + 1, min(weakest, (rel, key))
    print(f"{name}: {checked} tensors in a wrong layout, smallest relative error {weakest[0]:.3e} ({weakest[1]})")
    assert checked > 10, "the patch Conv2D and every 32x32 attention Dense kernel are square"


def test_names_and_layouts():
    """Each kind of TF name, and TF's layouts against PyTorch's shapes."""
    state = read_tf_h5(FIXTURES / "features" / "tf_model.h5")
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)  # OIHW from HWIO
    assert state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (48, 32)  # [out, in] from [in, out]
    assert state["text_model.encoder.layer.1.intermediate.dense.weight"].shape == (40, 32)
    assert state["text_model.embeddings.word_embeddings.weight"].shape == (99, 32)  # embeddings:0
    assert state["vision_model.post_layernorm.weight"].shape == (32,)  # gamma
    assert state["vision_model.embeddings.class_embedding"].shape == (1, 1, 32)
    assert state["visual_projection.weight"].shape == (16, 32) and "blip.logit_scale" not in state
    assert state["logit_scale"].shape == () and state["logit_scale"].dtype == torch.float32


# ---- unusable files: one line naming the file and the dataset ----


def copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst / "tf_model.h5"


def expect_error(path: Path, *fragments: str) -> str:
    """read_tf_h5(path), and load_model on its folder, raise one line naming the file and fragments."""
    for read in (read_tf_h5, lambda p: load_model(p.parent)):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        print(message)
        assert "\n" not in message, "errors are one line"
        for fragment in (str(path),) + fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"


DATASET = "vision_model/tf_blip_for_conditional_generation/vision_model/encoder/layers_._1/mlp/fc2/kernel:0"


def test_truncated_and_garbage_files(tmp_path):
    path = copy("caption", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cannot read HDF5 file")
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(path, "cannot read HDF5 file")


def test_dataset_listed_but_missing(tmp_path):
    import h5py

    path = copy("caption", tmp_path)
    with h5py.File(path, "r+") as f:
        del f[DATASET]
    expect_error(path, DATASET, "listed in 'weight_names' but missing")


def test_dataset_present_but_not_listed(tmp_path):
    import h5py

    path = copy("caption", tmp_path)
    extra = "text_decoder/tf_blip_for_conditional_generation/text_decoder/extra_head/kernel:0"
    with h5py.File(path, "r+") as f:
        f.create_dataset(extra, data=np.zeros((32, 2), np.float32))
    expect_error(path, extra, "not listed")


def test_listed_extra_dataset_is_a_key_the_model_lacks(tmp_path):
    """An extra variable that Keras would load maps to a PyTorch key of its own, which the key
    checks of load_model then reject by name."""
    import h5py

    path = copy("caption", tmp_path)
    weight = "tf_blip_for_conditional_generation/text_decoder/extra_head/kernel:0"
    with h5py.File(path, "r+") as f:
        group = f["text_decoder"]
        group.create_dataset(weight, data=np.zeros((32, 2), np.float32))
        names = list(group.attrs["weight_names"]) + [weight]
        group.attrs["weight_names"] = np.array(names, dtype=h5py.string_dtype())
    assert read_tf_h5(path)["text_decoder.extra_head.weight"].shape == (2, 32)
    with pytest.raises(CheckpointError) as info:
        load_model(path.parent)
    print(info.value)
    assert str(path) in str(info.value) and "text_decoder.extra_head.weight" in str(info.value)
    assert "does not have" in str(info.value)


def test_dataset_removed_with_its_listing_is_a_missing_weight(tmp_path):
    import h5py

    path = copy("caption", tmp_path)
    with h5py.File(path, "r+") as f:
        del f[DATASET]
        group = f["vision_model"]
        weight = DATASET.split("/", 1)[1]
        names = [n for n in group.attrs["weight_names"] if n != weight]
        group.attrs["weight_names"] = np.array(names, dtype=h5py.string_dtype())
    assert "vision_model.encoder.layers.1.mlp.fc2.weight" not in read_tf_h5(path)
    with pytest.raises(CheckpointError) as info:
        load_model(path.parent)
    print(info.value)
    assert "missing" in str(info.value) and "vision_model.encoder.layers.1.mlp.fc2.weight (32, 48)" in str(info.value)


def test_non_float_dataset_and_not_a_keras_file(tmp_path):
    import h5py

    path = copy("caption", tmp_path)
    with h5py.File(path, "r+") as f:
        del f[DATASET]
        f[DATASET] = np.zeros((48, 32), np.int32)
    expect_error(path, DATASET, "dtype int32")
    other = copy("caption", tmp_path / "plain")  # an HDF5 file of another writer (Keras 3 is one)
    with h5py.File(other, "w") as f:
        f["weights"] = np.zeros(3, np.float32)
    expect_error(other, "no 'layer_names'")


def test_chunked_weight_names_and_shard_layout(tmp_path):
    """Keras splits a name list over 64 KiB into weight_names0, weight_names1, ... (BLIP-base's text
    decoder's is ~32 KB: deeper models get there); a shard of a sharded save (save_pretrained with
    max_shard_size, written here as transformers 4.x writes one) lists the variables at the root."""
    import h5py

    full = read_tf_h5(FIXTURES / "caption" / "tf_model.h5")
    path = copy("caption", tmp_path)
    with h5py.File(path, "r+") as f:
        group = f["text_decoder"]
        names = group.attrs["weight_names"]
        del group.attrs["weight_names"]
        group.attrs["weight_names0"], group.attrs["weight_names1"] = names[:10], names[10:]
    chunked = read_tf_h5(path)
    assert chunked.keys() == full.keys() and all(torch.equal(chunked[k], full[k]) for k in full)

    shard = tmp_path / "tf_model-00001-of-00001.h5"
    with h5py.File(FIXTURES / "caption" / "tf_model.h5", "r") as src, h5py.File(shard, "w") as dst:
        layers = []
        for layer in src.attrs["layer_names"]:
            for weight in src[layer].attrs["weight_names"]:
                name = weight.split("/", 1)[1]  # as transformers' sharded save writes it
                dst[name] = src[layer][weight][()]
                layers.append(name.encode())
        dst.attrs["layer_names"] = layers
    sharded = read_tf_h5(shard)
    assert sharded.keys() == full.keys() and all(torch.equal(sharded[k], full[k]) for k in full)


def test_fixture_folders_are_complete_checkpoints():
    """What TF save_pretrained and BlipProcessor.save_pretrained wrote, readable by today's
    transformers' processor classes."""
    import transformers

    for name in NAMES:
        folder = FIXTURES / name
        for file in ("config.json", "tf_model.h5", "tokenizer.json", "preprocessor_config.json", "expected.npz"):
            assert (folder / file).is_file(), f"{folder / file} missing"
        assert sum(f.stat().st_size for f in folder.iterdir()) < 1 << 20
    processor = transformers.BlipProcessor.from_pretrained(FIXTURES / "caption")
    assert processor.tokenizer.convert_tokens_to_ids("[DEC]") == 97
    assert processor.image_processor.size == {"height": 32, "width": 32}
