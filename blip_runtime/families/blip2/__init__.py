"""BLIP-2 at run time (numpy, tokenizers; never torch): its I/O table (graphs.py), processor
(processor.py, text_settings.py), decoding adapters (inference.py) and task API (runtime.py)."""

from dataclasses import fields

from .graphs import Blip2Dims, axes, graphs, prompt_axes

_REQUIRED_DIMS = {"image_size", "num_image_tokens", "vision_hidden", "num_query_tokens", "qformer_hidden",
                  "qformer_vocab_size"}  # the rest default (retrieval bundles have no LM)

# Rows of the manifest schema (blip_runtime.manifest.SCHEMA) that BLIP-2 bundles add.
MANIFEST_SCHEMA = (
    *((f"dims.{f.name}", "string" if f.type in (str, "str") else "integer", f.name in _REQUIRED_DIMS)
      for f in fields(Blip2Dims)),
    ("special_tokens.eos_token_id", "integer", False),
    ("special_tokens.bos_token_id", "integer", False),
    ("special_tokens.image_token_id", "integer", False),
    ("special_tokens.decoder_start_token_id", "integer", False),
)


def dims_from_dict(data: dict) -> Blip2Dims:
    return Blip2Dims.from_dict(data)


def more_profiles(graph: str, dims: Blip2Dims, limits) -> list[dict]:
    """opt_step's prompt call gets a TensorRT profile of its own (graphs.prompt_axes)."""
    return [prompt_axes(dims, limits)] if graph == "opt_step" else []


def runtime_class():
    """BLIP-2's runtime (caption, answer, match, features): imported when a BLIP-2 bundle is opened."""
    from .runtime import Blip2FamilyRuntime

    return Blip2FamilyRuntime


__all__ = ["MANIFEST_SCHEMA", "Blip2Dims", "axes", "dims_from_dict", "graphs", "more_profiles", "runtime_class"]
