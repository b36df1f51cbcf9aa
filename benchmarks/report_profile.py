"""RESULTS.md's ONNX Runtime profile section (benchmarks.report calls profile_section): per-op-type and
per-matmul-shape tables of the vision and decoder-step graphs, what they say against the machine's
limits, and the ideas the numbers point to."""

from __future__ import annotations

from .report_sections import MATMUL_OPS, TARGETS, fmt_s


def op_table(ops: list[dict], top: int = 8) -> list[str]:
    lines = ["| op type | nodes | ms per run | share |", "|---|---:|---:|---:|"]
    lines += [f"| {o['op']} | {o['nodes']} | {o['ms']:.2f} | {o['share']:.0%} |" for o in ops[:top]]
    return lines


def gemm_table(gemms: list[dict], rate: float, bw: float, top: int = 6) -> list[str]:
    """The matmuls by shape: what each reaches against the machine's matmul rate and bandwidth."""
    lines = ["| matmul A (input) → output | B | nodes | ms per run | GFLOP/s | of matmul rate | B read, GB/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for g in gemms[:top]:
        lines.append(f"| {g['shape']} | {'weight' if g['weight'] else 'activation'} | {g['nodes']} | {g['ms']:.2f} | "
                     f"{g['gflops']:.0f} | {g['gflops'] / rate:.0%} | {g['b_gbps']:.1f} ({g['b_gbps'] / bw:.0%}) |")
    return lines


def matmul_ms(ops: list[dict]) -> float:
    return sum(o["ms"] for o in ops if o["op"] in MATMUL_OPS)


def profile_section(results, lf, table) -> list[str]:
    """Per-op profiles and what they say, with the ideas the numbers point to."""
    prof, out, ideas = results["profile"], [], []
    v, d = prof["vision"], prof["decoder_step"]
    others = lambda ops: ", ".join([f"{o['op']} {o['ms']:.1f} ms ({o['share']:.0%})"  # noqa: E731
                                    for o in ops if o["op"] not in MATMUL_OPS][:4])
    mm = matmul_ms(v["ops"])
    fused_attention = any(o["op"] in ("Attention", "MultiHeadAttention") for o in v["ops"])
    out += [f"### vision ({_shapes(v)})", "", *op_table(v["ops"]), "",
            *gemm_table(v.get("gemms", []), lf["rate"], lf["bw"]), ""]
    if mm and not fused_attention:
        mm_rate = lf["flops"] / (mm / 1000) / 1e9
        out.append(f"- Kernel time {v['kernel_ms']:.0f} ms per run (under the profiler). The matmul-type kernels "
                   f"({', '.join(sorted(MATMUL_OPS & {o['op'] for o in v['ops']}))}) take {mm:.0f} ms "
                   f"= {mm / v['kernel_ms']:.0%}, i.e. {mm_rate:.0f} GFLOP/s, {mm_rate / lf['rate']:.0%} of the "
                   f"matmul rate; the rest is {others(v['ops'])}.")
        if mm_rate / lf["rate"] < TARGETS["vision_share"]:
            ideas.append(f"vision: the matmul kernels themselves reach only {mm_rate / lf['rate']:.0%} of the "
                         "big-GEMM rate at the ViT's shapes (table above); batching images raises M (see "
                         "itc-batch8 against caption-greedy in the limits section).")
    out += _fusion_lines("vision", v, ideas)
    out += ["", f"### decoder_step ({_shapes(d)})", "", *op_table(d["ops"]), "",
            *gemm_table(d.get("gemms", []), lf["rate"], lf["bw"]), ""]
    dm = matmul_ms(d["ops"])
    if dm:
        eff = lf["read_bytes"] / (dm / 1000) / 1e9
        out.append(f"- Kernel time {d['kernel_ms']:.1f} ms per step (profiled). MatMuls {dm:.1f} ms = "
                   f"{dm / d['kernel_ms']:.0%}: {lf['read_bytes'] / 1e6:.0f} MB of weights at {eff:.1f} GB/s "
                   f"(measured bandwidth {lf['bw']:.1f} GB/s). The rest: {others(d['ops'])}.")
    if lf.get("ort-fp32/per_token"):
        per, loop = lf["ort-fp32/per_token"], lf["ort-fp32/other_per_token"]
        out.append(f"- Per token in the caption run: {fmt_s(per)} in the graph plus {fmt_s(loop)} outside it "
                   "(numpy decoding loop, feeds, input checks), against a weight-read floor of "
                   f"{fmt_s(lf['read_s'])}.")
        if loop > 0.1 * per:
            ideas.append("decode loop: more than 10% of each step is spent outside the graph; IO binding "
                         "(ORT OrtValues kept between steps) and fewer per-step numpy copies would cut it.")
    weights = [g for g in d.get("gemms", []) if g["weight"] and g["ms"]]
    if weights:
        most, fastest = max(weights, key=lambda g: g["nodes"]), max(g["b_gbps"] for g in weights)
        if most["b_gbps"] < 0.7 * fastest:
            ideas.append(f"decoder GEMVs: the most frequent one ({most['nodes']}× `{most['shape']}`) streams its "
                         f"weights at {most['b_gbps']:.1f} GB/s against {fastest:.1f} GB/s for the largest: small "
                         "matmuls pay a fixed cost each. Concatenating weights that read the same input (the "
                         "self-attention Q, K and V projections) into one MatMul per layer cuts that.")
    slow_attn = [g for g in d.get("gemms", []) if not g["weight"] and g["ms"] > 0.05 * d["kernel_ms"]
                 and g["b_gbps"] < 0.5 * lf["bw"]]
    for g in slow_attn:
        fused = g["shape"].startswith("FusedMatMul")
        ideas.append(f"attention: `{g['shape']}` ({g['nodes']} nodes, {g['ms']:.1f} ms per step) reads its "
                     f"K/V operand at only {g['b_gbps']:.1f} GB/s"
                     + ("; ORT fused a scale or transpose into it (FusedMatMul), which runs these batched "
                        "matrix-vector products at about half the speed of a plain MatMul (measured): fold the "
                        "scale into the query weights and feed the keys pre-transposed, as the exporter does for "
                        "the text attention." if fused else
                        ": batched matrix-vector products (M = 1 per head) repack their operand on every call; "
                        "a GEMV kernel, or cross K/V stored in int8, would cut it."))
    concat = sum(o["ms"] for o in d["ops"] if o["op"] in ("Concat", "Slice"))
    if concat > 0.05 * d["kernel_ms"]:
        ideas.append(f"KV cache: Concat/Slice take {concat:.1f} ms per step ({concat / d['kernel_ms']:.0%}); a "
                     "preallocated cache written in place (past length as an input) removes the copies.")
    if dm and lf["read_bytes"] / (dm / 1000) / 1e9 < 0.7 * lf["bw"]:
        ideas.append("decode matmuls: the weights stream well below the measured bandwidth. At batch 1 these are "
                     "matrix-vector products (M = 1), bound by the bytes read: int8 weights cut them 4× "
                     "(ort-int8-cpu: 8-bit MatMulNBits, whose kernel streams one row's weights faster than "
                     "DynamicQuantizeMatMul), 4-bit MatMulNBits would cut them 8× at some accuracy.")
    out += _fusion_lines("decoder_step", d, ideas)
    if ideas:
        out += ["", "### What would speed up our ORT path", "", *[f"- {i}" for i in ideas]]
    return out


def _shapes(entry: dict) -> str:
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in entry.get("shapes", {}).items())


def _fusion_lines(graph: str, entry: dict, ideas: list[str]) -> list[str]:
    f = entry.get("fusions")
    if not f:
        return []
    if "error" in f:
        return [f"- onnxruntime.transformers optimizer on {graph}: failed ({f['error']})."]
    gain = 1 - f["fused_ms"] / f["base_ms"]
    new_ops = sorted({o["op"] for o in f["fused_profile"]} - {o["op"] for o in entry["ops"]})
    line = (f"- What-if, onnxruntime.transformers optimizer on {graph} (timed without the profiler, median of 5): "
            f"{f['base_ms']:.1f} → {f['fused_ms']:.1f} ms ({f['fused_ms'] / f['base_ms'] - 1:+.0%} time); "
            f"new op types among the top: {', '.join(new_ops) or 'none'}.")
    if gain > 0.03:
        ideas.append(f"{graph}: apply onnxruntime's transformer optimizer at export ({gain:.0%} measured here).")
    if not any(o in ("Attention", "MultiHeadAttention") for o in new_ops):
        ideas.append(f"{graph}: the optimizer found no attention pattern to fuse (no Attention/MultiHeadAttention "
                     "node). The int8-cpu form emits com.microsoft MultiHeadAttention directly (vision graph: 4-8% "
                     "faster at 577 tokens; decoder step, self- and cross-attention: 10%; each measured on the graph "
                     "alone); the fp32 form keeps standard ONNX ops so that TensorRT can build it.")
    return [line]
