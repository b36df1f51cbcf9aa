"""Modeling pieces every family's reference modules share (common.py: attention, masks, activations,
the ONNX Runtime attention switch). Each family's own modules are in blip_export/families/<family>/modeling."""
