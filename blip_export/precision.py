"""Precision lives in the ONNX graph: fp32 graphs -> fp16 graphs with fp32 islands, and the checks
every converted graph must pass.

TensorRT 10/11 builds strongly typed networks (no FP16/INT8 builder flags, no calibrator), so the
precision of every tensor is decided here and TensorRT only compiles it. ONNX Runtime on the CPU runs
the same files, which is how the tests check them. INT8 lives in quantize.py, weight-only 4/8-bit in
weight_only.py, the measured exclusion search in quant_search.py, calibration data and the end-to-end
comparison in calibration.py; convert_bundle (here) turns an fp32 bundle folder into an fp16 /
int8-qdq / int8-cpu / int4 one with its measured accuracy in the manifest. A family adds its own
rules per graph (ExportFamily.precision_policy: graphs kept fp32 whole, more fp32 islands, its layer
groups, SmoothQuant to try), and the manifest's per-graph "precision" entry says what they did.

ONNX Runtime's CPU provider has fp16 kernels for few ops: it runs the others in fp32 between Casts it
inserts, and removes the Cast pairs between two such ops, so an fp16 overflow does not show on the CPU
(it does on TensorRT and CUDA). Tests that must see fp16 arithmetic run the graph in onnx's reference
evaluator (tests/export/blip2/test_blip2_fp16.py).

Graph inputs and outputs keep the dtypes of the I/O table (blip_runtime.graphs: float32 tensors,
int64 ids and masks) in every precision, so the runtime feeds every bundle the same arrays. The
decoder's KV cache therefore crosses the graph boundary as float32 (a Cast on each side inside the
graph); an fp16 cache would halve that traffic but needs a second I/O table, which is not worth it
until a benchmark says so.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from blip_runtime import BlipRuntime
from blip_runtime.graphs import ROLE_GEMV
from blip_runtime.image import ImageSettings
from blip_runtime.manifest import load_manifest
from blip_runtime.session import release_free_memory

from .files import ExportError, check_output, copy_file, graph_record, install, save_graph, sha256, staging
from .calibration import calibration_feeds, compare_runtimes, recorded_run
from .families import family
from .measure import check_typed, graph_errors, ort_session, run_all, set_metadata, tensor_types
from .quantize import HOLDOUT_FRACTION, INT8_BOUND, to_int8, to_int8_cpu
from .weight_only import INT4_BLOCK, INT4_BOUND, INT4_MIN_TOP1, to_int4

# fp32 islands of the fp16 graphs, by op type. Why each:
# - LayerNormalization: the variance is a mean of squares; fp16 overflows once |x| passes ~256 and
#   loses the small variances; the residual stream of ViTs carries outlier channels in the hundreds.
# - Softmax: the exp-sum is a long accumulation, and the scores of a fully masked row (left-padded
#   prompts) must stay finite (see fp16_islands).
# - ReduceL2: the ITC features' norm is a sum of squares (and its Clip/Expand/Div follow it; tiny).
FP16_KEEP_OPS = ("LayerNormalization", "Softmax", "ReduceL2")
# What the manifest says about each of the core's reasons (to_fp16's "why"; a family's come in its notes).
FP16_WHY = {
    "op_type": "LayerNormalization, Softmax, ReduceL2: means of squares and long exp-sums overflow or lose "
               "precision in fp16",
    "attention_mask": "the additive attention mask and its Add before Softmax: in fp16 float32 min becomes -inf "
                      "and a fully masked row NaN",
    "normalize": "the division of an L2 normalization by its norm",
    "constants": "constants read only by fp32 nodes",
}
# ONNX Runtime's default block list (ops without fp16 kernels: Range, CumSum, TopK, ...) stays blocked.


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph) -> dict[str, object]:
    return {name: node for node in graph.node for name in node.output}


def fp16_islands(model) -> dict[str, list[str]]:
    """Names of the nodes to keep in fp32, by reason: {"op_type": [...], "attention_mask": [...],
    "normalize": [...], "constants": [...]}.

    attention_mask: the Where that builds the additive mask (0 / float32 min, as transformers) and
    the Add that applies it to the scores before Softmax. In fp16 the mask clamps to -65504, score +
    mask rounds to -inf once the score is below about -16, and a fully masked row (a left-padding
    query) softmaxes to NaN; NaN in the keys/values of padding then poisons every later step through
    0 * NaN in probs @ V. Kept in fp32 the mask is exactly the fp32 graph's.
    """
    graph = model.graph
    consumers, producers = _consumers(graph), _producers(graph)
    keep = {"op_type": [], "attention_mask": [], "normalize": [], "constants": []}
    for node in graph.node:
        if node.op_type in FP16_KEEP_OPS:
            keep["op_type"].append(node.name)
        if node.op_type == "Softmax":
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add":
                keep["attention_mask"].append(add.name)
                for name in add.input:  # the mask's side of the Add: Where (maybe via Unsqueeze/Expand)
                    src = producers.get(name)
                    while src is not None and src.op_type in ("Unsqueeze", "Expand", "Cast", "Reshape"):
                        src = producers.get(src.input[0])
                    if src is not None and src.op_type == "Where" and src.name not in keep["attention_mask"]:
                        keep["attention_mask"].append(src.name)
        if node.op_type == "ReduceL2":  # F.normalize: x / expand(clip(norm(x)))
            frontier = [node]
            while frontier:
                nxt = []
                for n in frontier:
                    for c in consumers.get(n.output[0], []):
                        if c.op_type in ("Clip", "Expand", "Div") and c.name not in keep["normalize"]:
                            keep["normalize"].append(c.name)
                            nxt.append(c)
                frontier = nxt
    blocked = {n for names in keep.values() for n in names}
    # Constants read only by fp32 nodes stay fp32 (the mask's float32 min would clamp to -65504).
    for node in graph.node:
        users = consumers.get(node.output[0], []) if node.op_type == "Constant" else []
        if users and all(u.name in blocked for u in users):
            keep["constants"].append(node.name)
    return keep


def to_fp16(src: Path, dst: Path, graph: str, islands=None, notes: str = "") -> dict:
    """Write a mixed-precision copy of the fp32 graph `src` to `dst`: fp16 weights and activations,
    fp32 islands where fp16 overflows or loses accuracy (see FP16_KEEP_OPS and fp16_islands), graph
    inputs and outputs unchanged (float32 / int64, as the I/O table says).

    islands: the family's rule for more fp32 nodes (GraphPrecision.fp16_islands: onnx ModelProto
    -> {reason: [node names]}), merged with the core's; notes: why (GraphPrecision.notes).
    Returns what stays in fp32, for the manifest: {"precision": "fp16", "kept_fp32": {reason:
    [node names]}, "kept_fp32_ops": {op type: count}, "fp16_nodes": how many nodes compute in
    fp16 (Casts not counted), "fp16_round_trips_removed", "why": {core reason: why (FP16_WHY)}}
    (and "notes" when given: why the family's reasons).
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # ONNX Runtime's copy of onnxconverter-common's converter (same code, maintained with ORT), so
    # the export needs no extra package.
    # Types by shape inference on the graph file alone (the converter would serialize the whole model
    # for it, which fails over 2 GB), then the weights from beside src, if they are stored there.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    onnx.load_external_data_for_model(model, str(Path(src).parent))
    keep = fp16_islands(model)
    for reason, names in (islands(model) if islands else {}).items():
        keep[reason] = [n for n in names if n not in {m for v in keep.values() for m in v}]
    node_block = [n for names in keep.values() for n in names]
    fp16 = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_OPS)),
        node_block_list=node_block,
    )
    folded = _fold_round_trips(fp16.graph)
    OnnxModel.graph_topological_sort(fp16.graph, is_deterministic=True)  # the converter appends its Casts
    set_metadata(fp16, {"precision": "fp16"})
    save_graph(fp16, dst)  # beside the graph again when still over the threshold
    check_typed(dst)
    by_name = {n.name: n.op_type for n in fp16.graph.node}
    kinds = dict(Counter(by_name[n] for n in node_block))
    types = tensor_types(dst)
    fp16_nodes = sum(1 for n in fp16.graph.node if n.op_type != "Cast"
                     and any(types.get(o) == onnx.TensorProto.FLOAT16 for o in n.output))
    return {"precision": "fp16", "graph": graph, "kept_fp32": keep, "kept_fp32_ops": kinds, "fp16_nodes": fp16_nodes,
            "fp16_round_trips_removed": folded,
            "why": {k: FP16_WHY[k] for k, v in keep.items() if v and k in FP16_WHY},
            **({"notes": notes} if notes else {})}


def keep_fp32(src: Path, dst: Path, graph: str, reason: str) -> dict:
    """Write the fp32 graph `src` to `dst` unchanged but for its "precision" metadata (fp32): a graph
    that the family keeps in fp32 in a reduced-precision bundle (GraphPrecision.keep_fp32, `reason`).
    Returns the manifest's description: {"precision": "fp32", "graph", "kept_fp32": "whole graph", "reason"}."""
    import onnx

    model = onnx.load(str(src))  # with its external data, if any
    set_metadata(model, {"precision": "fp32"})
    save_graph(model, dst)
    return {"precision": "fp32", "graph": graph, "kept_fp32": "whole graph", "reason": reason}


def _fold_round_trips(graph) -> int:
    """Cast(to fp16) -> Cast(to fp32) becomes one Cast(to fp32) of the original tensor.

    The converter types every float tensor fp16 and puts Casts on both sides of each fp32 node, so a
    tensor between two fp32 nodes (mask constant -> Where -> Add, normalize Div -> graph output)
    goes through fp16 and back: the rounding the island exists to avoid, and float32 min casts to
    -inf (Cast does not saturate), which makes a fully masked row NaN. Returns how many were folded."""
    from onnx import TensorProto

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = _producers(graph)
    folded = 0
    for node in graph.node:
        parent = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if parent is not None and cast_to(node) == TensorProto.FLOAT and cast_to(parent) == TensorProto.FLOAT16:
            node.input[0] = parent.input[0]
            folded += 1
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    for n in dead:
        graph.node.remove(n)
    return folded


# -- bundles -------------------------------------------------------------------------------------

PRECISIONS = ("fp16", "int8-qdq", "int8-cpu", "int4")  # the forms convert_bundle writes (the manifest's "precision")


def _image_size(manifest) -> int:
    """The bundle's input image size (its image preprocessing's: the model's, checked at export)."""
    return ImageSettings.from_preprocessor_config(manifest.data["image"]).size[0]


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Stand-in held-out images when none are given (fp16 needs no calibration): smooth gradients
    with noise and a bright square, uint8 HxWx3, so the preprocessing and every graph see varied input."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 255, 3) + rng.normal(0, 20, (size, size, 3))
        a, b = rng.integers(0, size // 2, 2)
        base[a : a + size // 3, b : b + size // 3] = rng.uniform(0, 255, 3)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def _split(images, texts, holdout_images, holdout_texts):
    images = list(images or [])
    if holdout_images is not None:
        return images, texts, list(holdout_images), holdout_texts
    if not images:
        return [], None, [], None
    n = max(1, int(round(len(images) * HOLDOUT_FRACTION)))
    texts = list(texts) if texts else None
    return images[:-n], texts[:-n] if texts else None, images[-n:], texts[-n:] if texts else None


def convert_bundle(
    fp32_bundle: str | Path,
    dst: str | Path,
    precision: str,
    calib_images: list | None = None,
    calib_texts: Sequence[str] | None = None,
    holdout_images: list | None = None,
    holdout_texts: Sequence[str] | None = None,
    bound: float | None = INT8_BOUND,
    method: str = "minmax",
    progress=None,
    int4_bounds: tuple[float, float] = (INT4_BOUND, INT4_MIN_TOP1),
    int4_block: int = INT4_BLOCK,
) -> dict:
    """Write the `precision` form of the fp32 bundle at `fp32_bundle` to `dst`; returns its manifest.
    precision: fp16, int8-qdq (symmetric Q/DQ: TensorRT's form, and ONNX Runtime's TensorRT / CUDA
    providers'), int8-cpu (ONNX Runtime's CPU form), int8, which means int8-cpu here (an ONNX
    bundle: pipeline.resolve_precision), or int4 (the graphs of ROLE_GEMV, the decoding loop's step,
    with 4-bit weights: weight_only.to_int4; the others as int8-cpu). For int8-cpu and int4,
    blip-export converts from an fp32 bundle exported with ort_attention=True (its attention as ONNX
    Runtime's MultiHeadAttention) where the family has that form; a standard fp32 bundle converts as well.
    The family's rules for each graph (ExportFamily.precision_policy) apply on top of the core's.

    calib_images (paths, PIL images or uint8 HxWx3 arrays) with optional calib_texts (one text per
    image, or a {"caption", "question"} per image: calibration.texts_for): int8 is calibrated on them. Held-out images measure the accuracy: given,
    or for int8 the last quarter of calib_images; fp16 and int8-cpu calibrate nothing and measure on
    all the images given (synthetic ones when none are: synthetic_images).
    bound: the largest relative error an int8 graph may have on held-out feeds before layer groups
    are kept in fp32 (quantize.search_exclusions); None quantizes every layer with no search (the
    layers excluded by rule stay excluded); method: int8 calibration (minmax, percentile, entropy).
    int4_bounds: (relative error, top-1 agreement) of int4 graphs (bound None: no search either);
    int4_block: their weight block size (weight_only.INT4_BLOCK, measured there).
    """
    from .pipeline import resolve_precision  # pipeline imports this module lazily

    say = progress or (lambda msg: None)
    src = Path(fp32_bundle)
    precision = resolve_precision(precision, "onnx")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: expected one of int8, {', '.join(PRECISIONS)}")
    dst = check_output(dst)
    manifest = load_manifest(src)
    if manifest.data.get("precision", "fp32") != "fp32":
        raise ExportError(f"{src}: a {manifest.data['precision']} bundle; convert from the fp32 bundle")
    if precision != "int8-qdq" and holdout_images is None:  # nothing to calibrate: every image measures
        holdout_images, holdout_texts = calib_images or synthetic_images(4, _image_size(manifest)), calib_texts
        calib_images, calib_texts = [], None
    calib_images, calib_texts, holdout_images, holdout_texts = _split(
        calib_images, calib_texts, holdout_images, holdout_texts)
    if precision == "int8-qdq" and not calib_images:
        raise ExportError("int8-qdq needs calibration images (at least 2 when no held-out images are given: "
                          "a quarter is held out to measure the accuracy)")
    reference = BlipRuntime.load(src)
    say(f"recording fp32 feeds on {len(holdout_images)} held-out image(s)")
    # the fp32 runtime's end-to-end results come from the same run (compared at the end)
    held, expected = recorded_run(reference, holdout_images, holdout_texts)
    calib = {}
    if precision == "int8-qdq":
        say(f"recording fp32 feeds on {len(calib_images)} calibration image(s)")
        calib = calibration_feeds(reference, calib_images, calib_texts)
    # the runtime let go: a real-size BLIP-2 fp32 bundle held in ONNX Runtime through the
    # conversion put the int8 conversion at 18.5 GB resident
    del reference
    release_free_memory()

    with staging(dst) as tmp:
        data = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        fam = family(data["family"])
        graphs, accuracy = {}, {}

        def convert(key: str, name: str, entry: dict, source: Path, target: Path, policy, gemv: bool,
                    which=None) -> None:
            """Write `target`, the `precision` form of fp32 graph `name` (file `source`), and its manifest
            entry and held-out error as graph `key` (name, or its prompt twin), on those of the graph's
            feeds `which` selects (None: all)."""
            say(f"{precision}: {key}")
            def pick(feeds):
                return [f for f in feeds if which is None or which(f)]

            held_feeds = pick(held[name])
            if precision == "fp16" and policy.keep_fp32:
                info = keep_fp32(source, target, name, policy.keep_fp32)
            elif precision == "fp16":
                info = to_fp16(source, target, name, policy.fp16_islands, policy.notes)
            elif precision == "int4" and gemv:
                info = to_int4(source, target, name, held_feeds, bound=None if bound is None else int4_bounds[0],
                               min_top1=int4_bounds[1], block_size=int4_block, progress=say,
                               layer_groups=policy.layer_groups)
            else:  # int8-qdq, int8-cpu, and int4's graphs of many rows
                if precision == "int8-qdq":
                    def quantize(s, t):
                        return to_int8(s, t, name, pick(calib[name]), held_feeds, bound=bound, method=method, progress=say,
                                       layer_groups=policy.layer_groups)
                else:
                    def quantize(s, t):
                        return to_int8_cpu(s, t, name, held_feeds, bound=bound, progress=say, gemv=gemv,
                                           layer_groups=policy.layer_groups)
                if not policy.smooth_alphas:
                    info = quantize(source, target)
                else:
                    info = _smoothed_or_not(quantize, source, target, name, policy.smooth_alphas,
                                            pick(calib.get(name, ())) or held_feeds, bound, say)
            error = graph_errors(run_all(ort_session(target), held_feeds), run_all(ort_session(source), held_feeds))
            accuracy[key] = {**error, "feeds": len(held_feeds)}
            say(f"{key}: max abs {error['max_abs']:.3e}, relative {error['rel']:.3e}")
            # the converted graph's own files: a data file of the fp32 graph may not exist for it
            kept = {k: v for k, v in entry.items() if k not in ("file", "sha256", "data")}
            graphs[key] = {**graph_record(target), **kept, "precision": info}

        for name, entry in data["graphs"].items():
            source = src / entry["file"]
            if name not in held:
                raise ExportError(f"{name}: the held-out run never fed this graph")
            policy = fam.precision_policy(name, data)
            gemv = ROLE_GEMV in entry["io"].get("roles", ())
            if (gemv and policy.prompt_twin and precision in ("int8-cpu", "int4")
                    and policy.prompt_twin not in data["graphs"]):
                # the prompt's form: this graph as int8-cpu writes graphs of many rows (GraphPrecision.prompt_twin).
                # Listed before the graph, so that sessions open it first: the last session opened sees the
                # most resident memory at its load peak (raw and prepacked weights), and the twin is the larger
                # (real-size BLIP-2 int4: load peak 5679 MiB with the twin last, against 4892 before it)
                # (no roles: it runs once per request, so its pool does not spin and the heap is trimmed after it)
                io = {**entry["io"], "name": policy.prompt_twin, "roles": []}
                twin = {**entry, "io": io, "prompt_twin_of": name}
                convert(policy.prompt_twin, name, twin, source, tmp / f"{policy.prompt_twin}.onnx", policy, gemv=False,
                        which=policy.prompt_feeds)
            convert(name, name, entry, source, tmp / entry["file"], policy, gemv)
        graph_files = {f["file"] for e in data["graphs"].values() for f in (e, *e.get("data", ()))}
        for item in src.iterdir():  # tokenizer and anything else the bundle carries
            if item.is_file() and item.name not in graph_files and item.suffix != ".onnx" and item.name != "manifest.json":
                copy_file(item, tmp / item.name)
        import onnxruntime

        data.update(precision=precision, graphs=graphs)
        data["build"] = {**data.get("build", {}), "onnxruntime": onnxruntime.__version__,
                         "converted_from": {"bundle": str(src.resolve()), "manifest_sha256": sha256(src / "manifest.json")},
                         "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data["accuracy"] = {
            "reference": "the fp32 bundle, on feeds recorded from held-out images",
            "held_out": {"images": len(holdout_images), "feeds": {g: len(f) for g, f in held.items()}},
            "graphs": accuracy,
        }
        _write(tmp, data)
        say("end-to-end comparison on held-out images")
        data["accuracy"]["end_to_end"] = compare_runtimes(expected, BlipRuntime.load(tmp), holdout_images, holdout_texts)
        _write(tmp, data)
        say(f"moving the bundle into {dst}")  # the last report: a pending interrupt stops here (blip-export)
        install(tmp, dst)
    return data


def _smoothed_or_not(quantize, source: Path, target: Path, graph: str, alphas: tuple[float, ...],
                     feeds: list[dict], bound: float | None, say) -> dict:
    """`quantize(src, dst) -> info` (to_int8 / to_int8_cpu) from the fp32 graph and from its smoothed
    copies (smoothquant.choose_alpha over `alphas`, activation ranges over `feeds`: the calibration
    feeds, or int8-cpu's held-out ones, having none); the result whose search ended with the smallest
    error (quant_search.badness) is written to `target`. info["smoothing"] says which and every score."""
    import tempfile

    import onnx

    from .quant_search import INT8_MIN_TOP1, badness
    from .smoothquant import choose_alpha

    with tempfile.TemporaryDirectory(prefix=f"smooth-{graph}-") as tmp:
        work = Path(tmp)
        quantized: dict[str, tuple[Path, dict]] = {}

        def score(fp32_graph: Path) -> float:
            out = work / f"quantized{len(quantized)}.onnx"
            info = quantize(fp32_graph, out)
            quantized[str(fp32_graph)] = (out, info)
            return badness(info["error"], bound or INT8_BOUND, info.get("min_top1", INT8_MIN_TOP1))

        chosen = choose_alpha(source, work / "smoothed", feeds, score, alphas=alphas)
        path, info = quantized[str(chosen["path"] or source)]
        record = {"alpha": chosen["alpha"], "tried": list(alphas), "smoothed_norms": len(chosen["smoothed"]),
                  "kept": chosen["path"] is not None, "scores": chosen["scores"],
                  "unsmoothed_score": chosen["unsmoothed_score"]}
        say(f"{graph}: SmoothQuant {'kept at alpha ' + str(chosen['alpha']) if record['kept'] else 'not kept'} "
            f"(badness {chosen['unsmoothed_score']:.3f} without, {chosen['scores']} with)")
        save_graph(onnx.load(str(path)), target)
    return {**info, "smoothing": record}


def _write(folder: Path, data: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
