"""GPU memory for the TensorRT backend: `DeviceTensor`, a buffer pool, and what the GPU is.

All CUDA calls go through polygraphy's CUDA runtime wrapper (`polygraphy.cuda`: a ctypes binding of
libcudart), imported lazily: `import blip_runtime` needs neither polygraphy nor a GPU, and torch is
never used. The one raw ctypes use is for what that wrapper does not expose (device count, name and
compute capability), through its own libcudart handle.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

# cudaDeviceAttr values from CUDA's driver_types.h (stable since CUDA 5).
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76
_ALIGN = 256  # TensorRT wants I/O addresses aligned to 256 bytes; cudaMalloc gives that


def _cuda():
    from polygraphy import cuda  # optional heavy import: only the TensorRT backend needs it

    return cuda


def gpu_unavailable_reason() -> str | None:
    """One line saying why no CUDA GPU can be used here, or None when one can."""
    try:
        lib = _cuda().wrapper().handle
    except ImportError:
        return "polygraphy is not installed (pip install 'blip-trt[trt]')"
    except Exception as e:  # polygraphy raises its own exception type when libcudart is missing
        return f"the CUDA runtime library (libcudart) could not be loaded: {str(e).splitlines()[0]}"
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0:
        return f"no usable CUDA GPU (cudaGetDeviceCount returned CUDA error {status}: no GPU or no driver)"
    if count.value < 1:
        return "no CUDA GPU is visible (cudaGetDeviceCount found 0 devices)"
    return None


def device_info() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability (major, minor)) of the current CUDA device."""
    lib = _cuda().wrapper().handle
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    for status, call in (
        (lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice"),
        (lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev), "cudaDeviceGetAttribute"),
        (lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev), "cudaDeviceGetAttribute"),
    ):
        if status != 0:
            raise RuntimeError(f"{call} failed with CUDA error {status}")
    # cudaDeviceProp's first field is `char name[256]` in every CUDA version; the buffer is far larger
    # than the struct (about 1 KiB) so the layout of the rest does not matter. CUDA 12 exports the
    # current struct as cudaGetDeviceProperties_v2.
    props = ctypes.create_string_buffer(16384)
    get = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    status = get(props, dev)
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if status == 0 else "unknown GPU"
    return name.strip(), (major.value, minor.value)


def _bucket(nbytes: int) -> int:
    """Allocation size for `nbytes`: the next power of two (at least 256 bytes). A KV cache growing by
    one token per step then lives in two alternating buffers per tensor (past and present) and needs
    a new one only when it doubles, at the price of at most 2x its memory."""
    return 1 << (max(nbytes, _ALIGN) - 1).bit_length()


class BufferPool:
    """Device buffers recycled in stream order. Every use of a buffer is enqueued on the one stream of
    the owning session, so a buffer handed back while a kernel still reads it can be handed out again
    at once: the next writer runs after that kernel on the same stream."""

    def __init__(self):
        cuda = _cuda()
        self.stream = cuda.Stream()
        self._free: list = []  # polygraphy DeviceArray (raw bytes)
        self.closed = False

    def take(self, nbytes: int):
        """A raw DeviceArray of at least `nbytes` (best fit among free buffers at most twice as big)."""
        fits = [b for b in self._free if nbytes <= b.allocated_nbytes <= 2 * max(nbytes, _ALIGN)]
        if fits:
            best = min(fits, key=lambda b: b.allocated_nbytes)
            self._free.remove(best)
            return best
        return _cuda().DeviceArray.raw((_bucket(nbytes),))

    def give(self, buffer) -> None:
        if self.closed:
            buffer.free()
        else:
            self._free.append(buffer)

    def trim(self) -> None:
        """Free every idle buffer (after a request, to give memory back)."""
        self.stream.synchronize()
        while self._free:
            self._free.pop().free()

    def close(self) -> None:
        if not self.closed:
            self.trim()
            self.closed = True
            self.stream.free()


class DeviceTensor:
    """A tensor in GPU memory, owned by a TrtSession: what `run(..., keep=...)` returns for a kept
    output. Feed it back as an input of any graph of the same session and no host copy happens.
    DecoderInference can treat it as opaque: it has `shape`, `dtype`, `ndim`, `len()` and row
    gathering `t[indices]` (a 1-D integer array, along axis 0, done with device-to-device copies).
    `numpy()` copies it to the host. Its memory goes back to the session's pool when it is dropped."""

    __slots__ = ("shape", "dtype", "_buffer", "_pool", "__weakref__")

    def __init__(self, shape: Sequence[int], dtype, buffer, pool: BufferPool):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._buffer, self._pool = buffer, pool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        return self._buffer.ptr

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x})"

    @classmethod
    def empty(cls, shape, dtype, pool: BufferPool) -> "DeviceTensor":
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return cls(shape, dtype, pool.take(nbytes), pool)

    @classmethod
    def from_numpy(cls, array: np.ndarray, pool: BufferPool) -> "DeviceTensor":
        """Upload `array` (enqueued on the pool's stream; pageable memory is staged before the call
        returns, so the array may be dropped at once)."""
        array = np.ascontiguousarray(array)
        out = cls.empty(array.shape, array.dtype, pool)
        if array.nbytes:
            cuda = _cuda()
            cuda.wrapper().memcpy(out.ptr, array.ctypes.data, array.nbytes, cuda.MemcpyKind.HostToDevice,
                                  pool.stream.ptr)
        return out

    def numpy(self) -> np.ndarray:
        """Copy to a new host array (waits for the session's stream)."""
        return to_host([self])[0]

    def __getitem__(self, rows) -> "DeviceTensor":
        """Rows `rows` (1-D integers) of this tensor, as a new DeviceTensor: out[i] = self[rows[i]]."""
        index = np.asarray(rows)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise TypeError(f"DeviceTensor supports only row gathering with a 1-D integer array, got {rows!r}")
        if len(index) and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows: {index.tolist()}")
        index = np.where(index < 0, index + len(self), index).astype(np.int64)
        out = DeviceTensor.empty((len(index), *self.shape[1:]), self.dtype, self._pool)
        row = self.nbytes // len(self) if len(self) else 0
        if row:
            cuda = _cuda()
            copy, kind, stream = cuda.wrapper().memcpy, cuda.MemcpyKind.DeviceToDevice, self._pool.stream.ptr
            start = 0  # one copy per run of consecutive source rows
            for i in range(1, len(index) + 1):
                if i == len(index) or index[i] != index[i - 1] + 1:
                    copy(out.ptr + start * row, self.ptr + int(index[start]) * row, (i - start) * row, kind, stream)
                    start = i
        return out

    def __del__(self):
        try:
            self._pool.give(self._buffer)
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def to_host(tensors: Sequence[DeviceTensor]) -> list[np.ndarray]:
    """Copy DeviceTensors of one pool to new host arrays: all copies enqueued, then one wait."""
    outs = [np.empty(t.shape, t.dtype) for t in tensors]
    if not tensors:
        return outs
    cuda = _cuda()
    stream = tensors[0]._pool.stream
    for t, out in zip(tensors, outs):
        if out.nbytes:
            cuda.wrapper().memcpy(out.ctypes.data, t.ptr, out.nbytes, cuda.MemcpyKind.DeviceToHost, stream.ptr)
    stream.synchronize()
    return outs
