"""Weight-only quantization with ONNX Runtime's MatMulNBits (com.microsoft): weights stored in blocks
of `block_size` along K with one fp32 scale per block, dequantized inside the kernel; activations
stay float (with accuracy_level 4 they are quantized to int8 per block at run time and the dot
products run in int8). CPU only: TensorRT cannot build these graphs.

Two uses:
- int8-cpu's graphs of ROLE_GEMV (quantize.to_int8_cpu(gemv=True)): 8-bit weights, blocks of
  NBITS_BLOCK. Graphs whose MatMuls see one row per request and beam stream their weights once per
  call, and this kernel streams them faster than DynamicQuantizeMatMul. Measured on the BLIP-base
  decoder step, 2 cores: batch 1 8.4 -> 7.7 ms per step (a 20-token caption's steps 175 -> 154 ms),
  3 rows 13.1 -> 13.3 ms, 8 rows 23.3 -> 25.6 ms; at 64 rows and more DynamicQuantizeMatMul is twice
  as fast, so the other graphs keep it.
- the int4 form (to_int4): 4-bit symmetric weights for the LM's step graphs (ROLE_GEMV), where
  the weights are the whole cost of a step: half int8's bytes to stream, a quarter of fp32's.
  Block size by measurement (INT4_BLOCK, figures there). The bundle's other graphs are int8-cpu
  (precision.convert_bundle): their MatMuls see many rows, where 4-bit weights save bytes but not time.

Nodes the exclusion search (quant_search) keeps float stay fp32 MatMuls.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np

from .quant_search import INT8_BOUND, INT8_MIN_TOP1, describe, finish, is_large, pre_process, quantizable_nodes, search_graph

NBITS_BLOCK = 128  # int8-cpu's 8-bit MatMulNBits blocks (see above)
NBITS_ACCURACY_LEVEL = 4  # int8 compute: ONNX Runtime's fastest MatMulNBits path on x86
# int4 blocks: one fp32 scale per INT4_BLOCK weights along K (4 bits + 32 / INT4_BLOCK bits per
# weight). Measured (see to_int4's figures in the module of the tests and the report of the export):
INT4_BLOCK = 32
INT4_BLOCKS = (32, 64, 128)  # what ONNX Runtime's x86 kernels take with accuracy_level 4 and was measured


def _nbits_quantizer():
    """onnxruntime's MatMulNBitsQuantizer class. Its module calls logging.basicConfig(level=INFO) when
    imported, which would turn on INFO logging for the whole host process (one line per node of
    every graph we quantize): a handler on the root logger during the import makes that a no-op."""
    import logging

    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.removeHandler(guard)
    return MatMulNBitsQuantizer


@contextmanager
def _quiet(logger_name: str):
    """The named logger at WARNING for the block (MatMulNBitsQuantizer logs every node at INFO)."""
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def nbits_quantize(pre: Path, out: Path, bits: int, block_size: int, exclude: list[str], large: bool) -> None:
    """MatMulNBits over every constant-weight MatMul of the graph at `pre` but `exclude`, symmetric
    weights of `bits` bits in blocks of `block_size`, int8 compute; written to `out`."""
    import onnx

    q = _nbits_quantizer()(onnx.load(str(pre)), bits=bits, block_size=block_size, is_symmetric=True,
                           accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=exclude)
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=large)


def to_int4(
    src: Path,
    dst: Path,
    graph: str,
    feeds: Iterable[dict[str, np.ndarray]],
    bound: float | None = INT8_BOUND,
    block_size: int = INT4_BLOCK,
    granularity: str = "layer",
    min_top1: float = INT8_MIN_TOP1,
    progress=None,
    layer_groups=None,
) -> dict:
    """Write the `int4` form of the fp32 graph `src` to `dst`: every constant-weight MatMul as
    MatMulNBits with 4-bit symmetric weights in blocks of `block_size` along K (one fp32 scale each),
    int8 compute (accuracy_level 4), but the layer groups the exclusion search keeps fp32 to hold the
    error on `feeds` (held-out) within `bound` and `min_top1`. No calibration: weight-only.
    Returns the manifest's description (as to_int8_cpu's, with "format", "bits", "block_size")."""
    if block_size not in INT4_BLOCKS:
        raise ValueError(f"block_size {block_size}: expected one of {INT4_BLOCKS}")
    say = progress or (lambda msg: None)
    held = list(feeds)
    with tempfile.TemporaryDirectory(prefix=f"int4-{graph}-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        large = is_large(src)
        pre_process(src, pre, large)
        nodes = quantizable_nodes(pre, ("MatMul",), const_weight_only=True)

        def quantize(exclude: list[str], out: Path) -> None:
            nbits_quantize(pre, out, 4, block_size, exclude, large)

        result = search_graph(src, pre, quantize, held, (bound, min_top1), granularity, Path(tmp), say, nodes, [],
                              layer_groups)
        finish(result["path"], dst, "int4")
    return {"precision": "int4", "format": "ort-matmulnbits-int4", "bits": 4, "block_size": block_size,
            "accuracy_level": NBITS_ACCURACY_LEVEL, "graph": graph, "measured_on_feeds": len(held),
            **describe(result, bound, min_top1)}
