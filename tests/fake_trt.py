"""CPU stand-ins for CUDA (polygraphy.cuda) and TensorRT, so that the TensorRT backend's own logic
(engine bundle writing, binding by name, device buffers, kept outputs fed back, row gathers, profile
errors) is tested on machines without a GPU. 'Device memory' is host memory reached through raw
addresses, as device pointers are; an 'engine' is the ONNX graph plus its profile, run by ONNX
Runtime. What only real TensorRT can show (parser, kernels, numerics) is in the gpu-marked tests.
"""

from __future__ import annotations

import ctypes
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

VERSION, GPU, CC = "10.99.0", "Fake GPU", (8, 9)


class FakeCuda:
    """What blip_runtime.device uses of polygraphy.cuda, counting allocations and copies."""

    MemcpyKind = SimpleNamespace(HostToDevice="H2D", DeviceToHost="D2H", DeviceToDevice="D2D")

    def __init__(self):
        self.copies: Counter = Counter()  # kind -> count
        self.copied: Counter = Counter()  # kind -> bytes
        self.allocations = 0
        self.live = 0
        cuda = self

        class Stream:
            ptr = 0x5EED

            def synchronize(self):
                pass

            def free(self):
                pass

        class Raw:
            def __init__(self, nbytes):
                self._mem = (ctypes.c_char * nbytes)()
                self.ptr, self.allocated_nbytes = ctypes.addressof(self._mem), nbytes
                cuda.allocations += 1
                cuda.live += 1

            def free(self):
                if self._mem is not None:
                    cuda.live -= 1
                self._mem, self.ptr, self.allocated_nbytes = None, 0, 0

        self.Stream = Stream
        self.DeviceArray = SimpleNamespace(raw=lambda shape: Raw(int(shape[0])))

    def wrapper(self):
        return self

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        assert dst and src, "null pointer"
        self.copies[kind] += 1
        self.copied[kind] += nbytes
        ctypes.memmove(dst, src, nbytes)


def read(ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(ctypes.string_at(ptr, n), dtype).reshape(shape).copy()


def fake_engine_bytes(onnx_path: Path, profiles: list, timing_cache=None, tf32=False, parsed: list | None = None) -> bytes:
    """What the fake 'build' writes as `<graph>.engine`: the ONNX graph and its profiles.

    It goes the way trt_build._compile goes as far as TensorRT allows here: the polygraphy loader
    chain (trt_build.engine_loader) is made and must parse from the graph's path; then the graph is
    read from that path with the weights stored beside it, as TensorRT's parser reads them. Each
    loader is appended to `parsed` (what the tests inspect)."""
    import onnx

    from blip_export.trt_build import engine_loader

    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # as trt_build._compile: no note per graph
        loader = engine_loader(onnx_path, profiles, timing_cache, strongly_typed=True, tf32=tf32)
    network = loader._network
    assert type(network).__name__ == "NetworkFromOnnxPath" and network.path == str(onnx_path), \
        f"{onnx_path}: the parser must be given the graph's path, got {type(network).__name__}"
    if parsed is not None:
        parsed.append(loader)
    whole = onnx.load(str(onnx_path))  # external data resolves relative to the path
    return pickle.dumps({"onnx": whole.SerializeToString(), "profiles": profiles})


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None
        self.profile, self.executed = 0, 0  # as TensorRT: a new context is on profile 0

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.engine.profiles) or index in self.engine.taken:
            return False  # out of range, or held by another context
        self.engine.taken.discard(self.profile)
        self.profile = index
        self.engine.taken.add(index)
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)) or len(shape) != len(lo):
            return False  # as TensorRT: a shape outside the profile is refused
        self.shapes[name], self.results = tuple(shape), None
        return True

    def _run(self):
        if self.results is None:
            feeds = {n: read(self.addresses[n], self.shapes[n], self.engine.dtypes[n]) for n in self.engine.inputs}
            self.results = dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feeds)))
        return self.results

    def get_tensor_shape(self, name):
        return self.shapes[name] if name in self.engine.inputs else self._run()[name].shape

    def set_tensor_address(self, name, ptr):
        assert ptr, f"{name}: null address"
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.executed += 1
        for name, value in self._run().items():
            value = np.ascontiguousarray(value)  # keep a reference while its memory is copied
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.results = None
        return True


class _Engine:
    TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

    def __init__(self, data: bytes):
        import onnxruntime as ort

        blob = pickle.loads(data)
        self.profiles = blob["profiles"]
        self.taken: set[int] = set()  # profiles some context has selected
        self.session = ort.InferenceSession(blob["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {v.name: np.dtype(self.TYPES[v.type]) for v in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        return _Context(self)


def fake_tensorrt():
    """A module object with the part of the tensorrt API that TrtSession calls."""

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _Engine(data)

    return SimpleNamespace(__version__=VERSION, Logger=Logger, Runtime=Runtime)


def build_info(timing_cache=None, tf32=False) -> dict:
    return {"version": VERSION, "gpu": GPU, "compute_capability": list(CC), "polygraphy": "fake",
            "strongly_typed": True, "tf32": tf32, "timing_cache": str(timing_cache) if timing_cache else None}


def install(monkeypatch) -> FakeCuda:
    """Route blip_runtime's CUDA and TensorRT use, and trt_build's compile step, to the fakes."""
    import blip_export.trt_build as trt_build
    import blip_runtime.device as device
    import blip_runtime.trt_session as trt_session

    cuda = FakeCuda()
    cuda.parsed = []  # the polygraphy loaders of every fake build, in build order (see fake_engine_bytes)
    monkeypatch.setattr(device, "_cuda", lambda: cuda)
    monkeypatch.setattr(trt_session, "_tensorrt", fake_tensorrt)  # never in sys.modules: torch probes it
    monkeypatch.setattr(trt_session, "trt_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_session, "device_info", lambda: (GPU, CC))
    monkeypatch.setattr(trt_session, "_numpy_dtype", np.dtype)
    monkeypatch.setattr(trt_build, "check_trt_available", lambda: None)
    monkeypatch.setattr(trt_build, "_compile",
                        lambda path, shapes, cache=None, tf32=False: fake_engine_bytes(path, shapes, cache, tf32, cuda.parsed))
    monkeypatch.setattr(trt_build, "_build_info", build_info)
    return cuda
