"""The exporter's model families: config.json's model_type -> the module that exports it.

Each module (imported only when a checkpoint or bundle of its family is met) has `FAMILY`, an
ExportFamily: how to read its config.json, build and load its reference model, which tasks an
architecture has, its graphs (the I/O table in blip_runtime/families/<family>/graphs.py) and the
wrapper, trace sizes and verification sizes of each, what its bundles carry besides the graphs
(tokenizer, image settings, generation defaults, special tokens), its calibration workload and its
precision rules per graph (precision_policy -> GraphPrecision).
The core (bundle.py, onnx_export.py, loading.py, calibration.py, precision.py, quantize.py,
quant_search.py, weight_only.py) names no family.
Adding a family: its folder and one line here (and one in blip_runtime/families for the runtime).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import CheckpointError

FAMILIES = {
    "blip": "blip_export.families.blip.family",
    "blip-2": "blip_export.families.blip2.family",
}


class ExportFamily:
    """What the exporter asks of a family. A family that cannot export yet keeps the defaults of
    the export part, which stop with one clear ExportError (check_exportable)."""

    name = ""  # config.json's model_type and the manifest's "family"
    display_name = ""  # in messages: "BLIP (BLIP-1)"
    key_prefixes: tuple[str, ...] = ()  # weight names only this family's checkpoints have
    task_names: tuple[str, ...] = ()  # every task some architecture of the family exports (for --tasks)

    @property
    def architectures(self) -> tuple[str, ...]:
        """config.json `architectures` entries the family reads (for messages)."""
        return ()

    # -- checkpoints ---------------------------------------------------------------------------
    def read_config(self, data: dict, source: str):
        """The parsed config.json (CheckpointError naming `source` for a malformed entry)."""
        raise NotImplementedError

    def build(self, config, dtype):
        """The reference module for `config`, parameters allocated in `dtype`, not loaded."""
        raise NotImplementedError

    def load_weights(self, model, folder, config) -> None:
        """Stream the checkpoint's weights into `model` (blip_export.weights)."""
        raise NotImplementedError

    # -- export --------------------------------------------------------------------------------
    def check_exportable(self, config) -> None:
        """ExportError when this family (or this architecture) has no ONNX graphs."""
        from ..files import ExportError

        raise ExportError(f"{self.display_name} export to ONNX is not available yet")

    def check_precision(self, config, form: str) -> None:
        """ExportError when this family's bundles cannot be converted to `form` (pipeline.FORMS) yet."""
        return None

    # graphs(ort_attention=True) exists: the ONNX Runtime CPU forms (int8-cpu, int4) convert from it;
    # False: they convert from the standard fp32 graphs.
    ort_attention_forms = True

    def precision_policy(self, graph: str, manifest: dict) -> "GraphPrecision":
        """The family's rules for `graph` of the fp32 bundle whose manifest is `manifest` (the parsed
        manifest.json) in the core's conversions (blip_export.precision, blip_export.quantize), on top
        of the core's own rules. Default: the core's rules alone."""
        return GraphPrecision()

    def tasks(self, config) -> tuple[str, ...]:
        """The tasks a checkpoint of this architecture can be exported for, the default first."""
        raise NotImplementedError

    def dims(self, config):
        """The dims object the I/O table is built from (to_dict() goes to the manifest's "dims")."""
        raise NotImplementedError

    def graphs(self, dims, tasks: set[str], ort_attention: bool) -> dict:
        """{name: GraphSpec} of the graphs `tasks` need; ort_attention: the ONNX Runtime forms."""
        raise NotImplementedError

    def axes(self, dims, limits) -> dict:
        """{axis: (min, opt, max)} of the symbolic axes of the graphs, for `limits`."""
        raise NotImplementedError

    def wrapper(self, model, spec, tasks: list[str]):
        """The nn.Module whose positional inputs and outputs are `spec`'s."""
        raise NotImplementedError

    def trace_sizes(self, spec, dims) -> dict[str, int]:
        """Axis sizes of the tracing inputs: distinct and > 1, so no axis is baked in as a constant."""
        raise NotImplementedError

    def feeds(self, spec, dims, sizes: dict[str, int], seed: int = 0) -> dict:
        """Valid inputs of `spec` at axis sizes `sizes`, to trace and to verify with: the core's
        random_feeds (token ids below TensorSpec.high, right-padded masks), unless the family's
        inputs need more (e.g. image-token slots in a prompt)."""
        from blip_runtime.graphs import random_feeds

        return random_feeds(spec, sizes, seed)

    def verify_sizes(self, spec, dims) -> list[dict[str, int]]:
        """Axis sizes each graph is checked at against the reference module."""
        raise NotImplementedError

    def bundle_parts(self, folder, config, tokenizer_dest):
        """Write the tokenizer file(s) to `tokenizer_dest` and return a BundleParts."""
        raise NotImplementedError

    def exercise(self, runtime, images: list, texts=None, batch_size: int = 2, tasks=None, **generation) -> dict:
        """Run every task of the bundle on `images` (calibration and held-out comparisons): results
        by task, token lists for generated text, float32 arrays for scores."""
        raise NotImplementedError


def family(name: str) -> ExportFamily:
    """The ExportFamily of config.json's model_type (= the manifest's family) `name`; KeyError with
    the known ones otherwise."""
    module = FAMILIES.get(name) if isinstance(name, str) else None
    if module is None:
        raise KeyError(f"family {name!r} is not one this exporter knows (it knows {', '.join(map(repr, FAMILIES))})")
    return importlib.import_module(module).FAMILY


def known_tasks() -> tuple[str, ...]:
    """Every task some family exports, in registry order (what `blip-export --tasks` accepts)."""
    names: list[str] = []
    for name in FAMILIES:
        names += [t for t in family(name).task_names if t not in names]
    return tuple(names)


def family_for_config(data: dict, source: str) -> ExportFamily:
    """The family of a parsed config.json, or CheckpointError naming `source`."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        archs = data.get("architectures") or []
        known = [f"{name!r} ({', '.join(family(name).architectures)})" for name in FAMILIES]
        raise CheckpointError(source, f"model_type={model_type!r} (architectures {archs}): not a checkpoint of a "
                                      f"family this exporter knows; expected model_type {' or '.join(known)}")
    return family(model_type)


@dataclass(frozen=True)
class GraphPrecision:
    """A family's precision rules for one graph (ExportFamily.precision_policy). The core applies
    its own rules first (fp32 islands by op type and for the attention mask; attention probabilities
    @ V out of int8; the measured exclusion search); these add to them.

    keep_fp32: non-empty: the graph stays fp32 in fp16 bundles, and this says why (the manifest's
      per-graph "precision" entry). int8 forms still quantize it, where the measured search allows.
    fp16_islands: onnx ModelProto (shapes inferred) -> {reason: [node names]}: more nodes to keep in
      fp32 in the fp16 graph, by reason (they go to the manifest as the core's do).
    layer_groups: node names -> the layer group of each (same order), the units the int8 exclusion
      search keeps in fp32 or quantizes; None: quantize.layer_group of each name.
    notes: what the manifest says about these rules (why they are needed).
    smooth_alphas: SmoothQuant alphas (blip_export.smoothquant) to try before int8 (int8-qdq and
      int8-cpu): the core quantizes the graph unsmoothed and smoothed at each (smoothquant.choose_alpha)
      and keeps the one with the smallest measured error; (): no smoothing.
    prompt_twin: a name for this graph (of ROLE_GEMV) in a form for many rows, where it also runs over
      prompts: in int8-cpu and int4 bundles, whose form of a ROLE_GEMV graph is made for one row per
      beam (8-bit MatMulNBits, 4-bit weights), the core also writes the graph as int8-cpu writes graphs
      of many rows (DynamicQuantizeMatMul), same inputs, under this name; the family's runtime runs
      prompts through it. "": none (other precisions share one graph, and one copy of its weights).
      A bundle that already has a graph of that name (an earlier layout) gets no twin.
    prompt_feeds: feed dict -> whether it is a prompt's call: the twin's exclusion search and error are
      measured on those of the graph's feeds (None: on all of them).
    """

    keep_fp32: str = ""
    fp16_islands: Callable | None = None
    layer_groups: Callable[[list[str]], list[str]] | None = None
    notes: str = ""
    smooth_alphas: tuple[float, ...] = ()
    prompt_twin: str = ""
    prompt_feeds: Callable[[dict], bool] | None = None


class BundleParts:
    """What a bundle carries besides its graphs, from the family (manifest entries and ONNX metadata)."""

    def __init__(self, *, architecture: str, meta: dict, tokenizer: dict, image: dict, generation: dict,
                 special_tokens: dict, notes: list[str] | None = None):
        self.architecture = architecture
        self.meta = meta  # ONNX metadata of every graph (the exporter adds "graph")
        self.tokenizer = tokenizer  # manifest "tokenizer" entries besides file and sha256
        self.image = image  # manifest "image"
        self.generation = generation  # manifest "generation": generate()'s defaults
        self.special_tokens = special_tokens  # manifest "special_tokens"
        self.notes = list(notes or [])  # what the user should know (image settings defaulted, ...)
