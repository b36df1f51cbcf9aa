"""Which int8 form keeps a BLIP-2 OPT language model's graphs accurate when its activations carry
outlier channels: plain W8A8 Q/DQ, SmoothQuant smoothing then Q/DQ (alpha 0.5 / 0.75 / 0.85), or
int8 weights with float activations. Writes RESULTS_smoothquant.md beside this file.

Why: OPT from 6.7B on has a few hidden channels ~100x larger than the rest in the LayerNorm outputs
that feed its Linears; one int8 scale per activation tensor (Q/DQ, TensorRT's int8) is set by them
and the other channels round to a few steps. The public checkpoints cannot be downloaded here and a
6.7B model does not fit the machine, so a tiny BLIP-2 OPT checkpoint (random weights, built from a
config) gets outlier channels injected; the same comparison runs on the un-injected model, where
smoothing must not hurt.

Injections (`Outliers.mode`), all through the weights, on a few fixed channels j, factor k:
- "residual": the residual stream carries the outliers, as in OPT: column j of every first writer to
  it (embed_tokens, embed_positions, language_projection's rows and bias) times k. A LayerNorm keeps
  the ratio of its input channels, so the Linears it feeds see channel j large in every layer (diluted
  by each layer's normal-sized update: FACTORS). The Linears are unchanged; the fp32 model stays sane
  (finite logits of the plain model's spread, reported with each table).
- "reparam": an exact re-parametrisation: gamma_j, beta_j times k and the rows j of the Linears
  reading that LayerNorm divided by k, so the fp32 model computes the same function as the
  un-injected one and only what int8 sees changes (smoothing at any alpha undoes it exactly: s_j grows
  by k^alpha * k^(1-alpha) = k). Its small weight rows make weight quantization harder than in a
  trained model.
- "flat": large activations with flat weights, as SmoothQuant draws them: every LM LayerNorm's gamma_j
  and beta_j times k, the Linears unchanged. At a tiny width the k-times channels then dominate
  q/k/v/fc1/lm_head and the model is hypersensitive (no int8 form, weight-only included, comes close to
  its fp32): a negative result, kept to show it, not a stand-in for OPT.
Each form is compared with its own model's fp32 graphs.

Forms of opt_step, OPT's one LM graph (vision and qformer stay fp32), errors on held-out feeds
recorded by calibration_feeds on images that were not calibrated on, reported apart for the prompt's
calls (the "prefill" columns: queries given, past 0) and the later steps:
- fp32 smoothed: smooth_graph alone (an exact re-parametrisation: error ~1e-6);
- int8 Q/DQ: quantize.to_int8 with bound=None (no exclusion search; the attention-probability
  MatMuls stay fp32 by rule, as in every int8 graph);
- smooth a + Q/DQ: smooth_graph at alpha a on the calibration feeds, then the same to_int8;
- weight-only int8: int8 weights per output channel (DequantizeLinear on the weight only), float
  activations;
- int8-cpu dynamic / int8-cpu nbits: quantize.to_int8_cpu's two forms (u8 activations quantized
  per tensor at run time; MatMulNBits with int8 activations per block of 128 along K), also after
  smoothing at alpha 0.5.
For the un-injected model also the vision graph (pre-LayerNorm ViT): Q/DQ with and without smoothing.
Columns: relative error of the logits (max|a-b| / max|b|, worst feed) and of the worst output, top-1
agreement of the logits with fp32, and the end-to-end fraction of identical greedy token sequences
(captions, prompted captions, VQA answers) against the fp32 bundle.

    .venv/bin/python -m benchmarks.smoothquant [--work /tmp/smoothquant] [--hidden 128] [--factor K] [--models plain,residual,reparam,flat]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LM_GRAPHS = ("opt_step",)
PARTS = ("opt_prefill", "opt_step")  # the table's columns: opt_step's prompt calls, and its later steps


def _part(feeds: list[dict], part: str) -> list[dict]:
    """The prompt's calls of opt_step (queries given) for "opt_prefill", the later steps for "opt_step"."""
    from blip_runtime.families.blip2.graphs import prompt_call

    return [f for f in feeds if prompt_call(f) == (part == "opt_prefill")]
ALPHAS = (0.5, 0.75, 0.85)
RESULTS = Path(__file__).resolve().parent / "RESULTS_smoothquant.md"
MARKER = "<!-- measured tables -->"


@dataclass(frozen=True)
class Outliers:
    mode: str = "flat"  # "flat", "residual" or "reparam" (see the module docstring)
    channels: tuple[int, ...] = (3, 17, 40)  # a few fixed hidden channels, as OPT's are fixed
    factor: float = 60.0  # OPT-6.7B's outlier channels are ~60-100x the median channel


# Factor per mode that gives the LayerNorm outputs (the Linears' inputs) a channel spread of ~45-90:
# the residual stream's outliers are diluted by every layer's update (x60 at the embeddings measured a
# spread of ~18 at hidden 128, x300 ~48); the LayerNorm-side modes put k on the LayerNorm output itself.
FACTORS = {"residual": 300.0, "reparam": 60.0, "flat": 60.0}


@dataclass(frozen=True)
class LmShape:
    """The tiny LM: wider than the tests' 32 so that 3 outlier channels are a few of many."""

    hidden_size: int = 128
    ffn_dim: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    extra: dict = field(default_factory=lambda: {"tie_word_embeddings": False})


def _lm_norms(lm):
    """(LayerNorm, [Linears reading it]) of transformers' OPTForCausalLM (pre-LayerNorm layers)."""
    dec = lm.model.decoder
    pairs = []
    for layer in dec.layers:
        attn = layer.self_attn
        pairs.append((layer.self_attn_layer_norm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        pairs.append((layer.final_layer_norm, [layer.fc1]))
    if dec.final_layer_norm is not None:
        pairs.append((dec.final_layer_norm, [lm.lm_head]))
    return pairs


def inject_outliers(model, outliers: Outliers) -> None:
    """Give transformers' Blip2ForConditionalGeneration (OPT) outlier channels in place (see Outliers)."""
    import torch

    j, k = list(outliers.channels), float(outliers.factor)
    lm = model.language_model
    with torch.no_grad():
        if outliers.mode == "residual":
            dec = lm.model.decoder
            assert dec.project_in is None, "residual injection expects no project_in (word_embed_proj_dim = hidden)"
            dec.embed_tokens.weight[:, j] *= k  # (V, D)
            dec.embed_positions.weight[:, j] *= k  # (P, D)
            model.language_projection.weight[j, :] *= k  # (D, Dq): output rows
            model.language_projection.bias[j] *= k
            return
        if outliers.mode not in ("flat", "reparam"):
            raise ValueError(f"outliers.mode {outliers.mode!r}: expected 'flat', 'residual' or 'reparam'")
        for norm, linears in _lm_norms(lm):
            norm.weight[j] *= k
            norm.bias[j] *= k
            if outliers.mode == "reparam":
                for linear in linears:
                    linear.weight[:, j] /= k  # torch's (out, in): input columns


def build_checkpoint(folder: Path, outliers: Outliers | None, shape: LmShape = LmShape(), seed: int = 7):
    """Save a tiny BLIP-2 OPT checkpoint (re-randomized, optionally with outliers) to `folder`."""
    import transformers

    from tests.blip2_oracle import hf_config, processor, rerandomize

    text = {"hidden_size": shape.hidden_size, "word_embed_proj_dim": shape.hidden_size, "ffn_dim": shape.ffn_dim,
            "num_hidden_layers": shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
            **shape.extra}
    config = hf_config("opt", True, text_overrides=text)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    rerandomize(model, seed=seed, std=0.1)
    if outliers is not None:
        inject_outliers(model, outliers)
    model.save_pretrained(folder)
    processor("opt", config.num_query_tokens, config.vision_config.image_size).save_pretrained(folder)
    return model


def weight_only_int8(src: Path, dst: Path) -> int:
    """int8 weights per output channel with float activations: every MatMul whose second input is a
    constant 2-D float32 initializer reads DequantizeLinear(int8 weight, scale per column, axis 1)
    instead, the standard ONNX form of weight-only int8 (no Q/DQ on activations). Written here:
    onnxruntime's MatMulNBits quantizer writes 8 bits only as its own MatMulNBits op (QOperator).
    Returns how many MatMuls were converted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done: dict[str, str] = {}
    count = 0
    for node in list(graph.node):
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        t = inits.get(w)
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2:
            continue
        if w not in done:
            value = numpy_helper.to_array(t)  # (K, N)
            scale = np.maximum(np.abs(value).max(0), 1e-30) / 127.0  # (N,): symmetric, per output channel
            q = np.clip(np.round(value / scale), -127, 127).astype(np.int8)
            graph.initializer.extend([numpy_helper.from_array(q, f"{w}/int8"),
                                      numpy_helper.from_array(scale.astype(np.float32), f"{w}/scale")])
            done[w] = f"{w}/dequantized"
            graph.node.insert(list(graph.node).index(node), helper.make_node(
                "DequantizeLinear", [f"{w}/int8", f"{w}/scale"], [done[w]], name=f"{w}/DequantizeLinear", axis=1))
        node.input[1] = done[w]
        count += 1
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name in done and t.name not in used]:
        graph.initializer.remove(t)
    onnx.save_model(model, str(dst))
    return count


def lm_forms(src: Path, graph: str, calib: list, held: list, work: Path) -> dict[str, Path]:
    """{form: graph file} of every form of the fp32 graph `src` (see the module docstring)."""
    from blip_export.quantize import to_int8, to_int8_cpu
    from blip_export.smoothquant import smooth_graph

    out: dict[str, Path] = {}
    work.mkdir(parents=True, exist_ok=True)
    out["fp32 smoothed a=0.5"] = work / "smoothed-0.5.onnx"
    smooth_graph(src, out["fp32 smoothed a=0.5"], calib, 0.5)
    out["int8 Q/DQ"] = work / "qdq.onnx"
    to_int8(src, out["int8 Q/DQ"], graph, calib, held, bound=None)
    for alpha in ALPHAS:
        smoothed = work / f"smoothed-{alpha}.onnx"
        smooth_graph(src, smoothed, calib, alpha)
        out[f"smooth a={alpha} + Q/DQ"] = work / f"smooth-{alpha}-qdq.onnx"
        to_int8(smoothed, out[f"smooth a={alpha} + Q/DQ"], graph, calib, held, bound=None)
    out["weight-only int8"] = work / "weight-only.onnx"
    weight_only_int8(src, out["weight-only int8"])
    out["int8-cpu dynamic"] = work / "cpu-dynamic.onnx"
    to_int8_cpu(src, out["int8-cpu dynamic"], graph, held, bound=None)
    out["int8-cpu nbits"] = work / "cpu-nbits.onnx"
    to_int8_cpu(src, out["int8-cpu nbits"], graph, held, bound=None, gemv=True)
    smoothed = work / "smoothed-0.5.onnx"
    out["smooth a=0.5 + int8-cpu dynamic"] = work / "smooth-cpu-dynamic.onnx"
    to_int8_cpu(smoothed, out["smooth a=0.5 + int8-cpu dynamic"], graph, held, bound=None)
    out["smooth a=0.5 + int8-cpu nbits"] = work / "smooth-cpu-nbits.onnx"
    to_int8_cpu(smoothed, out["smooth a=0.5 + int8-cpu nbits"], graph, held, bound=None, gemv=True)
    return out


def vision_forms(src: Path, calib: list, held: list, work: Path) -> dict[str, float]:
    """{form: relative error on held-out feeds} of the vision graph: plain Q/DQ and smoothed + Q/DQ."""
    from blip_export.measure import graph_errors, ort_session, run_all
    from blip_export.quantize import to_int8
    from blip_export.smoothquant import smooth_graph

    work.mkdir(parents=True, exist_ok=True)
    ref = run_all(ort_session(src), held)
    out = {}
    to_int8(src, work / "qdq.onnx", "vision", calib, held, bound=None)
    out["int8 Q/DQ"] = graph_errors(run_all(ort_session(work / "qdq.onnx"), held), ref)["rel"]
    for alpha in ALPHAS:
        smooth_graph(src, work / "smoothed.onnx", calib, alpha)
        to_int8(work / "smoothed.onnx", work / "smooth-qdq.onnx", "vision", calib, held, bound=None)
        out[f"smooth a={alpha} + Q/DQ"] = graph_errors(run_all(ort_session(work / "smooth-qdq.onnx"), held), ref)["rel"]
    return out


def bundle_with(fp32_bundle: Path, dst: Path, graphs: dict[str, Path]) -> Path:
    """A copy of the fp32 bundle with `graphs` ({graph name: file}) in place of its own, the manifest's
    checksums updated (the runtime verifies them)."""
    from blip_export.files import graph_record

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(fp32_bundle, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for name, path in graphs.items():
        target = dst / data["graphs"][name]["file"]
        shutil.copyfile(path, target)
        data["graphs"][name].update(graph_record(target))
    (dst / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    return dst


def logit_stats(outputs: list[dict]) -> dict:
    """Sanity of a model's fp32 logits: finite, and how much they vary (std over rows and vocab)."""
    logits = np.concatenate([o["logits"] for o in outputs])
    return {"finite": bool(np.isfinite(logits).all()), "std": float(logits.std()),
            "distinct_top1": int(len(np.unique(logits.argmax(-1))))}


def measure_model(name: str, outliers: Outliers | None, work: Path, calib_images, held_images, shape: LmShape,
                  max_new_tokens: int, say=print) -> dict:
    """Every form's errors for one checkpoint: {"model", "outliers", "fp32", "spread", "forms": {form: {...}}}."""
    from blip_export.calibration import calibration_feeds, compare_runtimes
    from blip_export.measure import graph_errors, ort_session, run_all
    from blip_export.pipeline import export
    from blip_export.smoothquant import activation_ranges, find_groups
    from blip_runtime import BlipRuntime

    import onnx

    root = work / name
    if root.exists():
        shutil.rmtree(root)
    build_checkpoint(root / "ckpt", outliers, shape)
    export(root / "ckpt", root / "fp32")
    generation = {"max_new_tokens": max_new_tokens}
    calib = calibration_feeds(root / "fp32", calib_images, **generation)
    held = calibration_feeds(root / "fp32", held_images, **generation)
    reference = BlipRuntime.load(root / "fp32")
    injected = None if outliers is None else vars(outliers) | {"channels": list(outliers.channels)}
    result = {"model": name, "outliers": injected,
              "feeds": {g: [len(calib[g]), len(held[g])] for g in LM_GRAPHS}, "forms": {}}
    files: dict[str, dict[str, Path]] = {}
    refs = {}
    for graph in LM_GRAPHS:
        src = root / "fp32" / f"{graph}.onnx"
        refs[graph] = run_all(ort_session(src), held[graph])
        model = onnx.load(str(src), load_external_data=False)
        groups, _ = find_groups(model)
        for part in PARTS:  # the prompt's calls and the later steps apart
            ranges = activation_ranges(src, model, [g.output for g in groups], _part(held[graph], part))
            spreads = [float(r.max() / np.median(r)) for r, _ in ranges.values()]
            result.setdefault("spread", {})[part] = {"max": max(spreads), "median": float(np.median(spreads))}
        say(f"{name} {graph}: forms")
        for form, path in lm_forms(src, graph, calib[graph], held[graph], root / graph).items():
            files.setdefault(form, {})[graph] = path
    result["fp32"] = logit_stats(refs["opt_step"])
    if outliers is None:  # the image side (the injections leave it alone): does smoothing hurt a ViT?
        result["vision"] = vision_forms(root / "fp32" / "vision.onnx", calib["vision"], held["vision"], root / "vision")
    for form, graphs in files.items():
        row: dict = {}
        for part in PARTS:
            feeds = _part(held["opt_step"], part)
            err = graph_errors(run_all(ort_session(graphs["opt_step"]), feeds), run_all(ort_session(
                root / "fp32" / "opt_step.onnx"), feeds))
            row[part] = {"rel": err["rel"], "logits_rel": err["outputs"]["logits"]["rel"], "top1": err["top1"]}
        ours = BlipRuntime.load(bundle_with(root / "fp32", root / "bundles" / form.replace(" ", "_").replace("/", ""),
                                            graphs))
        e2e = compare_runtimes(reference, ours, held_images, **generation)
        row["e2e"] = {k: v["identical"] for k, v in e2e.items() if isinstance(v, dict) and "identical" in v}
        result["forms"][form] = row
        say(f"{name} {form}: " + ", ".join(f"{g} rel {row[g]['logits_rel']:.2e} top-1 {row[g]['top1']:.3f}"
                                           for g in PARTS) + f", identical {row['e2e']}")
    return result


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        o = r["outliers"]
        what = "no injection" if o is None else f"{o['mode']} outliers, channels {o['channels']} x{o['factor']:g}"
        sp = r["spread"]
        lines += [f"### {r['model']}: {what}", "",
                  f"fp32 logits: finite {r['fp32']['finite']}, std {r['fp32']['std']:.2f}, "
                  f"{r['fp32']['distinct_top1']} distinct greedy tokens over the held-out feeds. "
                  f"LayerNorm-output channel spread (largest per-channel max|x| / median, worst LayerNorm): "
                  f"prefill {sp['opt_prefill']['max']:.1f}, step {sp['opt_step']['max']:.1f}. "
                  f"Feeds (calibration, held out): {r['feeds']}.", "",
                  "| form | prefill logits rel | prefill top-1 | step logits rel | step top-1 | step worst-output rel "
                  "| identical captions | prompted | VQA |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for form, row in r["forms"].items():
            p, s, e = row["opt_prefill"], row["opt_step"], row["e2e"]
            lines.append(f"| {form} | {p['logits_rel']:.2e} | {p['top1']:.3f} | {s['logits_rel']:.2e} | {s['top1']:.3f} "
                         f"| {s['rel']:.2e} | {e.get('caption', float('nan')):.2f} | {e.get('caption_prompted', float('nan')):.2f} "
                         f"| {e.get('vqa', float('nan')):.2f} |")
        lines.append("")
        if "vision" in r:
            lines += ["Vision graph (pre-LayerNorm ViT, no injection), relative error of image_embeds on held-out feeds: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in r["vision"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    from blip_export.defaults import calibration_images, sample_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/smoothquant")
    p.add_argument("--hidden", type=int, default=LmShape.hidden_size)
    p.add_argument("--factor", type=float, default=None, help="outlier factor of every mode (default: FACTORS)")
    p.add_argument("--calib", type=int, default=8, help="calibration images (easy-VQA train split)")
    p.add_argument("--held-extra", type=int, default=16, help="train images held out besides the 8 test samples")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--models", default="plain,residual,reparam,flat")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file whose tables are replaced")
    args = p.parse_args()
    shape = LmShape(hidden_size=args.hidden, ffn_dim=2 * args.hidden)
    calib_images = calibration_images()[: args.calib]
    # held out: the easy-VQA test samples and train images after the calibration ones (never calibrated on)
    held_images = [s["path"] for s in sample_images()] + calibration_images()[40 : 40 + args.held_extra]
    work = Path(args.work)
    start = time.time()
    results = []
    for name in args.models.split(","):
        outliers = None if name == "plain" else Outliers(mode=name, factor=args.factor or FACTORS[name])
        results.append(measure_model(name, outliers, work, calib_images, held_images, shape, args.max_new_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    body = table(results)
    print(body)
    # The text above the marker is the written analysis: kept, the measured tables below it replaced.
    results_md = Path(args.results)
    text = results_md.read_text() if results_md.exists() else ""
    head = text.split(MARKER)[0] if MARKER in text else ""
    results_md.write_text(f"{head}{MARKER}\n<!-- generated by benchmarks/smoothquant.py in {time.time() - start:.0f} s; "
                       f"LM hidden {args.hidden}, {len(calib_images)} calibration and {len(held_images)} held-out "
                       f"images, {args.max_new_tokens} new tokens -->\n\n{body}\n")


if __name__ == "__main__":
    main()
