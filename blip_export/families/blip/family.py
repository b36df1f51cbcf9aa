"""BLIP as an export family (blip_export.families): its config reader, reference modules and
weights, the tasks of each architecture, its graphs and their wrappers, trace and verification
sizes, bundle contents and calibration workload."""

from __future__ import annotations

from blip_runtime.families.blip.graphs import axes as blip_axes, graphs as blip_graphs
from blip_runtime.graphs import BATCH, ENC, PAST, TEXT

from .. import ExportFamily
from .bundle_parts import TASKS_OF, bundle_parts, model_dims
from .config import BLIP_ARCHITECTURES, config_from_dict

# Graphs whose "enc" axis is the length of the encoder states they attend to (image tokens for a
# caption, question tokens for VQA); elsewhere it is the number of image tokens.
_OVER_ENCODER_STATES = ("cross_kv", "decoder_step")


class BlipExport(ExportFamily):
    name = "blip"
    display_name = "BLIP (BLIP-1)"
    task_names = ("caption", "vqa", "itm", "itc")
    key_prefixes = ("text_decoder.", "text_encoder.", "text_model.", "vision_proj.", "text_proj.", "visual_projection.")

    @property
    def architectures(self):
        return BLIP_ARCHITECTURES

    def read_config(self, data, source):
        return config_from_dict(data, source)

    def build(self, config, dtype):
        from ...weights import empty_module
        from .modeling.blip import MODEL_CLASSES

        return empty_module(lambda: MODEL_CLASSES[config.architecture](config), dtype)

    def load_weights(self, model, folder, config):
        from ...weights import load_into

        load_into(model, folder, tie_word_embeddings=bool(config.raw.get("tie_word_embeddings",
                                                                         config.text.tie_word_embeddings)))

    def check_exportable(self, config):
        return None

    def tasks(self, config):
        return TASKS_OF[config.architecture]

    def dims(self, config):
        return model_dims(config)

    def graphs(self, dims, tasks, ort_attention):
        # The ONNX Runtime forms carry the cross-attention keys in MultiHeadAttention's layout.
        return blip_graphs(dims, set(tasks), keys_transposed=not ort_attention)

    def axes(self, dims, limits):
        return blip_axes(dims, limits)

    def wrapper(self, model, spec, tasks):
        from .wrappers import make_wrapper

        return make_wrapper(model, spec, with_feat="itc" in tasks)

    def trace_sizes(self, spec, dims):
        return {BATCH: 2, TEXT: 3, PAST: 5, ENC: 7 if spec.name in _OVER_ENCODER_STATES else dims.num_image_tokens}

    def verify_sizes(self, spec, dims):
        """Batch 1 and 3, several text and past lengths."""
        enc = lambda n: n if spec.name in _OVER_ENCODER_STATES else dims.num_image_tokens  # noqa: E731
        return [
            {BATCH: 1, TEXT: 1, PAST: 0, ENC: enc(dims.num_image_tokens)},
            {BATCH: 3, TEXT: 5, PAST: 0, ENC: enc(4)},
            {BATCH: 3, TEXT: 1, PAST: 9, ENC: enc(6)},
            {BATCH: 2, TEXT: 11, PAST: 2, ENC: enc(dims.num_image_tokens)},
        ]

    def bundle_parts(self, folder, config, tokenizer_dest):
        return bundle_parts(folder, config, tokenizer_dest)

    def exercise(self, runtime, images, texts=None, batch_size=2, tasks=None, **generation):
        from .calibration import exercise

        return exercise(runtime, images, texts, batch_size, tasks, **generation)


FAMILY = BlipExport()
