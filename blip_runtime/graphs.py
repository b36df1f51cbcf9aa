"""Tensor and graph I/O specs, family-neutral.

Each family declares the I/O table of its graphs with these specs (blip_runtime/families/<family>/
graphs.py); the exporter (dynamic axes, ONNX names), the TensorRT optimization profiles, the
runtime's input checks and the tests all read it. It is pure data (no torch), so it lives in the
runtime and the exporter imports it. Axis entries are either an int (fixed by the model) or the
name of a symbolic axis; the family maps each axis name to its (min, opt, max) sizes for given
`Limits` (its `axes(dims, limits)`), and the exporter records that map in the manifest ("axes").

What a graph is used for is a role (GraphSpec.roles), never its name: the backends read roles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Symbolic axes most families share. "past" is the number of cached tokens (0 on the first decoding step).
BATCH, TEXT, PAST, ENC = "batch", "text", "past", "enc"

# Graph roles.
ROLE_LOOP = "loop"  # runs back to back in the decoding loop: its ONNX Runtime thread pool spin-waits between runs
ROLE_GEMV = "gemv"  # one row at a time: weights are streamed, int8-cpu quantizes it with MatMulNBits


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple  # ints and axis names
    high: int | None = None  # int inputs holding token ids: they lie in [0, high) (the vocabulary size)

    def check(self, graph: str, value: np.ndarray, bound: dict) -> None:
        """Raise ValueError if `value` does not fit; record axis sizes in `bound` so that every
        use of one axis name within a call agrees."""
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{graph}: input {self.name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(self.dtype):
            raise ValueError(f"{graph}: input {self.name!r} has dtype {value.dtype}, expected {self.dtype}")
        if value.ndim != len(self.shape):
            raise ValueError(f"{graph}: input {self.name!r} has shape {value.shape}, expected {self.shape}")
        for size, axis in zip(value.shape, self.shape):
            if isinstance(axis, int):
                if size != axis:
                    raise ValueError(f"{graph}: input {self.name!r} has shape {value.shape}, expected {self.shape}")
            elif bound.setdefault(axis, size) != size:
                raise ValueError(
                    f"{graph}: input {self.name!r} has {axis}={size}, but another input has {axis}={bound[axis]}"
                )

    @staticmethod
    def from_dict(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), d.get("high"))  # no "high": an old manifest


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""
    roles: tuple[str, ...] = ()  # ROLE_LOOP, ROLE_GEMV, ...

    def has(self, role: str) -> bool:
        return role in self.roles

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: axis name}} for torch.onnx.export."""
        return {
            t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in (*self.inputs, *self.outputs)
        }

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        names = {t.name for t in self.inputs}
        missing = names - feeds.keys()
        extra = feeds.keys() - names
        if missing or extra:
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}, unexpected inputs {sorted(extra)}")
        bound: dict[str, int] = {}
        for spec in self.inputs:
            spec.check(self.name, feeds[spec.name], bound)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "GraphSpec":
        tensors = lambda items: tuple(TensorSpec.from_dict(t) for t in items)  # noqa: E731
        return GraphSpec(d["name"], tensors(d["inputs"]), tensors(d["outputs"]), d.get("doc", ""),
                         tuple(d.get("roles", ())))  # no "roles": an old manifest


@dataclass(frozen=True)
class Limits:
    """Bounds the user sets at export time; each family turns them into the (min, opt, max) sizes
    of its symbolic axes (its `axes(dims, limits)`)."""

    max_batch: int = 8
    max_text_len: int = 40  # prompt / question / text tokens
    max_new_tokens: int = 30
    num_beams: int = 3
    opt_batch: int = 1


Axes = dict  # {axis name: (min, opt, max)}


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """Cache tensor names, optimum style: `past_key.0`, `past_value.0`, ..."""
    return [f"{prefix}_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def axes_to_dict(axes: Axes) -> dict[str, list[int]]:
    """JSON form of an axis table (the manifest's "axes")."""
    return {name: list(bounds) for name, bounds in axes.items()}


def axes_from_dict(data: dict) -> Axes:
    return {name: tuple(int(v) for v in bounds) for name, bounds in data.items()}


def profile_shapes(spec: GraphSpec, axes: Axes) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT optimization profile for `spec`: {input: (min shape, opt shape, max shape)}, from
    the family's axis table `axes` ({axis: (min, opt, max)})."""
    def size(axis, which):
        if isinstance(axis, int):
            return axis
        if axis not in axes:
            raise ValueError(f"{spec.name}: axis {axis!r} has no bounds (the table has {sorted(axes)})")
        return axes[axis][which]

    return {
        t.name: tuple(tuple(size(a, w) for a in t.shape) for w in range(3)) for t in spec.inputs
    }


def random_feeds(spec: GraphSpec, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs for `spec` at the given axis sizes (batch, text, past, enc; rows defaults
    to batch, total to past + text): used to trace the exporter and to verify graphs at several
    dynamic sizes. Token ids (inputs with `high`) lie in [1, high); int inputs without it are masks
    (right padding of r positions on row r), except position_ids (counting from past) and beam_idx
    (a permutation of the rows)."""
    rng = np.random.default_rng(seed)
    sizes = {"rows": sizes.get(BATCH, 1), **sizes}
    sizes["total"] = sizes.get(PAST, 0) + sizes.get(TEXT, 1)
    feeds = {}
    for t in spec.inputs:
        shape = tuple(a if isinstance(a, int) else sizes[a] for a in t.shape)
        if t.high is not None:
            feeds[t.name] = rng.integers(1, t.high, shape, dtype=np.int64)
        elif t.name == "position_ids":
            start = sizes.get(PAST, 0)
            feeds[t.name] = np.broadcast_to(np.arange(start, start + shape[1], dtype=np.int64), shape).copy()
        elif t.name == "beam_idx":
            feeds[t.name] = rng.permutation(shape[0]).astype(np.int64)
        elif t.dtype == "int64":  # masks: right padding of r positions on row r, keeping one real token
            mask = np.ones(shape, np.int64)
            for r in range(1, shape[0]):
                mask[r, shape[1] - min(r, shape[1] - 1) :] = 0
            feeds[t.name] = mask
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds
