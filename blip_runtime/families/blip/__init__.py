"""BLIP at run time: its I/O table (graphs.py), task API (runtime.py) and tokenizer conventions (text.py)."""

from dataclasses import fields

from .graphs import Dims, axes, dims_from_dict, graphs

_OPTIONAL_DIMS = {"max_position_embeddings"}  # older bundles lack it

# Rows of the manifest schema (blip_runtime.manifest.SCHEMA) that BLIP bundles add.
MANIFEST_SCHEMA = (
    *((f"dims.{f.name}", "integer", f.name not in _OPTIONAL_DIMS) for f in fields(Dims)),
    *((f"special_tokens.{k}", "integer", True) for k in ("bos_token_id", "sep_token_id", "pad_token_id")),
)


def runtime_class():
    """BLIP's runtime (caption, answer, match, features): imported when a BLIP bundle is opened."""
    from .runtime import BlipFamilyRuntime

    return BlipFamilyRuntime


__all__ = ["MANIFEST_SCHEMA", "Dims", "axes", "dims_from_dict", "graphs", "runtime_class"]
