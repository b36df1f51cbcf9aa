"""TrtSession: the TensorRT backend of `run(graph, feeds)`, keeping the KV cache on the GPU.

Same interface as OrtSession, with one extension: `run(graph, feeds, keep=patterns)` returns the
outputs whose names match a pattern (fnmatch, e.g. "present_*") as `DeviceTensor`s that stay in GPU
memory, and accepts DeviceTensors as feeds. The decoding loop feeds each step's `present_*` back as
the next step's `past_*` and the cross-attention K/V of `cross_kv` to every step, so neither ever
crosses to the host; only the logits do. Everything runs on one CUDA stream, in order; a run that
returns only kept outputs does not even wait for the GPU.

Tensors are bound by name (set_input_shape / set_tensor_address / execute_async_v3), the TensorRT
10 and 11 runtime API (polygraphy's TrtRunner uses the same calls). tensorrt and polygraphy are
imported only when a session is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

import numpy as np

from .device import BufferPool, DeviceTensor, device_info, gpu_unavailable_reason, to_host
from .manifest import BundleError, Manifest


def trt_unavailable_reason() -> str | None:
    """One line saying why TensorRT engines cannot be built or run here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'blip-trt[trt]' on a machine with an NVIDIA GPU)"
    except Exception as e:  # e.g. a wheel whose CUDA libraries do not load
        return f"tensorrt could not be imported ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return gpu_unavailable_reason()


def rebuild_command(manifest_data: dict, folder=None) -> str:
    """The `blip-export` command line that rebuilds this bundle's engines on the current machine."""
    source = manifest_data.get("build", {}).get("source", "MODEL")
    limits = manifest_data.get("limits", {})
    parts = [f"blip-export {source} --target trt --precision {manifest_data.get('precision', 'fp32')}"]
    if manifest_data.get("tasks"):
        parts.append(f"--tasks {','.join(manifest_data['tasks'])}")
    for key in ("max_batch", "max_text_len", "max_new_tokens", "num_beams"):
        if key in limits:
            parts.append(f"--{key.replace('_', '-')} {limits[key]}")
    parts.append(f"-o {folder if folder is not None else 'BUNDLE'}")
    return " ".join(parts)


def _cc(value) -> str:
    return ".".join(str(v) for v in value) if value else "unknown"


def check_engine_compatible(manifest_data: dict, trt_version: str, gpu_name: str, compute_capability: tuple,
                            folder=None) -> None:
    """Raise BundleError unless the engines of this manifest were built with TensorRT `trt_version`
    for a GPU named `gpu_name` of compute capability `compute_capability` (the live values).

    A TensorRT engine runs only on the TensorRT version that built it (engines are not version
    compatible unless built so) and on the GPU architecture it was built and timed for; a different
    GPU model of the same compute capability may load but runs tactics timed for another chip, so it
    is refused too. The message says what differs and the command that rebuilds on this machine."""
    where = f"{folder}: " if folder is not None else ""
    built = manifest_data.get("build", {}).get("tensorrt")
    if manifest_data.get("target") != "trt" or not isinstance(built, dict):
        raise BundleError(f"{where}not a TensorRT engine bundle (target {manifest_data.get('target')!r}); "
                          "run it with ONNX Runtime, or build engines with `blip-export MODEL --target trt`")
    differs = []
    if str(built.get("version")) != str(trt_version):
        differs.append(f"TensorRT {built.get('version')} (this machine has TensorRT {trt_version})")
    if tuple(built.get("compute_capability") or ()) != tuple(compute_capability):
        differs.append(f"compute capability {_cc(built.get('compute_capability'))} "
                       f"(this GPU has {_cc(compute_capability)})")
    if str(built.get("gpu", "")).strip() != str(gpu_name).strip():
        differs.append(f"the GPU {built.get('gpu')!r} (this machine has {gpu_name!r})")
    if differs:
        raise BundleError(
            f"{where}these TensorRT engines were built for {'; '.join(differs)}. An engine runs only with the "
            f"TensorRT version and on the GPU it was built for: rebuild it on this machine with "
            f"`{rebuild_command(manifest_data, folder)}`"
        )


def _tensorrt():
    import tensorrt  # optional heavy import, only when a session is made

    return tensorrt


_LOGGERS: list = []  # (tensorrt module, its logger)


def _logger(trt):
    """One TensorRT logger per process (TensorRT keeps the first one it is given anyway)."""
    for module, logger in _LOGGERS:
        if module is trt:
            return logger
    _LOGGERS.append((trt, trt.Logger(trt.Logger.WARNING)))
    return _LOGGERS[-1][1]


def _numpy_dtype(trt_dtype) -> np.dtype:
    from polygraphy.datatype import DataType  # knows every TensorRT type of 10 and 11

    return np.dtype(DataType.to_dtype(DataType.from_dtype(trt_dtype, "tensorrt"), "numpy"))


def _stand_in(value):
    """A zero-byte numpy array of the DeviceTensor's shape and dtype, so that the I/O table's checks
    (which read shape and dtype) apply to device feeds unchanged."""
    if isinstance(value, DeviceTensor):
        return np.broadcast_to(np.zeros((), value.dtype), value.shape)
    return value


@dataclass
class _Engine:
    engine: object  # trt.ICudaEngine
    contexts: list  # trt.IExecutionContext per optimization profile, in the engine's order
    profiles: list  # the manifest's profiles: [{input: [min, opt, max]}]
    dtypes: dict  # tensor name -> numpy dtype, as the engine has it

    def context_for(self, feeds: dict):
        """The context of the first profile that holds every feed's shape; the first context when none
        does (its set_input_shape then refuses the call) or when the engine has one profile (every
        engine but a multi-profile one: nothing to choose, nothing to compare per run)."""
        if len(self.contexts) == 1:
            return self.contexts[0]
        for context, profile in zip(self.contexts, self.profiles):
            if all(len(value.shape) == len(profile[n][0]) and all(lo <= s <= hi for lo, s, hi in zip(
                    profile[n][0], value.shape, profile[n][2])) for n, value in feeds.items() if n in profile):
                return context
        return self.contexts[0]


class TrtSession:
    """TensorRT engines of a bundle written by `blip-export --target trt`.

    `run(graph, feeds, keep=())`: feeds are numpy arrays or DeviceTensors of this session; returns
    numpy arrays, except DeviceTensors for the outputs whose names match a pattern in `keep`.
    `to_device(array)` uploads once what several runs read. Not thread-safe: one stream, one
    execution context per graph and optimization profile (a run takes the first profile that holds
    its shapes: BLIP-2 OPT's prompt call has its own). `close()` (or `with`) frees the GPU memory."""

    def __init__(self, manifest: Manifest):
        reason = trt_unavailable_reason()
        if reason:
            raise BundleError(f"{manifest.folder}: this bundle holds TensorRT engines, but {reason}; "
                              "export the checkpoint with `blip-export MODEL --target onnx` to run it on ONNX Runtime")
        trt = _tensorrt()
        name, cc = device_info()
        check_engine_compatible(manifest.data, trt.__version__, name, cc, folder=manifest.folder)
        self.manifest = manifest
        self._pool = BufferPool()
        self._runtime = trt.Runtime(_logger(trt))  # must outlive its engines
        self._engines: dict[str, _Engine] = {}
        for graph, spec in manifest.graphs.items():
            path = manifest.graph_path(graph)
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT could not load this engine (see its log above); rebuild with "
                                  f"`{rebuild_command(manifest.data, manifest.folder)}`")
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            wanted = {t.name for t in (*spec.inputs, *spec.outputs)}
            if names != wanted:
                raise BundleError(f"{path}: engine tensors {sorted(names)} differ from the manifest's {sorted(wanted)}")
            dtypes = {n: _numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
            entry = manifest.data["graphs"][graph]
            profiles = entry.get("profiles") or [entry.get("profile", {})]
            contexts = []  # one per profile: a profile serves one context at a time
            for i in range(len(profiles)):
                context = engine.create_execution_context()
                if context is None:
                    raise BundleError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
                if i and not context.set_optimization_profile_async(i, self._pool.stream.ptr):
                    raise BundleError(f"{path}: TensorRT could not select optimization profile {i}; rebuild with "
                                      f"`{rebuild_command(manifest.data, manifest.folder)}`")
                contexts.append(context)
            self._engines[graph] = _Engine(engine, contexts, profiles, dtypes)

    # -- the Session interface ------------------------------------------------------------------
    def run(self, graph: str, feeds: dict, keep: Sequence[str] = ()) -> dict:
        spec = self.manifest.graphs.get(graph)
        if spec is None:
            raise BundleError(f"graph {graph!r} is not in this bundle (it has {sorted(self.manifest.graphs)})")
        if self._pool.closed:
            raise RuntimeError("TrtSession.run after close()")
        spec.check_feeds({k: _stand_in(v) for k, v in feeds.items()})
        e = self._engines[graph]
        context = e.context_for(feeds)
        # Host feeds copied in for this run, held until it is enqueued: dropped earlier, a buffer would
        # go back to the pool and could come out again as one of this run's outputs.
        uploaded = []
        for t in spec.inputs:
            value = feeds[t.name]
            if isinstance(value, DeviceTensor):
                if value._pool is not self._pool:
                    raise ValueError(f"{graph}: input {t.name!r} is a DeviceTensor of another session")
            else:
                value = DeviceTensor.from_numpy(value, self._pool)
                uploaded.append(value)
            if value.dtype != e.dtypes[t.name]:
                raise BundleError(f"{graph}: the engine takes {t.name!r} as {e.dtypes[t.name]}, the manifest says "
                                  f"{value.dtype}; rebuild with `{rebuild_command(self.manifest.data, self.manifest.folder)}`")
            if not context.set_input_shape(t.name, value.shape):
                raise ValueError(self._outside_profile(graph, t.name, value.shape))
            context.set_tensor_address(t.name, value.ptr)
        outputs = {}
        for t in spec.outputs:
            shape = tuple(context.get_tensor_shape(t.name))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"{graph}: TensorRT could not infer the shape of output {t.name!r} ({shape})")
            outputs[t.name] = DeviceTensor.empty(shape, e.dtypes[t.name], self._pool)
            context.set_tensor_address(t.name, outputs[t.name].ptr)
        if not context.execute_async_v3(self._pool.stream.ptr):
            raise RuntimeError(f"{graph}: TensorRT execution failed (see the TensorRT log above)")
        kept = {n for n in outputs if any(fnmatchcase(n, p) for p in keep)}
        host = dict(zip([n for n in outputs if n not in kept], to_host([v for n, v in outputs.items() if n not in kept])))
        return {n: outputs[n] if n in kept else host[n] for n in outputs}

    def to_device(self, array: np.ndarray) -> DeviceTensor:
        """Upload `array` once, for feeding to several runs."""
        return DeviceTensor.from_numpy(np.asarray(array), self._pool)

    def close(self) -> None:
        """Free the execution contexts, engines and pooled GPU memory. DeviceTensors still alive
        free their own memory when dropped."""
        if self._pool.closed:
            return
        self._pool.stream.synchronize()
        for e in self._engines.values():
            e.contexts = []  # contexts before their engines, engines before the runtime
            e.engine = None
        self._engines.clear()
        self._runtime = None
        self._pool.close()

    def __enter__(self) -> "TrtSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _outside_profile(self, graph: str, name: str, shape: tuple) -> str:
        profile = self.manifest.data["graphs"][graph].get("profile", {}).get(name)
        bounds = f" (built for min {tuple(profile[0])}, max {tuple(profile[2])})" if profile else ""
        return (f"{graph}: input {name!r} has shape {tuple(shape)}, outside the shapes these engines were built "
                f"for{bounds}; rebuild with larger limits: "
                f"`{rebuild_command(self.manifest.data, self.manifest.folder)}` with a larger value where needed")
