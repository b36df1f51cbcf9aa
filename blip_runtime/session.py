"""Backend sessions: `run(graph, feeds) -> outputs`, by name. The decoding loop never sees which."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .manifest import BundleError, Manifest


class Session(Protocol):
    def run(self, graph: str, feeds: dict, keep: Sequence[str] = ()) -> dict:
        """Outputs by name. `keep`: output name patterns a device backend may return as device
        tensors (fed back as inputs later without a host copy); host backends ignore it."""
        ...


class OrtSession:
    """ONNX Runtime over a bundle's graphs: CPU by default; `providers` selects CUDA or TensorRT
    execution providers (e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"])."""

    def __init__(self, manifest: Manifest, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort  # optional heavy import, only when a session is made

        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BundleError(
                f"providers {missing} are not available in this onnxruntime build (available: {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.manifest = manifest
        self.sessions = {
            name: ort.InferenceSession(str(manifest.graph_path(name)), options, providers=providers)
            for name in manifest.graphs
        }

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        spec = self.manifest.graphs.get(graph)
        if spec is None:
            raise BundleError(f"graph {graph!r} is not in this bundle (it has {sorted(self.manifest.graphs)})")
        spec.check_feeds(feeds)
        names = [t.name for t in spec.outputs]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))
