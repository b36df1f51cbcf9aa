"""BLIP at run time: its I/O table (graphs.py), task API (runtime.py) and tokenizer conventions."""

from .graphs import Dims, axes, dims_from_dict, graphs

__all__ = ["Dims", "axes", "dims_from_dict", "graphs"]
