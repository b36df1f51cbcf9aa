"""OpenVINO backend: OvSession runs a bundle's own ONNX graphs on OpenVINO's CPU plugin, and
RoutedSession sends each graph to the session of its backend, so that one runtime can run the
image graphs on OpenVINO and the decoding loop on ONNX Runtime (`BlipRuntime.load(backend="auto")`).

Nothing here changes the bundle: OpenVINO reads the same `.onnx` files ONNX Runtime does
(`Core.read_model`), and the same I/O table checks the feeds. `openvino` is imported only when an
OvSession is made, so `import blip_runtime` works without it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .graphs import ROLE_LOOP
from .manifest import BundleError, Manifest
from .session import OrtSession, Session, _check_io, feeds_loop_only, opened_spec, provider_names

ONNXRUNTIME, OPENVINO, AUTO = "onnxruntime", "openvino", "auto"
BACKENDS = (ONNXRUNTIME, OPENVINO, AUTO)  # BlipRuntime.load(backend=...)
INSTALL = "pip install 'blip-trt[openvino]'"


def import_openvino():
    """The openvino module, or one BundleError line that says how to install it."""
    try:
        import openvino  # optional heavy import, only when an OpenVINO session is made
    except ImportError:
        raise BundleError(f"backend 'openvino' needs OpenVINO, which is not installed: {INSTALL}") from None
    return openvino


def compile_config(threads: int | None) -> dict:
    """OpenVINO CPU plugin properties for every graph.

    INFERENCE_PRECISION_HINT "f32", for every form: precision lives in the graph (its dtypes, fp32
    islands, Q/DQ nodes), while the plugin's default is bf16 on a CPU with AVX512_BF16 or AMX (this
    one has AVX512_BF16). Measured on the tiny test model against ONNX Runtime, relative error of
    the worst output: fp32 graphs 1.6e-6 in f32, 2.2e-2 at the default (the decoder step's
    logits); fp16 1.5e-3 vs 1.6e-2; int8-qdq vision 4.8e-7 vs 2.1e-2. An int8-cpu graph (ONNX
    Runtime's dynamic quantization, which OpenVINO quantizes its own way) is as far from the fp32
    graph either way (vision 1.8e-2 in f32, 1.6e-2 at the default, ONNX Runtime's own 1.6e-2), and
    its timing showed no consistent difference (BLIP-base vision 2.1-2.5 s vs 2.3-2.9 s, loaded
    machine), so it takes f32 too. LATENCY: one request at a time, as the runtime runs them."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class _Port:
    """An OpenVINO port by the name the manifest uses for it (a port may carry several names)."""

    def __init__(self, port, wanted: set):
        names = port.get_names()
        self.name = next((n for n in sorted(names) if n in wanted), port.get_any_name())


class _Ports:
    """A compiled model's inputs and outputs seen as _check_io reads an ONNX Runtime session."""

    def __init__(self, compiled, spec):
        self.inputs = [_Port(p, {t.name for t in spec.inputs}) for p in compiled.inputs]
        self.outputs = [_Port(p, {t.name for t in spec.outputs}) for p in compiled.outputs]

    def get_inputs(self):
        return self.inputs

    def get_outputs(self):
        return self.outputs


class OvSession:
    """OpenVINO's CPU plugin over a bundle's ONNX graphs (all of them, or `graphs`), behind the
    Session protocol: feeds checked against the I/O table, outputs by name in the table's order,
    as numpy arrays of the table's dtypes that the caller owns.

    Each graph has one infer request, reused run after run; its output buffers are reused too, so
    every output is copied out (the decoding loop keeps the past of the last step while the next
    one runs). Batches run whole: the row-by-row runs of OrtSession are ONNX Runtime's memory
    measure (session.ROWS_PER_RUN)."""

    def __init__(self, manifest: Manifest, threads: int | None = None, graphs: Sequence[str] | None = None):
        ov = import_openvino()
        names = list(manifest.graphs) if graphs is None else list(graphs)
        unknown = [g for g in names if g not in manifest.graphs]
        if unknown:
            raise ValueError(f"graphs={unknown}: not in this bundle (it has {sorted(manifest.graphs)})")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads={threads!r}: expected an int >= 1 or None")
        self.manifest = manifest
        config = compile_config(threads)
        core = ov.Core()
        self.compiled, self.requests, self.outputs = {}, {}, {}
        for name in names:
            path = manifest.graph_path(name)
            try:
                compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except RuntimeError as e:  # OpenVINO's errors: a foreign or corrupt graph file, an unsupported op
                raise BundleError(f"{path}: OpenVINO cannot compile graph {name!r}: {' '.join(str(e).split())[:500]}") from None
            spec = manifest.graphs[name]
            ports = _Ports(compiled, spec)
            _check_io(manifest, name, ports)
            by_name = {p.name: port for p, port in zip(ports.outputs, compiled.outputs)}
            self.outputs[name] = [(t.name, np.dtype(t.dtype), by_name[t.name]) for t in spec.outputs]
            self.compiled[name] = compiled
            self.requests[name] = compiled.create_infer_request()

    @property
    def backends(self) -> dict[str, str]:
        """{graph: "openvino"} for every graph this session runs."""
        return {name: OPENVINO for name in self.compiled}

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """feeds: {input name: array} as the I/O table declares them; `keep` is ignored (host
        memory). Returns {output name: array} in the table's order, each a fresh array."""
        spec = opened_spec(self.manifest, graph, self.requests, "OpenVINO")
        spec.check_feeds(feeds)
        # share_inputs: OpenVINO reads the caller's arrays in place for the synchronous call;
        # share_outputs=False: the results are copies, not views of the request's reused buffers.
        result = self.requests[graph].infer(feeds, share_inputs=True, share_outputs=False)
        return {name: np.asarray(result[port]).astype(dtype, copy=False) for name, dtype, port in self.outputs[graph]}


class RoutedSession:
    """Several sessions behind one: each graph runs on the session of its backend. `routes`:
    {graph: backend name}; `sessions`: {backend name: session that runs those graphs}."""

    def __init__(self, manifest: Manifest, routes: dict[str, str], sessions: dict[str, Session]):
        missing = sorted(set(manifest.graphs) - routes.keys())
        if missing:
            raise ValueError(f"routes: no backend for graphs {missing}")
        unknown = sorted({b for b in routes.values()} - sessions.keys())
        if unknown:
            raise ValueError(f"routes: no session for backends {unknown} (sessions: {sorted(sessions)})")
        self.manifest, self.routes, self.sessions = manifest, dict(routes), dict(sessions)

    @property
    def backends(self) -> dict[str, str]:
        """{graph: "openvino" | "onnxruntime"}: which backend runs each graph."""
        return dict(self.routes)

    def run(self, graph: str, feeds: dict, keep: Sequence[str] = ()) -> dict:
        backend = self.routes.get(graph)
        if backend is None:
            raise BundleError(f"graph {graph!r} is not in this bundle (it has {sorted(self.manifest.graphs)})")
        return self.sessions[backend].run(graph, feeds, keep)


def openvino_installed() -> bool:
    try:
        import_openvino()
    except BundleError:
        return False
    return True


def _cpu_only(providers) -> bool:
    return not providers or provider_names(providers) == ["CPUExecutionProvider"]


def auto_routes(manifest: Manifest, providers: list | None = None) -> dict[str, str]:
    """{graph: backend} for backend "auto": OpenVINO for the graphs that run once per request
    (outside the decoding loop, ROLE_LOOP) of an fp32 bundle, except those whose outputs all feed the
    loop (session.feeds_loop_only: cross_kv), ONNX Runtime for the rest.

    Measured on this machine (AMD EPYC Zen 5, 2 threads, BLIP-base fp32 caption bundle), OpenVINO on
    our fp32 graphs against ONNX Runtime: vision 238 ms vs 306 ms (idle), but decoder_step 20 vs
    13 ms per token; the loop's many small kernels suit ONNX Runtime. cross_kv: 44 vs 73 ms while it
    was one fused matmul sliced apart; with one matmul per projection and ONNX Runtime's arena for it
    (session.feeds_loop_only), 65 vs 48 ms, so it stays on ONNX Runtime: `auto` with it there against
    `auto` with it on OpenVINO, alternated in one process, cross_kv 44 vs 56 ms and a 20-token caption
    698 vs 718 ms.
    Everything stays on ONNX Runtime when openvino is not installed, when `providers` name a device
    (the figures are CPU against CPU), and for the other forms: int8-cpu and int4 are ONNX Runtime's
    own (its dynamic-quantization and MatMulNBits operators; OpenVINO took 2.1-2.9 s for BLIP-base's
    int8-cpu vision graph, loaded machine), and fp16 / int8-qdq were not measured faster on OpenVINO."""
    use_openvino = (manifest.data.get("precision", "fp32") == "fp32" and _cpu_only(providers)
                    and openvino_installed())
    loop_inputs = feeds_loop_only(manifest)
    return {name: OPENVINO if use_openvino and not spec.has(ROLE_LOOP) and name not in loop_inputs else ONNXRUNTIME
            for name, spec in manifest.graphs.items()}


def open_session(manifest: Manifest, backend: str, providers: list | None = None,
                 threads: int | None = None) -> Session:
    """The session of an ONNX bundle for `backend` "openvino" (OvSession, every graph) or "auto"
    (RoutedSession over auto_routes). Both have `backends`: {graph: backend name}."""
    if backend == OPENVINO:
        if providers:
            raise ValueError(f"providers={providers!r}: ONNX Runtime's execution providers; backend 'openvino' "
                             "runs on OpenVINO's CPU plugin and takes none")
        return OvSession(manifest, threads)
    if backend != AUTO:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    routes = auto_routes(manifest, providers)
    on = {b: [g for g, r in routes.items() if r == b] for b in (ONNXRUNTIME, OPENVINO)}
    sessions: dict[str, Session] = {}
    if on[OPENVINO]:
        sessions[OPENVINO] = OvSession(manifest, threads, graphs=on[OPENVINO])
    if on[ONNXRUNTIME]:
        sessions[ONNXRUNTIME] = OrtSession(manifest, providers, threads, graphs=on[ONNXRUNTIME])
    return RoutedSession(manifest, routes, sessions)
