"""Make tests/fixtures/tf/: tiny BLIP checkpoints saved by transformers 4.x's TensorFlow classes.

transformers 5 has no TFBlip* classes, so this script runs in an environment of its own, outside
the repository, never in the project's venv:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install 'tensorflow-cpu==2.15.*' 'transformers>=4.40,<4.47' h5py pillow
    /tmp/tfenv/bin/python tools/make_tf_fixtures.py            # writes tests/fixtures/tf/<name>/
    /tmp/tfenv/bin/pip install torch==2.13.0                  # optional, for the cross-check:
    /tmp/tfenv/bin/python tools/make_tf_fixtures.py --check    # read_tf_h5 vs from_pretrained(from_tf=True)

(TF 2.15 carries Keras 2, which transformers 4.x's TF models need.) Each fixture folder holds what
`TFBlip*.save_pretrained` writes (config.json, tf_model.h5, generation_config.json for generative
models), what `BlipProcessor.save_pretrained` writes, and expected.npz: the inputs and the TF
model's outputs on them. Weights are re-randomized as tests/oracle.py `rerandomize` does
(transformers' vision init of 1e-10 would make every comparison vacuous). Fixed seeds: rerunning
gives the same weights and inputs.

--check (needs torch in this environment) loads every fixture with transformers 4.x's own TF->PT
conversion, `Blip*.from_pretrained(folder, from_tf=True)`, and compares its state dict with
blip_export.tf_weights.read_tf_h5, and its outputs with expected.npz.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN's fused kernels reorder float sums

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "tf"

# tests/oracle.py TINY_VISION / TINY_TEXT. num_channels: TF models build their input signature from
# it and BlipVisionConfig does not define it.
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=16, num_channels=3)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, bos_token_id=97, sep_token_id=3,
            pad_token_id=0, eos_token_id=2)
BOS = TEXT["bos_token_id"]
# 5x tests/oracle.py's 0.02: at 0.02 one tensor in a wrong layout (a square Dense kernel left
# untransposed) moves the tiny model's logits by only ~1e-4 relative, too close to the tests' 1e-5.
STD = 0.1

# name -> (TF class, seed, whether the LM head's decoder kernel equals the word embeddings).
# TF Blip's LM head is a Dense of its own, never tied: a TF checkpoint converted from PyTorch holds
# the word embeddings there, one fine-tuned in TF may not ("caption_untied_head").
FIXTURES = {
    "caption": ("TFBlipForConditionalGeneration", 11, True),
    "caption_untied_head": ("TFBlipForConditionalGeneration", 12, False),
    "vqa": ("TFBlipForQuestionAnswering", 13, True),
    "retrieval": ("TFBlipForImageTextRetrieval", 14, True),
    "features": ("TFBlipModel", 15, True),
}


def oracle_vocab(size: int) -> dict[str, int]:
    """tests/oracle.py blip_vocab, taken from its source: that module imports torch, which this
    environment does not need to have."""
    source = (REPO / "tests" / "oracle.py").read_text(encoding="utf-8")
    wanted = [n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == "blip_vocab"
              or isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "WORDS" for t in n.targets)]
    scope: dict = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "oracle.py", "exec"), scope)
    return scope["blip_vocab"](size)


def save_processor(folder: Path) -> None:
    """BlipProcessor (BERT WordPiece tokenizer over the oracle's tiny vocabulary + BLIP image
    processor at the tiny image size), as a public checkpoint folder carries it."""
    import transformers

    vocab = oracle_vocab(TEXT["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab_file), bos_token="[DEC]",
                                             additional_special_tokens=["[ENC]"])
    size = VISION["image_size"]
    image = transformers.BlipImageProcessor(size={"height": size, "width": size})
    transformers.BlipProcessor(image, tok).save_pretrained(folder)


def rerandomize(model, rng: np.random.Generator, std: float = STD) -> None:
    """tests/oracle.py rerandomize on the TF variables (at STD): LayerNorm gammas 1 +- 0.1,
    logit_scale at its init, every other weight normal(0, std), 5x std for embeddings."""
    for w in model.weights:
        name = w.name
        if name.endswith("/gamma:0"):
            value = 1.0 + 0.1 * rng.standard_normal(w.shape)
        elif name.endswith("logit_scale:0"):
            value = np.full(w.shape, 2.6592)
        else:
            value = std * rng.standard_normal(w.shape) * (5.0 if "embedding" in name else 1.0)
        w.assign(value.astype(np.float32))


def tie_head(model) -> None:
    """Copy the text decoder's word embeddings [V, D] into its LM head kernel [D, V]."""
    weights = {w.name.split("/", 1)[1]: w for w in model.weights}
    emb = weights["text_decoder/bert/embeddings/word_embeddings/embeddings:0"]
    weights["text_decoder/cls/predictions/decoder/kernel:0"].assign(np.transpose(emb.numpy()))


def text_inputs(rng: np.random.Generator, first: int | None, lengths=(6, 4)):
    """input_ids int32 [2, max(lengths)] (right-padded with 0) and the attention mask for it;
    `first` (when given) starts every row, as BLIP's decoder input starts with [DEC]."""
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, BOS, n)
        if first is not None:
            ids[row, 0] = first
        mask[row, :n] = 1
    return ids, mask


def run(name: str, model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Deterministic inputs and the TF model's outputs on them."""
    import tensorflow as tf

    pixels = rng.standard_normal((2, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
    rec: dict[str, np.ndarray] = {"pixel_values": pixels}
    if name.startswith("caption"):
        ids, mask = text_inputs(rng, BOS)
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_dict=True, training=False)
        rec.update(input_ids=ids, attention_mask=mask, logits=out.logits, image_embeds=out.image_embeds)
    elif name == "vqa":
        # TFBlipForQuestionAnswering.call returns no logits: run the same three layers it runs.
        ids, mask = text_inputs(rng, None, lengths=(5, 3))
        dec_ids, dec_mask = text_inputs(rng, BOS, lengths=(4, 3))
        image_embeds = model.vision_model(pixel_values=pixels, training=False)[0]
        question = model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=tf.ones(image_embeds.shape[:-1], tf.int64), return_dict=True, training=False,
        ).last_hidden_state
        logits = model.text_decoder(
            input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=question,
            encoder_attention_mask=mask, return_dict=True, training=False,
        ).logits
        call = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
                     decoder_attention_mask=dec_mask, return_dict=True, training=False)
        np.testing.assert_array_equal(call.image_embeds.numpy(), image_embeds.numpy())
        rec.update(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
                   logits=logits, question_embeds=question, image_embeds=image_embeds)
    elif name == "retrieval":
        ids, mask = text_inputs(rng, None)
        itm = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_itm_head=True,
                    return_dict=True, training=False)
        itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_itm_head=False,
                    return_dict=True, training=False)
        rec.update(input_ids=ids, attention_mask=mask, itm_logits=itm.itm_score, itc_similarity=itc.itm_score,
                   image_embeds=itm.last_hidden_state)  # the TF output's image_embeds field stays None
    elif name == "features":
        ids, mask = text_inputs(rng, None)
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_dict=True, training=False)
        rec.update(input_ids=ids, attention_mask=mask, logits_per_image=out.logits_per_image,
                   image_embeds=out.image_embeds, text_embeds=out.text_embeds,
                   image_features=model.get_image_features(pixel_values=pixels),
                   text_features=model.get_text_features(input_ids=ids, attention_mask=mask))
    else:
        raise ValueError(name)
    rec = {k: np.asarray(v) for k, v in rec.items()}
    wrong = [k for k, v in rec.items() if v.dtype.kind not in "fi"]
    assert not wrong, f"{name}: outputs that are not numeric arrays: {wrong}"
    return rec


def make(name: str) -> Path:
    import tensorflow as tf
    import transformers

    cls_name, seed, tied = FIXTURES[name]
    tf.keras.utils.set_random_seed(seed)  # the init before rerandomize; nothing depends on it
    rng = np.random.default_rng(seed)
    config = transformers.BlipConfig(vision_config=VISION, text_config=TEXT, projection_dim=16,
                                     image_text_hidden_size=12)
    model = getattr(transformers, cls_name)(config)
    model.build_in_name_scope()  # creates every variable, so that all can be re-randomized
    rerandomize(model, rng)
    if hasattr(model, "text_decoder") and tied:
        tie_head(model)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    model.save_pretrained(folder)
    save_processor(folder)
    np.savez_compressed(folder / "expected.npz", **run(name, model, rng))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder.relative_to(REPO)}: {cls_name}, {len(model.weights)} variables, {size / 1024:.0f} KiB")
    return folder


def check(name: str) -> None:
    """transformers 4.x's from_tf loading against read_tf_h5 and expected.npz."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from blip_export.tf_weights import read_tf_h5

    folder = OUT / name
    arch = FIXTURES[name][0][2:]
    pt = getattr(transformers, arch).from_pretrained(folder, from_tf=True).eval()
    ours = read_tf_h5(folder / "tf_model.h5")
    theirs = pt.state_dict()
    # transformers 4.x shares the LM head's decoder.bias with cls.predictions.bias (TF stores only the
    # latter), but keeps decoder.weight a parameter of its own: from_tf takes TF's decoder kernel.
    shared = {"text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
    compared = 0
    for key, value in theirs.items():
        if key.endswith("position_ids"):
            continue
        source = shared.get(key, key)
        assert source in ours, f"{name}: from_tf has {key}, read_tf_h5 does not"
        assert torch.equal(ours[source], value), f"{name}: {key} differs from from_tf's"
        compared += 1
    extra = set(ours) - set(theirs)
    assert not extra, f"{name}: read_tf_h5 keys from_tf does not have: {sorted(extra)}"
    exp = np.load(folder / "expected.npz")
    with torch.no_grad():
        t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in exp.items()}
        if name.startswith("caption"):
            got = pt(pixel_values=t["pixel_values"], input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            want = exp["logits"]
        elif name == "vqa":
            states = pt.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                     encoder_hidden_states=pt.vision_model(t["pixel_values"])[0]).last_hidden_state
            got = pt.text_decoder(input_ids=t["decoder_input_ids"], attention_mask=t["decoder_attention_mask"],
                                  encoder_hidden_states=states, encoder_attention_mask=t["attention_mask"]).logits
            want = exp["logits"]
        elif name == "retrieval":
            got = pt(pixel_values=t["pixel_values"], input_ids=t["input_ids"], attention_mask=t["attention_mask"]).itm_score
            want = exp["itm_logits"]
        else:
            got = pt(input_ids=t["input_ids"], pixel_values=t["pixel_values"], attention_mask=t["attention_mask"]).logits_per_image
            want = exp["logits_per_image"]
    rel = float(np.abs(got.numpy() - want).max() / np.abs(want).max())
    print(f"{name}: {compared} tensors equal to from_tf's; from_tf model vs TF outputs: relative error {rel:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with from_pretrained(from_tf=True); needs torch")
    parser.add_argument("names", nargs="*", default=list(FIXTURES), help=f"fixtures (default: all of {list(FIXTURES)})")
    args = parser.parse_args()
    for name in args.names:
        check(name) if args.check else make(name)


if __name__ == "__main__":
    main()
