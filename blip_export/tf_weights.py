"""`tf_model.h5` (BLIP weights saved by transformers 4.x's TFBlip* classes) read with h5py, without
TensorFlow, into the key names and layouts of transformers' PyTorch Blip* checkpoints.

The file is what Keras 2 `save_weights` writes: the root attribute `layer_names` lists the model's
top-level layers (`vision_model`, `text_decoder`, ... or `blip` for TFBlipModel); each is a group
whose attribute `weight_names` lists its variables by full TF name, `<model name>/<layer>/.../kernel:0`,
stored as a dataset at that path inside the group. A shard of a sharded save
(`tf_model-00001-of-00002.h5`) lists the variables themselves in `layer_names`, without the model
name, as datasets at the root. Keras splits an attribute over 64 KiB into `name0`, `name1`, ...

Names and layouts follow transformers 4.x `convert_tf_weight_name_to_pt_weight_name`, as its
`from_pretrained(..., from_tf=True)` applies it to BLIP:
- the model name (`tf_blip_for_conditional_generation`, `_1` when a process built two) is dropped,
  and TFBlipModel's main layer `blip` (PyTorch's BlipModel holds its submodules at the top);
- `_._` separates list indices (`layer_._0` -> `layer.0`), `/` becomes `.`, `:0` is dropped;
- `kernel` -> `weight`: Dense [in, out] -> Linear [out, in]; Conv2D HWIO -> OIHW;
- `embeddings` (Keras Embedding; `weight` in older files) and LayerNorm `gamma` -> `weight`,
  `beta` -> `bias`; `class_embedding`, `position_embedding`, `logit_scale` and the LM head's `bias`
  keep their names and layouts.
TF's LM head is a Dense of its own (`text_decoder.cls.predictions.decoder.weight`), never tied to
the word embeddings: it is returned as stored, and whoever loads decides on the tie.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

# A Dense kernel is [in, out], PyTorch's Linear [out, in]; a Conv2D kernel is [kh, kw, in, out],
# PyTorch's [out, in, kh, kw]. No BLIP layer has another kernel rank (no Conv1D).
_KERNEL_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}
_RENAMED = {"kernel": "weight", "embeddings": "weight", "gamma": "weight", "beta": "bias"}
# Keras writes the weights of the model object itself (none for BLIP) to this group, not listed in layer_names.
_TOP_LEVEL_GROUP = "top_level_model_weights"


def _attribute(path: Path, node, name: str) -> list[str] | None:
    """A Keras name-list attribute, joined from its 64 KiB chunks `name0`, `name1`, ...; None if absent."""
    if name in node.attrs:
        chunks = [node.attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in node.attrs:
            chunks.append(node.attrs[f"{name}{len(chunks)}"])
        if not chunks:
            return None
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for c in chunks for v in np.atleast_1d(c)]
    except UnicodeDecodeError:
        raise CheckpointError(path, f"attribute {name!r} of {node.name!r} is not UTF-8 text") from None


def pt_key(tf_name: str) -> tuple[str, str]:
    """TF variable name without the model name ('vision_model/encoder/layers_._0/mlp/fc1/kernel:0')
    -> (PyTorch key 'vision_model.encoder.layers.0.mlp.fc1.weight', what its TF name ended in)."""
    name = re.sub(r":\d+$", "", tf_name)  # the variable's output index
    name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", name)  # transformers' '$1___$2' -> '$2' rule
    parts = [p for p in name.replace("_._", "/").split("/") if p]
    if parts and parts[0] == "blip" and len(parts) > 1:
        parts = parts[1:]
    last = parts[-1] if parts else ""
    parts[-1:] = [_RENAMED.get(last, last)]  # older files' 'embeddings/weight:0' is already 'weight'
    return ".".join(parts), last


def _to_torch(path: Path, dataset: str, array: np.ndarray, last: str) -> torch.Tensor:
    """Check dtype and kernel rank, move TF's layout to PyTorch's."""
    if array.dtype.kind != "f":
        raise CheckpointError(path, f"dataset {dataset!r} has dtype {array.dtype}, expected a floating-point tensor")
    if array.dtype == np.float64:  # Keras never stores fp64 weights; torch checkpoints hold fp32
        array = array.astype(np.float32)
    if last == "kernel":
        if array.ndim not in _KERNEL_AXES:
            raise CheckpointError(
                path, f"dataset {dataset!r} is a kernel of shape {array.shape}: expected a Dense [in, out] "
                "or Conv2D [kh, kw, in, out] kernel"
            )
        array = np.transpose(array, _KERNEL_AXES[array.ndim])
    return torch.from_numpy(array.copy(order="C"))  # ascontiguousarray would make a 0-d logit_scale 1-d


def _listed_datasets(path: Path, f) -> list[tuple[str, str]]:
    """(dataset path in the file, TF name without the model name) of every variable the file lists."""
    import h5py

    layers = _attribute(path, f, "layer_names")
    if layers is None:
        raise CheckpointError(
            path, "no 'layer_names' attribute at the root: not a Keras 2 weights file as TF save_pretrained writes"
        )
    listed = []
    if _TOP_LEVEL_GROUP in f and _TOP_LEVEL_GROUP not in layers and isinstance(f[_TOP_LEVEL_GROUP], h5py.Group):
        layers = layers + [_TOP_LEVEL_GROUP]
    for layer in layers:
        node = f.get(layer)
        if isinstance(node, h5py.Dataset):  # a shard: the layer name is the variable name, model name removed
            listed.append((layer, layer))
            continue
        if node is None:
            raise CheckpointError(path, f"layer {layer!r} is listed in 'layer_names' but the file has no such group")
        weight_names = _attribute(path, node, "weight_names")
        if weight_names is None:
            raise CheckpointError(path, f"layer group {layer!r} has no 'weight_names' attribute")
        for weight in weight_names:
            dataset = f"{layer}/{weight}"
            if not isinstance(node.get(weight), h5py.Dataset):
                raise CheckpointError(path, f"dataset {dataset!r} is listed in 'weight_names' but missing from the file")
            if "/" not in weight:
                raise CheckpointError(path, f"dataset {dataset!r}: expected a name '<model name>/<layer>/...'")
            listed.append((dataset, weight.split("/", 1)[1]))  # Keras names start with the model's own name
    return listed


def read_tf_h5(path: Path) -> dict[str, torch.Tensor]:
    """All weights of a TF-saved BLIP `tf_model.h5` (or one shard of it), as PyTorch key -> tensor in
    PyTorch's layout (Linear [out, in], Conv2d [out, in, kh, kw]), fp32 as stored.

    Raises CheckpointError naming `path` and the dataset for an unreadable file, a dataset that is
    listed but missing or present but unlisted, a non-float dataset, an unexpected kernel rank, or two
    datasets that map to one key.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(path, f"cannot read HDF5 file ({str(e).splitlines()[0]})") from None
    with f:
        listed = _listed_datasets(path, f)
        known = {dataset for dataset, _ in listed}
        present: list[str] = []
        f.visititems(lambda name, node: present.append(name) if isinstance(node, h5py.Dataset) else None)
        unlisted = [d for d in present if d not in known]
        if unlisted:
            more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
            raise CheckpointError(
                path, f"dataset {unlisted[0]!r}{more} is not listed in its layer's 'weight_names' "
                "(Keras would not load it): not a file TF save_pretrained wrote"
            )
        state: dict[str, torch.Tensor] = {}
        source: dict[str, str] = {}
        for dataset, tf_name in listed:
            key, last = pt_key(tf_name)
            if key in state:
                raise CheckpointError(path, f"datasets {source[key]!r} and {dataset!r} both map to key {key!r}")
            try:
                array = f[dataset][()]
            except (OSError, ValueError, TypeError) as e:
                raise CheckpointError(path, f"cannot read dataset {dataset!r} ({str(e).splitlines()[0]})") from None
            state[key] = _to_torch(path, dataset, np.asarray(array), last)
            source[key] = dataset
    if not state:
        raise CheckpointError(path, "no weights: 'layer_names' lists no dataset")
    return state
