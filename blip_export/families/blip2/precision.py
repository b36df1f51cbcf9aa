"""BLIP-2's precision rules (ExportFamily.precision_policy), on top of the core's (blip_export.precision:
LayerNormalization, Softmax and the attention mask in fp32; blip_export.quantize: probabilities @ V
out of int8, the measured exclusion search).

fp16, per graph:
- vision (ViT-g): fp16 with the core's islands, as transformers runs it in fp16.
- qformer, itm, text_features (everything that runs Q-Former layers): fp32 entirely. transformers
  keeps the Q-Former in fp32 (Blip2's `_keep_in_fp32_modules`); its cross-attention over ViT-g's 257
  tokens and its LayerNorm-heavy residual stream are where BLIP-2 loses accuracy in fp16. These
  graphs are small (the Q-Former is 107 M parameters of BLIP-2's 3.8 B).
- opt_step, OPT's text_states: fp16 with the core's islands (OPT runs in fp16 in transformers; its
  LayerNorms and softmax stay fp32). opt_step runs the prompt too; int8-cpu and int4 bundles add
  opt_prefill, its many-row twin (GraphPrecision.prompt_twin): int8-cpu's 8-bit MatMulNBits step is
  made for one row per beam (DynamicQuantizeMatMul is twice as fast from 64 rows, weight_only), and
  int4 over a whole prompt had 6x int8-cpu's error (weight_only's figures).
- t5_encoder, t5_step, T5's text_states: fp16 but for T5_ISLANDS (see t5_islands). Flan-T5's
  feed-forward output wo(act(wi_0 x) * wi_1 x) reaches ~1e5 in the large checkpoints, past fp16's
  65504 (transformers keeps `wo` in fp32, `_keep_in_fp32_modules = ["wo"]`, and its fp32 output
  promotes the residual stream to fp32 from the first block on); an fp16 wo or residual Add gives
  inf, then NaN after the next RMSNorm, which decodes as one token repeated. T5's RMSNorm is
  decomposed (Cast, Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul): its x^2 overflows fp16 from |x| of
  256 on, so it is kept whole, as the core keeps LayerNormalization.
- t5_cross_kv: fp16 (two MatMuls per layer over the normalized encoder states).

int8 (int8-qdq, int8-cpu, and the non-step graphs of int4): OPT's graphs are tried with SmoothQuant
smoothing first (OPT_SMOOTH_ALPHAS; kept where it measures better). Every graph is quantized, the Q-Former's
too, and the exclusion search keeps in fp32 what loses too much. Layer groups: the core's
quantize.layer_group ("layers.N" -> "layers.*") names one role across the layers for ViT-g, the
Q-Former ("layer.N" there is the BERT layer index) and OPT. T5's graphs are not named that way: the
model calls each block's sub-layers itself, so torch.onnx names a node by the sub-layer
("/layer.0/k/MatMul": self-attention; layer.1 cross-attention in the decoder, layer.2 (decoder) or
layer.1 (encoder) the feed-forward) and tells the blocks apart by a suffix ("k_1", "layer.0_1",
"wo_3"); t5_layer_groups strips those suffixes, so a group is one role across the blocks.
"""

from __future__ import annotations

import re

from blip_runtime.families.blip2.graphs import prompt_call

from .. import GraphPrecision

QFORMER_GRAPHS = ("qformer", "itm", "text_features")
T5_GRAPHS = ("t5_encoder", "t5_step")  # and text_states when the LM is T5
# SmoothQuant before int8 for OPT's graphs (OPT from 6.7B on has LayerNorm-output channels ~100x the
# rest). Measured (benchmarks/smoothquant.py, an OPT with three x300 residual channels, 24 held-out
# images): step logits relative error int8 Q/DQ 3.8e-2 -> 1.2e-2 with alpha 0.5 (2.0e-2 at 0.75,
# 2.2e-2 at 0.85), int8-cpu dynamic 2.6e-2 -> 1.4e-2; identical captions 0.00 -> 1.00 (Q/DQ). The
# conversion keeps the smoothed graph only where its measured error is the smaller (precision.py).
OPT_SMOOTH_ALPHAS = (0.5,)  # the others measured (0.75, 0.85) were never better: one more search each
QFORMER_REASON = ("runs Q-Former layers, which stay fp32 as transformers keeps them (_keep_in_fp32_modules): "
                  "fp16 there is where BLIP-2 loses accuracy")
T5_NOTES = ("Flan-T5: the feed-forward output projection (wo), the residual Adds and the RMSNorms stay fp32: "
            "wo's activations reach ~1e5 in the large checkpoints and overflow fp16 (inf, then NaN after "
            "the next norm); transformers keeps wo in fp32 too")
_NORM_OPS = ("Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul")
_WO = re.compile(r"/wo(_\d+)?/MatMul$")


def policy(graph: str, manifest: dict) -> GraphPrecision:
    """The rules for `graph` of the BLIP-2 fp32 bundle described by `manifest` (manifest.json's data)."""
    lm = manifest.get("dims", {}).get("lm", "")
    if graph in QFORMER_GRAPHS:
        return GraphPrecision(keep_fp32=QFORMER_REASON)
    if graph in T5_GRAPHS or (graph == "text_states" and lm == "t5"):
        return GraphPrecision(fp16_islands=t5_islands, layer_groups=t5_layer_groups, notes=T5_NOTES)
    if graph == "t5_cross_kv":
        return GraphPrecision(layer_groups=t5_layer_groups)
    if graph == "opt_step":
        return GraphPrecision(smooth_alphas=OPT_SMOOTH_ALPHAS, prompt_twin="opt_prefill", prompt_feeds=prompt_call)
    if graph == "opt_prefill" or (graph == "text_states" and lm == "opt"):  # opt_prefill: the earlier layout's
        return GraphPrecision(smooth_alphas=OPT_SMOOTH_ALPHAS)
    return GraphPrecision()


def _index(graph):
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return producers, consumers


def t5_islands(model) -> dict[str, list[str]]:
    """Node names of `model` (a T5 graph) to keep in fp32 in fp16: {"rms_norm": [...],
    "feed_forward_output": [...], "residual": [...]}.

    rms_norm: each decomposed RMSNorm, found from its Pow -> ReduceMean (x^2 averaged): the Cast of
    its input to fp32 before it, and every Pow/ReduceMean/Add/Sqrt/Div/Mul of the same module scope
    after it, up to the Mul by its weight. feed_forward_output: the wo MatMuls (and the Cast to wo's
    dtype before each). residual: the Adds that read a norm's input (x + sublayer(norm(x))), which is
    the whole residual stream, as transformers has it after the first fp32 wo."""
    graph = model.graph
    producers, consumers = _index(graph)
    inits = {t.name for t in graph.initializer}
    norm, ff, residual = [], [], []
    norm_inputs = set()  # the residual stream, as each norm reads it (after its Cast to fp32)
    for pow_ in graph.node:
        if pow_.op_type != "Pow" or not any(c.op_type == "ReduceMean" for c in consumers.get(pow_.output[0], [])):
            continue
        scope = pow_.name.rsplit("/", 1)[0] + "/"
        cast = producers.get(pow_.input[0])
        found = [pow_]
        if cast is not None and cast.op_type == "Cast":
            found.insert(0, cast)
        norm_inputs.add(pow_.input[0])
        frontier = [pow_]
        while frontier:
            nxt = []
            for n in frontier:
                for c in consumers.get(n.output[0], []):
                    if c.op_type in _NORM_OPS and c.name.startswith(scope) and c not in found:
                        found.append(c)
                        if not (c.op_type == "Mul" and set(c.input) & inits):  # the weight: the norm ends
                            nxt.append(c)
            frontier = nxt
        norm += [n.name for n in found if n.name not in norm]
    for n in graph.node:
        if n.op_type == "MatMul" and _WO.search(n.name):
            src = producers.get(n.input[0])
            if src is not None and src.op_type == "Cast":
                ff.append(src.name)
            ff.append(n.name)
        elif n.op_type == "Add" and set(n.input) & norm_inputs and n.name not in norm:
            residual.append(n.name)
    return {"rms_norm": norm, "feed_forward_output": ff, "residual": residual}


def t5_layer_groups(names: list[str]) -> list[str]:
    """The layer group of each node name of a T5 graph: a scope's block suffix ("k_1", "layer.0_1",
    "wo_3") dropped where the scope without it names another node too, so "wi_0" and "wi_1" (two
    modules of one block) stay apart while "wi_0_1" (wi_0 of block 1) joins "wi_0"."""
    split = [n.split("/") for n in names]
    scopes = {(i, part) for parts in split for i, part in enumerate(parts[:-1])}

    def base(i: int, part: str) -> str:
        m = re.fullmatch(r"(.+)_\d+", part)
        return m.group(1) if m and (i, m.group(1)) in scopes else part

    return ["/".join([*(base(i, p) for i, p in enumerate(parts[:-1])), parts[-1]]) for parts in split]
