"""BLIP-2 as an export family (blip_export.families): its config reader and reference model load
today; its ONNX export stops with one clear ExportError until its graphs are in the table."""

from __future__ import annotations

from .. import ExportFamily


class Blip2Export(ExportFamily):
    name = "blip-2"
    display_name = "BLIP-2"
    key_prefixes = ("qformer.", "query_tokens", "language_model.", "language_projection.", "vision_projection.")

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


FAMILY = Blip2Export()
