"""Backend sessions: `run(graph, feeds) -> outputs`, by name. The decoding loop never sees which."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .graphs import BATCH, ROLE_LOOP
from .manifest import BundleError, Manifest


class Session(Protocol):
    def run(self, graph: str, feeds: dict, keep: Sequence[str] = ()) -> dict:
        """Outputs by name. `keep`: output name patterns a device backend may return as device
        tensors (fed back as inputs later without a host copy); host backends ignore it."""
        ...


# Rows per run of the CPU graphs that run once per request (vision, cross_kv), see OrtSession. Their
# activations grow with the batch and were the run's peak: BLIP-base fp32, batch 8, vision rose 461 MB
# and cross_kv 650 MB above the resident set in one run (its then fused K/V projection [8, 577, 24 * 768]
# and the 24 transposed outputs were alive together). Measured peak of the caption cases (greedy,
# 3 beams, batch 8; RESULTS_memory.md), arena off + trim: 1 row 1463 MB, 2 rows 1555 MB, whole
# batches 1719 MB (fp32; int8-cpu 814 / 865 / 1396 MB). A compute-bound graph loses nothing row by
# row (the paired timing there); the outputs are bit-identical.
ROWS_PER_RUN = 1

# OrtSession trims the heap after a run outside the decoding loop only when it had more rows than
# this. A single-row request's freed blocks are what the next single-row request reuses, and memory
# given back is faulted in again at a cost: on this project's machines (2-core VMs) a fresh page costs
# ~3 us, 0.8 ms per MB (touching a fresh 200 MB mapping). Measured, BLIP-base int8-cpu caption, the
# two policies in processes of their own run alternately (15 rounds, loaded machine): trimming after
# every such run 414 ms, after multi-row runs only 381 ms (1.105x per round; a second pair, order
# swapped, 1.04x; fp32 1.04x), peak RSS of greedy captioning 520 and 513 MB; the peak of greedy + 3
# beams + batch 8 is RESULTS_memory.md's.
TRIM_AFTER_ROWS = 1


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
                 memory: dict | None = None, rows_per_run: int | None = ROWS_PER_RUN, trim: bool = True,
                 graphs: Sequence[str] | None = None, loop_input_arena: bool | None = None):
        """`memory`: ONNX Runtime memory options (MEMORY_OPTIONS' keys) that replace the defaults;
        benchmarks/memory.py measures each of them. `loop_input_arena`: give ONNX Runtime's CPU arena
        back to the row-by-row graphs whose outputs all feed the decoding loop (feeds_loop_only);
        None: exactly when `memory` is None (the runtime's defaults). `rows_per_run`: on the CPU, a graph outside the
        decoding loop whose inputs and outputs all lead with the batch axis runs at most this many rows
        at a time, into outputs allocated once for the whole batch (see ROWS_PER_RUN); None: whole
        batches. `trim`: give the C heap's free pages back to the system after the sessions are made
        and after each run of more than TRIM_AFTER_ROWS rows of a graph outside the decoding loop
        (release_free_memory). `graphs`: the
        graphs to open (default: all), when another backend runs the rest (openvino_session)."""
        import onnxruntime as ort  # optional heavy import, only when a session is made

        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        wanted = provider_names(providers)
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
            if graph in arena_graphs:
                opts.enable_cpu_mem_arena = True
            return opts

        if not isinstance(trim, bool):
            raise ValueError(f"trim={trim!r}: expected True or False")
        if rows_per_run is not None and (not isinstance(rows_per_run, int) or isinstance(rows_per_run, bool)
                                         or rows_per_run < 1):
            raise ValueError(f"rows_per_run={rows_per_run!r}: expected an int >= 1 or None")
        names = list(manifest.graphs) if graphs is None else list(graphs)
        unknown = [g for g in names if g not in manifest.graphs]
        if unknown:
            raise ValueError(f"graphs={unknown}: not in this bundle (it has {sorted(manifest.graphs)})")
        self.manifest, self.trim = manifest, trim
        # Device providers hold activations in device memory, where whole batches run fastest.
        self.chunked = {name: rows_per_run for name, spec in manifest.graphs.items()
                        if rows_per_run and wanted == ["CPUExecutionProvider"] and _row_wise(spec)}
        if loop_input_arena is not None and not isinstance(loop_input_arena, bool):
            raise ValueError(f"loop_input_arena={loop_input_arena!r}: expected True, False or None")
        if loop_input_arena is None:
            loop_input_arena = memory is None
        # Only graphs run row by row: an arena keeps the largest run's blocks for the session's life,
        # which rows per run bound to one chunk's.
        arena_graphs = feeds_loop_only(manifest) & set(self.chunked) if loop_input_arena else set()
        self.sessions = {
            name: ort.InferenceSession(str(manifest.graph_path(name)), options(name), providers=providers)
            for name in names
        }
        for name, session in self.sessions.items():
            _check_io(manifest, name, session)
        if trim:
            release_free_memory()

    def run(self, graph: str, feeds: dict[str, np.ndarray], keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
        spec = opened_spec(self.manifest, graph, self.sessions, "ONNX Runtime")
        spec.check_feeds(feeds)
        names = [t.name for t in spec.outputs]
        rows = self.chunked.get(graph)
        batch = len(next(iter(feeds.values()))) if feeds else 0
        if rows is None or batch <= rows:
            out = dict(zip(names, self.sessions[graph].run(names, feeds)))
        else:
            out = self._run_in_chunks(graph, names, feeds, batch, rows)
        if self.trim and not spec.has(ROLE_LOOP) and batch > TRIM_AFTER_ROWS:
            # The freed activations of a once-per-request graph would stay resident beside the
            # next graph's (BLIP-base batch 8 peak, fp32: 1588 -> 1463 MB). Not between decoding
            # steps, which reuse the same blocks every step, and not after single-row runs (see
            # TRIM_AFTER_ROWS).
            release_free_memory()
        return out

    def _run_in_chunks(self, graph: str, names: list[str], feeds: dict[str, np.ndarray], batch: int,
                       rows: int) -> dict[str, np.ndarray]:
        """The whole batch's outputs are allocated once, from the I/O table's shapes, and ONNX Runtime
        writes each chunk of rows straight into its rows (IOBinding): nothing is concatenated and at
        most one chunk's activations are alive. An output axis that no input fixes: the first chunk
        runs as usual and gives the row shapes."""
        spec, session = self.manifest.graphs[graph], self.sessions[graph]
        bound = {a: n for t in spec.inputs for a, n in zip(t.shape, feeds[t.name].shape) if isinstance(a, str)}
        bound[BATCH] = batch
        out, first_row = {}, 0
        if all(isinstance(a, int) or a in bound for t in spec.outputs for a in t.shape):
            for t in spec.outputs:
                out[t.name] = np.empty([a if isinstance(a, int) else bound[a] for a in t.shape], t.dtype)
        else:
            first = session.run(names, {k: v[:rows] for k, v in feeds.items()})
            for name, value in zip(names, first):
                out[name] = np.empty((batch, *value.shape[1:]), value.dtype)
                out[name][:rows] = value
            del first
            first_row = rows
        binding = session.io_binding()
        for start in range(first_row, batch, rows):
            stop = min(start + rows, batch)
            parts = {name: np.ascontiguousarray(value[start:stop]) for name, value in feeds.items()}
            for name, part in parts.items():  # `parts` keeps each bound copy alive through the run
                binding.bind_cpu_input(name, part)
            for name, value in out.items():
                part = value[start:stop]  # leading rows of a C-contiguous array: contiguous memory
                binding.bind_output(name, "cpu", 0, value.dtype, list(part.shape), part.ctypes.data)
            session.run_with_iobinding(binding)
        return out


# Memory options of every graph's session (the graphs of feeds_loop_only get the arena back, see
# there); benchmarks/memory.py measures each (RESULTS_memory.md).
# Keys: SessionOptions attributes, or ONNX Runtime session config entries (with a dot).
# Measured, BLIP-base fp32 caption bundle, greedy + 3 beams + batch 8 once each, peak RSS: ONNX
# Runtime's defaults 2628 MB, without the CPU arena 2083 MB (the arena keeps every block the batch-8
# graphs grew it to for the session's life); with rows per run and the trim as well 1463 MB, against
# transformers' 1867 MB on the same run (int8-cpu: 1404 / 1207 / 814 MB). Tokens unchanged.
# Prepacking stays on: once the heap is trimmed it costs nothing resident (fp32 peak 1463 MB with or
# without it), and without it int8-cpu's MatMulNBits decoder step takes a slow path (first caption
# 22.7 s against 4.4 s).
MEMORY_OPTIONS: dict = {"enable_cpu_mem_arena": False}


def feeds_loop_only(manifest: Manifest) -> set[str]:
    """Graphs outside the decoding loop whose every output is an input of a loop graph (BLIP's
    cross_kv, BLIP-2 T5's t5_cross_kv): OrtSession's defaults give those that run row by row ONNX
    Runtime's CPU arena back. Their outputs live through the whole loop anyway and are a request's
    largest blocks (BLIP-base cross_kv: 24 x 1.8 MB per row); without an arena they are freed at the
    request's end, trimmed, and faulted in again by the next request. Measured, BLIP-base caption
    (20 tokens, one matmul per K/V projection, runtimes alternated in one process on a loaded
    machine): int8-cpu cross_kv 25 -> 14 ms per request with the arena, fp32 65 -> 52 ms; peak RSS of
    greedy + 3 beams + batch 8 (separate processes): int8-cpu 850 MB, fp32 1458 MB with the arena.
    Tokens are unchanged: the arena changes where the blocks are, not what is computed. The rule looks
    only at names: a graph whose outputs also went back to the caller would qualify as well."""
    loop_inputs = {t.name for spec in manifest.graphs.values() if spec.has(ROLE_LOOP) for t in spec.inputs}
    return {name for name, spec in manifest.graphs.items()
            if not spec.has(ROLE_LOOP) and spec.outputs and all(t.name in loop_inputs for t in spec.outputs)}


def _row_wise(spec) -> bool:
    """Whether the graph runs row by row: its rows are independent (every input and output leads
    with the batch axis) and each row is long enough to keep the cores busy on its own (no token-id
    input: image tokens, not a few text tokens). The decoding loop's step and the text graphs have a
    few positions per row, so per row they would read their weights once per row, and their
    activations are small anyway."""
    return (not spec.has(ROLE_LOOP) and all(t.high is None for t in spec.inputs)
            and all(t.shape[:1] == (BATCH,) for t in (*spec.inputs, *spec.outputs)))


def provider_names(providers) -> list[str]:
    """ONNX Runtime provider names of a providers list (a name, or a (name, options) pair each)."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def opened_spec(manifest: Manifest, graph: str, opened, engine: str):
    """The I/O table entry of `graph`, which a session of `engine` over the graphs `opened` is asked
    to run: BundleError for a graph not in the bundle, or one this session did not open."""
    spec = manifest.graphs.get(graph)
    if spec is None:
        raise BundleError(f"graph {graph!r} is not in this bundle (it has {sorted(manifest.graphs)})")
    if graph not in opened:
        raise BundleError(f"graph {graph!r} is not run by this {engine} session (it runs {sorted(opened)})")
    return spec


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    ONNX Runtime parses each graph file into heap memory, then packs the weights of its MatMuls into
    buffers of their own and frees the parsed copies; glibc keeps most of that freed memory, scattered
    between live blocks, resident: BLIP-base fp32 decoder_step 838 MB resident after its session's
    creation, 622 MB after the trim (in 48 ms; prepacking off: 622 MB either way). Only free memory is
    released, so the host process loses nothing by it; the next run that needs the pages faults
    them in again."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        import ctypes
        import ctypes.util

        try:
            _TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
        except OSError:  # no C library by that name (not glibc)
            _TRIM = None
    return _TRIM


_TRIM = False  # not looked up yet


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
