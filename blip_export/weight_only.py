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
  (precision.convert_bundle): their MatMuls see many rows, where 4-bit weights save bytes but not time,
  and lose more: on the 512-wide LMs of INT4_BLOCK's figures, OPT's prompt graph in int4 (block 32) had
  relative error 0.198 and top-1 0.917 against int8-cpu's 0.034 and 1.000 (5.0 vs 7.5 MB, 21.5 vs
  10.8 ms per call of 2 rows on the loaded 2-core machine), t5_encoder 0.82 against 0.22. So an int4
  bundle runs OPT's prompt through opt_prefill, opt_step's int8-cpu twin (GraphPrecision.prompt_twin).

Nodes the exclusion search (quant_search) keeps float stay fp32 MatMuls.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np

from .quant_search import describe, finish, is_large, pre_process, quantizable_nodes, search_graph

NBITS_BLOCK = 128  # int8-cpu's 8-bit MatMulNBits blocks (see above)
NBITS_ACCURACY_LEVEL = 4  # int8 compute: ONNX Runtime's fastest MatMulNBits path on x86
# int4 blocks: one fp32 scale per INT4_BLOCK weights along K (4 bits + 32 / INT4_BLOCK bits per
# weight). Measured on BLIP-2 step graphs with 512-wide LMs (2 layers, random weights std 0.04, every
# MatMul quantized, 4 held-out images x 8 greedy steps; relative error of the worst output, greedy
# top-1 agreement with fp32, file size; fp32 26.8 / 26.5 MB):
#   opt_step  block 32: rel 0.159, top-1 0.917, 4.99 MB   64: 0.177, 0.833, 4.59 MB   128: 0.206, 0.821, 4.39 MB
#   t5_step   block 32: rel 0.499, top-1 0.417, 4.77 MB   64: 0.512, 0.458, 4.37 MB   128: 0.614, 0.406, 4.17 MB
#   BLIP decoder_step (512 wide, 2 layers, ONNX Runtime attention form; fp32 31.1 MB):
#             block 32: rel 0.214, top-1 0.828, 5.24 MB   64: 0.259, 0.766, 4.76 MB   128: 0.258, 0.703, 4.52 MB
#   (8-bit MatMulNBits, block 128, for comparison: opt_step rel 0.018, top-1 0.988, 7.61 MB; t5_step 0.074,
#   0.958; BLIP decoder_step 0.029, 1.000, 8.35 MB)
# Block 32 has the least error at 9% more bytes than 128; the exclusion search does the rest.
INT4_BLOCK = 32
INT4_BLOCKS = (32, 64, 128)  # what ONNX Runtime's x86 kernels take with accuracy_level 4 and was measured
# Bounds of an int4 graph against fp32 (quant_search.badness): 4-bit round-to-nearest weights carry
# ~9% noise per weight (a step of max/7 per block of 32 Gaussian weights), which puts a whole step
# graph's relative logit error near 0.15 even when nothing is wrong (measured above), so int8's 0.05
# would keep nearly every layer in fp32 (8-bit, for int4). At (0.25, 0.9) the shipped easy-VQA
# Flan-T5 model kept every t5_step group in 4 bits and lost 1.3 points of captions on the full test
# split (97.70 % against 99.00 %); at (0.12, 0.97) 5 of its 10 groups stay 4-bit and captions and VQA
# are within 0.1 point of fp32 (99.00 %, 90.43 % against 90.48 %). Measured on the shipped
# calibration images, which are the held-out images of every converted form (pipeline.export).
INT4_BOUND = 0.12
INT4_MIN_TOP1 = 0.97


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


def nbits_quantize(pre: Path, out: Path, bits: int, block_size: int, exclude: list[str], large: bool,
                   fallback: tuple[int, int] | None = None) -> None:
    """MatMulNBits over every constant-weight MatMul of the graph at `pre` but `exclude`, symmetric
    weights of `bits` bits in blocks of `block_size`, int8 compute; written to `out`. fallback:
    (bits, block_size) for the `exclude`d MatMuls (None: they stay fp32)."""
    import onnx

    model = onnx.load(str(pre))
    for b, block, skip in ((bits, block_size, exclude), *([(*fallback, [])] if fallback and exclude else [])):
        q = _nbits_quantizer()(model, bits=b, block_size=block, is_symmetric=True,
                               accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=skip)
        with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
            q.process()  # a second pass sees only the MatMuls the first left: MatMulNBits is not MatMul
        model = q.model.model
    q.model.save_model_to_file(str(out), use_external_data_format=large)


def to_int4(
    src: Path,
    dst: Path,
    graph: str,
    feeds: Iterable[dict[str, np.ndarray]],
    bound: float | None = INT4_BOUND,
    block_size: int = INT4_BLOCK,
    granularity: str = "layer",
    min_top1: float = INT4_MIN_TOP1,
    progress=None,
    layer_groups=None,
    fallback_bits: int | None = 8,
) -> dict:
    """Write the `int4` form of the fp32 graph `src` to `dst`: every constant-weight MatMul as
    MatMulNBits with 4-bit symmetric weights in blocks of `block_size` along K (one fp32 scale each),
    int8 compute (accuracy_level 4), but the layer groups the exclusion search keeps out of 4 bits to
    hold the error on `feeds` (held-out) within `bound` and `min_top1`: those get `fallback_bits`
    (8: int8-cpu's MatMulNBits, blocks of NBITS_BLOCK; None: fp32). The search measures the graphs
    as written, fallback included. No calibration: weight-only.
    Returns the manifest's description (as to_int8_cpu's, with "format", "bits", "block_size",
    "excluded_groups_as": what the excluded groups became)."""
    if block_size not in INT4_BLOCKS:
        raise ValueError(f"block_size {block_size}: expected one of {INT4_BLOCKS}")
    say = progress or (lambda msg: None)
    held = list(feeds)
    with tempfile.TemporaryDirectory(prefix=f"int4-{graph}-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        large = is_large(src)
        pre_process(src, pre, large)
        nodes = quantizable_nodes(pre, ("MatMul",), const_weight_only=True)

        fallback = (fallback_bits, NBITS_BLOCK) if fallback_bits else None

        def quantize(exclude: list[str], out: Path) -> None:
            nbits_quantize(pre, out, 4, block_size, exclude, large, fallback)

        result = search_graph(src, pre, quantize, held, (bound, min_top1), granularity, Path(tmp), say, nodes, [],
                              layer_groups)
        finish(result["path"], dst, "int4")
    return {"precision": "int4", "format": "ort-matmulnbits-int4", "bits": 4, "block_size": block_size,
            "accuracy_level": NBITS_ACCURACY_LEVEL, "graph": graph, "measured_on_feeds": len(held),
            "excluded_groups_as": f"{fallback_bits}-bit MatMulNBits, blocks of {NBITS_BLOCK}" if fallback_bits else "fp32",
            **describe(result, bound, min_top1)}
