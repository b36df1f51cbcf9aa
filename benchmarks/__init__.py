"""Benchmarks of BlipRuntime (ONNX Runtime bundles) against transformers on the same checkpoints.

Run everything with `.venv/bin/python -m benchmarks.run` from the repository root (see README.md).
"""
