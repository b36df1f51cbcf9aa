"""BLIP-2 as an export family (blip_export.families): its config reader and reference model, the
tasks of each architecture, its graphs (blip_runtime/families/blip2/graphs.py) and their wrappers,
trace and verification sizes and feeds (export.py), bundle contents (bundle_parts.py),
calibration workload (calibration.py) and precision rules (precision.py)."""

from __future__ import annotations

from .. import ExportFamily

# Architectures with no bundle: each is half of a retrieval model (no runtime task runs on one half).
NO_GRAPHS = {
    "Blip2TextModelWithProjection": "text features only",
    "Blip2VisionModelWithProjection": "image features only",
}


class Blip2Export(ExportFamily):
    name = "blip-2"
    display_name = "BLIP-2"
    key_prefixes = ("qformer.", "query_tokens", "language_model.", "language_projection.", "vision_projection.")
    task_names = ("generate", "features", "itm", "itc")  # blip_runtime.families.blip2.graphs.TASKS

    @property
    def architectures(self):
        from .config import BLIP2_ARCHITECTURES

        return BLIP2_ARCHITECTURES

    def read_config(self, data, source):
        from .config import config_from_dict

        return config_from_dict(data, source)

    def build(self, config, dtype):
        from .loading import build

        return build(config, dtype)

    def load_weights(self, model, folder, config):
        from .loading import load_weights

        load_weights(model, folder)

    # -- export ------------------------------------------------------------------------------
    def check_exportable(self, config):
        from ...files import ExportError
        from .export import ARCHITECTURE_TASKS

        if config.architecture in NO_GRAPHS:
            raise ExportError(
                f"{config.architecture} ({NO_GRAPHS[config.architecture]}): no BLIP-2 bundle for it; export the "
                f"Blip2ForImageTextRetrieval checkpoint it comes from (ITM and ITC, both sides)")
        if config.architecture not in ARCHITECTURE_TASKS:
            raise ExportError(f"{config.architecture}: no BLIP-2 graphs, expected one of {sorted(ARCHITECTURE_TASKS)}")

    def check_precision(self, config, form):
        return None  # every form: the family's rules are precision_policy's

    # No ONNX Runtime attention form (graphs refuses ort_attention): int8-cpu and int4 convert from
    # the standard fp32 graphs.
    ort_attention_forms = False

    def precision_policy(self, graph, manifest):
        from .precision import policy

        return policy(graph, manifest)

    def tasks(self, config):
        from .export import architecture_tasks

        return architecture_tasks(config)

    def dims(self, config):
        from .export import dims_from_config

        return dims_from_config(config)

    def graphs(self, dims, tasks, ort_attention):
        from blip_runtime.families.blip2.graphs import graphs

        from ...files import ExportError

        if ort_attention:  # int8-cpu's fp32 source: its attention is ONNX Runtime's operator
            raise ExportError("BLIP-2 graphs have no ONNX Runtime attention form (int8-cpu); use --precision fp32")
        return graphs(dims, set(tasks))

    def axes(self, dims, limits):
        from blip_runtime.families.blip2.graphs import axes

        return axes(dims, limits)

    def wrapper(self, model, spec, tasks):
        from .export import dims_from_config
        from .wrappers import make_wrapper

        return make_wrapper(model, spec, dims_from_config(model.config))

    def trace_sizes(self, spec, dims):
        from .export import trace_sizes

        return trace_sizes(dims)

    def feeds(self, spec, dims, sizes, seed=0):
        # image tokens in LM prompts, left padding, positions from the mask (export.random_feeds)
        from .export import random_feeds

        return random_feeds(spec, dims, sizes, seed)

    def verify_sizes(self, spec, dims):
        from .export import verify_sizes

        return verify_sizes(dims)

    def bundle_parts(self, folder, config, tokenizer_dest):
        from .bundle_parts import bundle_parts

        return bundle_parts(folder, config, tokenizer_dest)

    def exercise(self, runtime, images, texts=None, batch_size=2, tasks=None, **generation):
        from .calibration import exercise

        return exercise(runtime, images, texts, batch_size, tasks, **generation)


FAMILY = Blip2Export()
