"""Backend sessions: `run(graph, feeds) -> outputs`, by name. The decoding loop never sees which."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .graphs import ROLE_LOOP
from .manifest import BundleError, Manifest


class Session(Protocol):
    def run(self, graph: str, feeds: dict, keep: Sequence[str] = ()) -> dict:
        """Outputs by name. `keep`: output name patterns a device backend may return as device
        tensors (fed back as inputs later without a host copy); host backends ignore it."""
        ...


class OrtSession:
    """ONNX Runtime over a bundle's graphs: CPU by default; `providers` selects CUDA or TensorRT
    execution providers (e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]).

    Each graph has its own session and so its own intra-op thread pool. Only the pools of the
    decoding-loop graphs spin-wait for work (ONNX Runtime's default for all): a pool that spins after
    its graph finishes takes a core from the next graph of the request, which runs on another pool.
    With every pool spinning, cross_kv took 55 ms right after the vision graph against 30 ms alone,
    and a 20-token caption took 548 ms against 467 ms with spinning in the decoder loop only (int8-cpu;
    fp32 1209 vs 1098 ms; 2 cores, runtimes interleaved in one process). The loop keeps spinning: every
    step would otherwise wake sleeping threads for each of its ~100 parallel kernels. A process-wide
    pool would avoid both, but once ONNX Runtime has one, every other session in the process must use
    it, which a library cannot impose on its host."""

    def __init__(self, manifest: Manifest, providers: list | None = None, threads: int | None = None,
                 memory: dict | None = None):
        """`memory`: ONNX Runtime memory options (MEMORY_OPTIONS' keys) that replace the defaults;
        benchmarks/memory.py measures each of them."""
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
        def options(graph: str):  # graphs of the decoding loop (ROLE_LOOP): their pools spin between runs
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if manifest.graphs[graph].has(ROLE_LOOP) else "0")
            _apply_memory(opts, MEMORY_OPTIONS if memory is None else memory)
            return opts

        self.manifest = manifest
        self.sessions = {
            name: ort.InferenceSession(str(manifest.graph_path(name)), options(name), providers=providers)
            for name in manifest.graphs
        }
        for name, session in self.sessions.items():
            _check_io(manifest, name, session)

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        spec = self.manifest.graphs.get(graph)
        if spec is None:
            raise BundleError(f"graph {graph!r} is not in this bundle (it has {sorted(self.manifest.graphs)})")
        spec.check_feeds(feeds)
        names = [t.name for t in spec.outputs]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))


# Memory options of every graph's session; benchmarks/memory.py measures each (RESULTS_memory.md).
# Keys: SessionOptions attributes, or ONNX Runtime session config entries (with a dot).
# Measured, BLIP-base fp32 caption bundle, greedy + 3 beams + batch 8 once each, peak RSS: ONNX
# Runtime's defaults 2629 MB, without the CPU arena 2110 MB (the arena keeps every block the batch-8
# vision graph grew it to: 2629 MB still resident after the run against 1259 MB without it);
# transformers 1848 MB on the same run. Tokens unchanged. Prepacking stays on: without it fp32 saves
# another 156 MB after load, but int8-cpu's MatMulNBits decoder step falls to a slow path (a 20-token
# caption 44 s against seconds on the same loaded machine).
MEMORY_OPTIONS: dict = {"enable_cpu_mem_arena": False}


def _apply_memory(opts, options: dict) -> None:
    for key, value in options.items():
        if "." in key:
            opts.add_session_config_entry(key, str(value))
        elif hasattr(opts, key):
            setattr(opts, key, value)
        else:
            raise ValueError(f"memory option {key!r}: expected a SessionOptions attribute or a session config entry")


def _check_io(manifest: Manifest, name: str, session) -> None:
    """The manifest's I/O table must name the graph's own inputs and outputs: feeds are checked
    against the table, so a table edited apart from its graph would fail inside ONNX Runtime."""
    spec = manifest.graphs[name]
    for side, declared, actual in (("inputs", spec.inputs, session.get_inputs()),
                                   ("outputs", spec.outputs, session.get_outputs())):
        want, have = sorted(t.name for t in declared), sorted(t.name for t in actual)
        if want != have:
            raise BundleError(
                f"{manifest.graph_path(name)}: the manifest lists {side} {want} for graph {name!r}, the graph has "
                f"{have}; re-export the bundle"
            )
