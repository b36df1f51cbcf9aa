"""BlipRuntime: the public runtime over an engine bundle, for every family.

`BlipRuntime.load(bundle)` opens any bundle and returns an instance of its family's runtime class
(blip_runtime.families: manifest "family" -> module -> runtime_class()), which adds the family's
task API (BLIP: caption, answer, match, features). This base holds what every family shares:
loading and sessions, image preprocessing, the tokenizer, generation options and their checks,
and small input helpers.

Batching rule: every request in a batch gets exactly what transformers gives for that request
alone (padding never leaks into results); each family's task methods keep it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from .generated import Generated
from .image import ImageSettings, preprocess
from .manifest import BundleError, Manifest, load_manifest
from .options import GenerationOptions, _is_bool, _is_int
from .openvino_session import BACKENDS, ONNXRUNTIME, open_session
from .session import OrtSession, Session
from .text import TextTokenizer, check_text


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: expected at least one image")
        return list(images)
    return [images]


def match_probability(itm_logits: np.ndarray) -> np.ndarray:
    """ITM logits float32 [B, 2] -> p(match) float32 [B]: softmax in float64, class 1."""
    z = itm_logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p[:, 1] / p.sum(axis=1)).astype(np.float32)


def _texts(texts, what: str, n: int | None = None) -> list[str]:
    """A single string is one text (for each of the n images when n is given); a list or tuple gives
    one text per item (exactly n when n is given). Every text must be valid Unicode."""
    if isinstance(texts, str):
        texts = [texts] * (n or 1)
    elif isinstance(texts, (list, tuple)) or (isinstance(texts, np.ndarray) and texts.ndim == 1):
        texts = list(texts)
    else:
        raise ValueError(f"{what}: expected a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{what}: expected at least one text, got an empty {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{what}[{i}]: expected a str, got {type(t).__name__}")
        check_text(t, f"{what}[{i}]")
    if n is not None and len(texts) != n:
        raise ValueError(f"{what}: got {len(texts)} for {n} image(s); give one per image or a single string")
    return texts


def _check_return_scores(value) -> None:
    """Checked before any work: a wrong flag fails at once, not after generation."""
    if not _is_bool(value):
        raise ValueError(f"return_scores={value!r} ({type(value).__name__}): expected True or False")


def _grouped(items: list, n: int) -> list:
    """B * n results, request-major -> B lists of n (n > 1); unchanged for n == 1."""
    return items if n == 1 else [items[i : i + n] for i in range(0, len(items), n)]


class BlipRuntime:
    """Run an engine bundle: `BlipRuntime.load(bundle_dir, providers=None)`. `BlipRuntime(manifest,
    session)` also returns the family's runtime class (see __new__)."""

    def __new__(cls, manifest: Manifest, session: Session):
        # The family's class: BlipRuntime(manifest, session) and BlipRuntime.load both give the
        # task API of the bundle's family, so callers never name a family.
        if cls is BlipRuntime:
            cls = manifest.family.runtime_class()
        elif not issubclass(manifest.family.runtime_class(), cls):
            raise BundleError(f"{manifest.folder}: a {manifest.data['family']!r} bundle; {cls.__name__} runs "
                              f"{manifest.family.runtime_class().__name__} bundles")
        return super().__new__(cls)

    def __init__(self, manifest: Manifest, session: Session):
        self.manifest = manifest
        self.session = session
        data = manifest.data
        try:
            self.image_settings = ImageSettings.from_preprocessor_config(data["image"])
        except ValueError as e:
            raise BundleError(f"{manifest.folder / 'manifest.json'}: 'image': {e}") from None
        tok = data["tokenizer"]
        self.special = manifest.special_tokens
        self.tokenizer = TextTokenizer.from_file(
            manifest.folder / tok["file"],
            model_max_length=tok.get("model_max_length"),
            clean_up_tokenization_spaces=tok.get("clean_up_tokenization_spaces", False),
            pad_token_id=self.special["pad_token_id"],
        )

    @classmethod
    def load(cls, bundle_dir: str | Path, providers: list | None = None, threads: int | None = None,
             verify: bool | str = True, backend: str = "onnxruntime") -> "BlipRuntime":
        """`providers`: ONNX Runtime execution providers (CPU by default); a TensorRT engine
        bundle (target "trt") runs on TensorRT directly and takes none. `backend` (ONNX bundles):
        "onnxruntime", "openvino" (every graph on OpenVINO's CPU plugin) or "auto" (OpenVINO for an
        fp32 bundle's graphs outside the decoding loop where openvino is installed, ONNX Runtime for
        the rest; openvino_session.auto_routes); their sessions' `backends` say which runs each
        graph. `verify`: check each file against the manifest's SHA-256 first (Manifest.verify_files):
        True or "stamp" hashes only the files whose stamp (size, times, inode) moved since their last
        check, "full" hashes every file (2.5-3.7 s per GiB here; catches a change no stamp shows, such
        as a bad disk), False none."""
        if verify is not False and verify is not True and verify not in ("full", "stamp"):
            raise ValueError(f"verify: expected 'full', 'stamp' or False, got {verify!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
        manifest = load_manifest(bundle_dir)
        if verify is not False:
            manifest.verify_files("stamp" if verify is True else verify)
        if manifest.data.get("target", "onnx") == "trt":
            if backend != ONNXRUNTIME:
                raise BundleError(f"{manifest.folder}: a TensorRT engine bundle runs on TensorRT only, not backend "
                                  f"{backend!r}; load it without backend=, or load its ONNX bundle")
            from .trt_session import TrtSession

            return cls(manifest, TrtSession(manifest))
        if backend != ONNXRUNTIME:
            return cls(manifest, open_session(manifest, backend, providers, threads))
        return cls(manifest, OrtSession(manifest, providers, threads))

    @property
    def tasks(self) -> list[str]:
        return self.manifest.tasks

    def _need(self, task: str) -> None:
        if task not in self.manifest.tasks:
            raise BundleError(
                f"{self.manifest.folder}: this bundle does the tasks {self.manifest.tasks}, not {task!r}; "
                "export a checkpoint that has it"
            )

    def retrieve(self, images, texts, batch_size: int = 16) -> np.ndarray:
        """Similarity [I, T] of every image with every text (a single string is one text), features
        computed in batches of batch_size through the family's image_features / text_features /
        similarity. An engine bundle's batches are capped at its profiles' max_batch (its manifest's
        limits), which the engines cannot exceed."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        limit = self.manifest.data.get("limits", {}).get("max_batch") if self.manifest.data.get("target") == "trt" else None
        batch_size = min(batch_size, int(limit)) if limit else batch_size
        images, texts = _as_list(images), _texts(texts, "texts")
        img = np.concatenate([self.image_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        txt = np.concatenate([self.text_features(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        return self.similarity(img, txt)

    # -- stages -----------------------------------------------------------------------------
    def pixels(self, images) -> np.ndarray:
        """Images (paths, PIL images, HxWx3 uint8 arrays) -> pixel_values float32 [B, 3, H, W]."""
        return preprocess(_as_list(images), self.image_settings)

    # -- generation options (families: eos_token_default, vocab_size) --------------------------
    def eos_token_default(self) -> int:
        """The token that ends generation unless the caller gives eos_token_id (the family's)."""
        return self.special["eos_token_id"]

    @property
    def vocab_size(self) -> int:
        """Size of the logits the decoder returns: generated ids lie below it."""
        raise NotImplementedError

    def options(self, prompt_len: int, overrides: dict) -> GenerationOptions:
        """Generation options: the bundle's defaults (from the checkpoint's generation config, with
        transformers' max_length/min_length counting the prompt), then the caller's overrides.
        eos_token_id / pad_token_id default to eos_token_default() and the bundle's pad token."""
        known = {f.name for f in fields(GenerationOptions)}
        wrong = set(overrides) - known
        if wrong:
            raise ValueError(f"unknown generation option(s) {sorted(wrong)}; expected some of {sorted(known)}")
        defaults = dict(self.manifest.data["generation"])
        values = {k: v for k, v in defaults.items() if k in known}
        if "max_new_tokens" not in defaults:
            values["max_new_tokens"] = max(1, defaults.get("max_length", 20) - prompt_len)
        if "min_new_tokens" not in defaults:
            values["min_new_tokens"] = max(0, defaults.get("min_length", 0) - prompt_len)
        values.update(overrides)
        values.setdefault("eos_token_id", self.eos_token_default())
        values.setdefault("pad_token_id", self.special["pad_token_id"])
        options = GenerationOptions(**values)
        vocab = self.vocab_size
        for name, ids in (("eos_token_id", options.eos_ids), ("pad_token_id", [options.pad_token_id])):
            if max(ids) >= vocab:
                raise ValueError(f"{name}={getattr(options, name)!r}: expected token ids below the vocabulary "
                                 f"size {vocab}")
        return options

    def _decode_text(self, groups, n: int):
        if n == 1:
            return self.tokenizer.batch_decode(groups)
        return [self.tokenizer.batch_decode(g) for g in groups]

    def _results(self, sequences: list[list[int]], scores: np.ndarray, n: int, return_scores: bool) -> list:
        """sequences: B * n token lists, request-major; scores: float32 [B * n]. The *_tokens result (B
        lists, or B lists of n when n > 1); with return_scores, a Generated per sequence instead."""
        if not return_scores:
            return _grouped(sequences, n)
        texts = self._decode_text(sequences, 1)
        return _grouped([Generated(t, s, float(x)) for t, s, x in zip(texts, sequences, scores)], n)

    def _sequences(self, generation: dict) -> int:
        """num_return_sequences as the options will have it (the bundle may set a default)."""
        return self.options(1, generation).num_return_sequences

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad prompt rows: the decoder step returns the logits of the last position, which
        must be each row's last real token; positions count real tokens only (the family's Inference)."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.special["pad_token_id"], np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        return ids, mask
