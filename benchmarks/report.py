"""RESULTS.md (and, through benchmarks.plot, results.png) from results.json.

Everything here is arithmetic on what benchmarks.run measured; re-render without measuring again:

    python -m benchmarks.report benchmarks/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import models
from . import report_sections as more
from .cases import BLIP2, NEW_TOKENS
from .report_profile import profile_section
from .report_sections import TARGETS, fmt_s
from .limits import graph_weight_bytes, vision_flops

STAGES = ("preprocess", "vision", "text_encoder", "cross_kv", "decoder_step")
STAGE_NAMES = {"preprocess": "preprocess", "vision": "vision", "text_encoder": "text encoder",
               "cross_kv": "cross K/V", "decoder_step": "decoder steps"}
UNITS = {"caption": "captions/s", "vqa": "answers/s", "itm": "pairs/s", "itc": "images/s"}


def model_facts(scale: str) -> dict:
    """FLOPs of one image through the vision graph and the bytes a decoder step reads."""
    config = json.loads((models.folder(scale, "caption") / "ckpt" / "config.json").read_text())
    decoder = models.bundle(scale, "caption", "fp32") / "decoder_step.onnx"
    dims = json.loads((decoder.parent / "manifest.json").read_text())["dims"]
    cross = 2 * dims["num_layers"] * dims["num_image_tokens"] * dims["text_hidden"] * 4  # K and V, fp32, one row
    return {"vision_flops": vision_flops(config["vision_config"]),
            "decoder": {**graph_weight_bytes(decoder), "cross_kv_bytes": cross},
            "vision_config": {k: config["vision_config"][k] for k in
                              ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")}}


def summarize(case_result: dict) -> dict:
    """Median and p90 of the end-to-end times; the median of each stage over the same runs."""
    times = np.array(case_result["times"])
    runs = case_result["stages"]
    stage = {s: float(np.median([r["seconds"].get(s, 0.0) for r in runs])) for s in STAGES}
    steps = [r["calls"].get("decoder_step", 0) for r in runs]
    other = [t - sum(r["seconds"].get(s, 0.0) for s in STAGES) for t, r in zip(times, runs)]
    per_token = [r["seconds"].get("decoder_step", 0.0) / n for r, n in zip(runs, steps) if n]
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)), "n": len(times),
            "stages": stage, "steps": int(np.median(steps)), "other": float(np.median(other)),
            "per_token": float(np.median(per_token)) if per_token else None, "output": case_result["output"]}


def collect(results: dict) -> tuple[dict, list[str]]:
    """{case: {contender: summary}} and the contenders in the order they ran."""
    table, order = {}, []
    for w in results["workers"]:
        if w["contender"] not in order:
            order.append(w["contender"])
        for case, r in w["cases"].items():
            table.setdefault(case, {})[w["contender"]] = summarize(r)
    return table, order


def blip_cases(results) -> list[dict]:
    """The BLIP-base cases (BLIP-2's have a section of their own: report_sections.blip2_lines)."""
    return [c for c in results["cases"] if c["model"] not in BLIP2]


def forms(results) -> dict[str, str]:
    """{contender: the precision form its bundle holds}, for the bundle contenders that ran."""
    return {w["contender"]: w["info"]["form"] for w in results["workers"] if "form" in w.get("info", {})}


def label(results, contender: str) -> str:
    """A contender's column name with the form it timed where the name does not say it ("ort-int8 = int8-cpu")."""
    form = forms(results).get(contender, "").split(",")[0]
    return f"{contender} = {form}" if form and " " not in form and not contender.endswith(form) else contender


def main_table(results, table, order) -> list[str]:
    base = results["baseline"]
    lines = ["| case | work | " + " | ".join(label(results, c) for c in order) + " |", "|---|---|" + "---|" * len(order)]
    for case in blip_cases(results):
        row = table.get(case["name"], {})
        work = f"batch {case['batch']}" + (f", {case['num_beams']} beams" if case["num_beams"] > 1 else "")
        if case["task"] in ("caption", "vqa"):
            work += f", {NEW_TOKENS} new tokens"
        cells = []
        for c in order:
            s = row.get(c)
            if s is None:
                cells.append("–")
                continue
            cell = f"{fmt_s(s['median'])} (p90 {fmt_s(s['p90'])})"
            if case["batch"] > 1:
                cell += f", {case['batch'] / s['median']:.2f} {UNITS[case['task']]}"
            if c != base and base in row:
                cell += f", **{row[base]['median'] / s['median']:.2f}×**"
            cells.append(cell)
        lines.append(f"| {case['name']} | {work} | " + " | ".join(cells) + " |")
    return lines


def stage_table(results, table, order) -> list[str]:
    lines = ["| case | contender | " + " | ".join(STAGE_NAMES[s] for s in STAGES) + " | per token | other | total |",
             "|---|---|" + "---:|" * (len(STAGES) + 3)]
    for case in blip_cases(results):
        for c in order:
            s = table.get(case["name"], {}).get(c)
            if s is None:
                continue
            cells = [fmt_s(s["stages"][st]) if s["stages"][st] else "–" for st in STAGES]
            if s["steps"]:
                cells[-1] += f" ({s['steps']})"
            per_token = fmt_s(s["per_token"]) if s["per_token"] else "–"
            lines.append(f"| {case['name']} | {label(results, c)} | " + " | ".join(cells)
                         + f" | {per_token} | {fmt_s(s['other'])} | {fmt_s(s['median'])} |")
    return lines


def memory_table(results) -> list[str]:
    rows = {}
    for w in results["workers"]:
        rows.setdefault(w["contender"], {})[w["model"]] = w
    lines = ["| contender | caption | vqa | itr | torch imported |", "|---|---:|---:|---:|---|"]
    for c, by_model in rows.items():
        cells = [f"{by_model[m]['peak_rss_mb']:.0f} MiB ({by_model[m]['rss_after_load_mb']:.0f})" if m in by_model
                 else "–" for m in ("caption", "vqa", "itr")]
        torch = "yes" if any(w["torch_loaded"] for w in by_model.values()) else "no"
        lines.append(f"| {label(results, c)} | " + " | ".join(cells) + f" | {torch} |")
    return lines


def limits_facts(results, table) -> dict:
    """The derived numbers the limits section and the targets use."""
    lim, facts = results["limits"], results["model"]
    rate, bw = lim["matmul"]["gflops"], lim["bandwidth"]["gbps"]
    out = {"rate": rate, "bw": bw, "flops": facts["vision_flops"], "read_bytes": facts["decoder"]["read_bytes"]}
    out["read_s"] = out["read_bytes"] / (bw * 1e9)
    for c in ("ort-fp32", results["baseline"]):
        greedy = table.get("caption-greedy", {}).get(c)
        if greedy and greedy["stages"]["vision"]:
            out[f"{c}/vision_s"] = greedy["stages"]["vision"]
            out[f"{c}/vision_gflops"] = out["flops"] / greedy["stages"]["vision"] / 1e9
            out[f"{c}/per_token"] = greedy["per_token"]
            out[f"{c}/other_per_token"] = greedy["other"] / max(greedy["steps"], 1)
        itc = table.get("itc-batch8", {}).get(c)
        if itc and itc["stages"]["vision"]:
            out[f"{c}/vision8_gflops"] = 8 * out["flops"] / itc["stages"]["vision"] / 1e9
    return out


def ratio(table, case, contender, base) -> float | None:
    row = table.get(case, {})
    return row[base]["median"] / row[contender]["median"] if contender in row and base in row else None


INT8_CONTENDERS = ("ort-int8", "ort-int8-cpu", "ort-int8-qdq")  # "ort-int8": as `--precision int8` resolves
ORT_CONTENDERS = ("ort-fp32", *INT8_CONTENDERS, "ort-fp16")


def best_ratio(ratios: dict[str, float | None]) -> tuple[dict[str, float], float | None, str | None]:
    """{contender: ratio or None} -> (the measured ones, the best ratio, "x.xx× (best; each x.xx×)")."""
    ratios = {c: r for c, r in ratios.items() if r}
    if not ratios:
        return ratios, None, None
    best = max(ratios, key=ratios.get)
    return ratios, ratios[best], (f"{ratios[best]:.2f}× ({best}; "
                                  + ", ".join(f"{c} {r:.2f}×" for c, r in ratios.items()) + ")")


def targets(results, table, lf) -> list[tuple[str, str, bool | None]]:
    base = results["baseline"]
    r32 = ratio(table, "caption-greedy", "ort-fp32", base)
    int8, r8, int8_text = best_ratio({c: ratio(table, "caption-greedy", c, base) for c in INT8_CONTENDERS})
    _, rb, batch8_text = best_ratio({c: ratio(table, "caption-batch8", c, base) for c in ORT_CONTENDERS})
    fp32_s = table.get("caption-greedy", {}).get("ort-fp32", {}).get("median")
    _, ro, separate = best_ratio({c: fp32_s / table["caption-greedy"][c]["median"] for c in int8 if fp32_s})
    pair = results.get("paired", {})
    pr = pair.get("ratios", {}).get("ort-fp32/ort-int8-cpu")
    if pr:  # alternating runs in one process: the same machine state for both (benchmarks.paired)
        int8_vs_fp32 = (f"{pr['median']:.2f}× paired (ort-int8-cpu, median of {pair['rounds']} alternating rounds, "
                        f"range {pr['min']:.2f}–{pr['max']:.2f}×); separate processes: {separate or 'not measured'}")
        ro = pr["median"]
    else:
        int8_vs_fp32 = separate or "not measured"
    versus = results.get("paired_transformers", {})
    r32_text = f"{r32:.2f}×" if r32 else "not measured"
    for name in ("ort-fp32", "ort-int8"):  # alternating rounds, each in its own process (benchmarks.paired)
        pv = versus.get("ratios", {}).get(f"{base}/{name}")
        if not pv:
            continue
        text = (f"{pv['median']:.2f}× paired ({name}, median of {versus['rounds']} alternating rounds, each "
                f"contender in its own process, range {pv['min']:.2f}–{pv['max']:.2f}×); separate blocks: ")
        if name == "ort-fp32":
            r32, r32_text = pv["median"], text + r32_text
        else:
            r8, int8_text = pv["median"], text + (int8_text or "not measured")
    share = lf.get("ort-fp32/vision_gflops", 0) / lf["rate"] if "ort-fp32/vision_gflops" in lf else None
    dec = lf["ort-fp32/per_token"] / lf["read_s"] if lf.get("ort-fp32/per_token") else None
    check = lambda v, t: None if v is None else v >= t  # noqa: E731
    return [
        ("caption batch 1 greedy, ORT fp32 ≥ 1.8× transformers end to end",
         r32_text, check(r32, TARGETS["caption_fp32"])),
        ("caption batch 1 greedy, ORT int8 ≥ 5× transformers end to end",
         int8_text or "not measured: no int8 bundle (see notes)", check(r8, TARGETS["caption_int8"])),
        ("vision graph fp32 ≥ 85% of the measured matmul rate (batch 1)",
         f"{share:.0%} ({lf['ort-fp32/vision_gflops']:.0f} of {lf['rate']:.0f} GFLOP/s)" if share else "not measured",
         check(share, TARGETS["vision_share"])),
        ("fp32 decode step ≤ 1.3× the time to read the decoder's weights once",
         f"{dec:.2f}× ({fmt_s(lf['ort-fp32/per_token'])} vs {fmt_s(lf['read_s'])})" if dec else "not measured",
         None if dec is None else dec <= TARGETS["decode_vs_read"]),
        ("caption batch 8 throughput ≥ 3× transformers batched",
         batch8_text or "not measured", check(rb, TARGETS["batch8"])),
        ("caption batch 1 greedy, int8 ≥ 2.5× faster than ORT fp32 end to end",
         int8_vs_fp32, check(ro, TARGETS["int8_vs_fp32"])),
    ]


def paired_lines(pair: dict | None) -> list[str]:
    """A paired measurement (benchmarks.paired: int8 against fp32 in one process, or the bundles
    against transformers each in its own process), when the run made one."""
    if not pair:
        return []
    sec, names = pair["seconds"], pair["order"]
    ratios = "; ".join(f"{k.split('/')[1]}: median {v['median']:.2f}×, per round "
                       + ", ".join(f"{r:.2f}" for r in v["per_round"]) for k, v in pair["ratios"].items())
    where = ("each in a worker process of its own, run alternately (one at a time), so that all see the same "
             "machine state" if pair.get("processes") else
             "loaded in one process and run alternately, so that both see the same machine state")
    return ["", f"Paired ({pair['case']}, {pair['rounds']} rounds after a warm-up round, "
            + " and ".join(names) + f" {where}; the separate-process medians above are minutes apart): "
            + ", ".join(f"{n} median {fmt_s(sec[n]['median'])} ({fmt_s(sec[n]['min'])}–{fmt_s(sec[n]['max'])})"
                        for n in names)
            + f". Speed-up over {names[0]}: {ratios}."]


def budget_lines(table, lf, base) -> list[str]:
    """For the caption-greedy targets: the time each contender may take, what its stages take, and
    the best it could do with every decoder step at the weight-read floor."""
    row = table.get("caption-greedy", {})
    if base not in row or "ort-fp32" not in row:
        return []
    t_base, lines = row[base]["median"], []

    def split(c):
        s, r = row[c]["stages"], row[c]
        fixed = r["median"] - s["decoder_step"]
        return (f"preprocess {fmt_s(s['preprocess'])}, vision {fmt_s(s['vision'])}, cross K/V "
                f"{fmt_s(s['cross_kv'])}, {r['steps']} decoder steps {fmt_s(s['decoder_step'])} "
                f"({fmt_s(r['per_token'])} each), rest {fmt_s(r['other'])}"), fixed

    parts, fixed = split("ort-fp32")
    floor = fixed + row["ort-fp32"]["steps"] * lf["read_s"]
    lines.append(f"- ort-fp32, target {fmt_s(t_base / TARGETS['caption_fp32'])} (transformers / "
                 f"{TARGETS['caption_fp32']}): {parts}. The vision graph already runs at the matmul rate; with "
                 f"every step at the weight-read floor ({fmt_s(lf['read_s'])}) the total would be {fmt_s(floor)} "
                 f"= {t_base / floor:.2f}× transformers, so the fp32 target needs the steps within "
                 f"{max(0.0, (t_base / TARGETS['caption_fp32'] - fixed) / row['ort-fp32']['steps'] / lf['read_s']):.2f}× "
                 "of their floor.")
    int8 = [c for c in INT8_CONTENDERS if c in row]
    if int8:
        c = min(int8, key=lambda k: row[k]["median"])
        parts, fixed = split(c)
        floor8 = lf["read_s"] / 4  # int8 weights: a quarter of the bytes
        best = fixed + row[c]["steps"] * floor8
        lines.append(f"- {c}, target {fmt_s(t_base / TARGETS['caption_int8'])} (transformers / "
                     f"{TARGETS['caption_int8']}) and {fmt_s(row['ort-fp32']['median'] / TARGETS['int8_vs_fp32'])} "
                     f"(ort-fp32 / {TARGETS['int8_vs_fp32']}): {parts}. Its vision graph does "
                     f"{lf['flops'] / max(row[c]['stages']['vision'], 1e-9) / 1e9:.0f} GOP/s in int8 against "
                     f"{lf['rate']:.0f} GFLOP/s fp32, {row['ort-fp32']['stages']['vision'] / max(row[c]['stages']['vision'], 1e-9):.1f}× "
                     f"the fp32 graph; with every step at the int8 weight-read floor ({fmt_s(floor8)}) the total "
                     f"would be {fmt_s(best)} = {t_base / best:.2f}× transformers and "
                     f"{row['ort-fp32']['median'] / best:.2f}× ort-fp32: the vision graph alone "
                     f"({fmt_s(row[c]['stages']['vision'])}) is "
                     f"{row[c]['stages']['vision'] / (t_base / TARGETS['caption_int8']):.0%} of the 5× budget.")
    return lines


def markdown(results: dict) -> str:
    table, order = collect(results)
    lf = limits_facts(results, table)
    m, v, lim, vc = results["machine"], results["versions"], results["limits"], results["model"]["vision_config"]
    base = results["baseline"]
    out = ["# Benchmarks: BlipRuntime (ONNX Runtime) against transformers", "",
           f"`{results['command']}` on {results['date']}, {results['wall_seconds'] / 60:.1f} min, "
           f"scale `{results['scale']}`. Generated by `benchmarks/report.py` from `results.json`; see README.md "
           "for what each number means.", ""]
    busy = results["load"]["busy"]
    if busy:
        who = "; ".join(f"pid {b['pid']} at up to {b['cpu_percent']:.0f}% `{b['cmd']}`" for b in busy)
        out += ["> **Warning: other processes used the CPU during this run; the numbers are not trustworthy.** "
                + who, ""]
    out += ["## Machine", "",
            f"- CPU: {m['cpu']}" + (f" (lscpu Model name: {m['lscpu_model']}, family {m.get('cpu_family')}, "
                                    f"model {m.get('cpu_model')}, {m.get('hypervisor') or 'no hypervisor'})"
                                    if m.get("lscpu_model") else "")
            + f", {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM; every contender uses "
            f"{m['threads_used']} threads. {m['os']}",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
            f"- Load average (1 min) before / after: {results['load']['loadavg']['before'][0]:.2f} / "
            f"{results['load']['loadavg']['after'][0]:.2f}; other processes sampled every 5 s during the run: "
            f"{'none above 20% of a core' if not busy else f'{len(busy)} busy (see the warning above)'}"
            + "".join(f"; kernel thread {k['cmd']} up to {k['cpu_percent']:.0f}% of a core (the kernel's work for "
                      "this run, e.g. page reclaim while multi-GB files load)" for k in results["load"].get("kernel", []))
            + ".",
            "", "## End to end", "",
            f"Median and p90 of the timed runs (after {results['warmup']} warm-up run per case; "
            + ", ".join(f"{c['name']} {c['repeats']}" for c in results["cases"])
            + " timed runs — chosen to keep the whole run under ~15 min on 2 cores, so p90 of 2-7 runs is close "
            f"to the slowest run). Bold: speed-up over {base} (its median / ours). Preprocessing (resize, "
            "normalize, tokenize) is included for every contender.", "",
            *main_table(results, table, order), "", "Contenders and the form each timed:", "",
            *more.contender_lines(results), "", "## Targets", "",
            "| target | measured | | why missed |", "|---|---|---|---|"]
    verdict = lambda met: "met" if met else "not measured" if met is None else "**missed**"  # noqa: E731
    for what, measured, met in targets(results, table, lf):
        out.append(f"| {what} | {measured} | {verdict(met)} | {'see below' if met is False else ''} |")
    for what, measured, met, why in more.more_targets(results, table):
        out.append(f"| {what} | {measured} | {verdict(met)} | {why if met is False else ''} |")
    out += paired_lines(results.get("paired_transformers"))
    out += paired_lines(results.get("paired"))
    budget = budget_lines(table, lf, base)
    if budget:
        out += ["", "Where the caption-greedy time goes against each end-to-end target (stage medians; the "
                "floors are this machine's measured limits):", "", *budget]
    out += ["", "## Stage breakdown (medians)", "",
            "Ours: the session's `run()` timed per graph; transformers: forward hooks on `vision_model`, "
            "`text_encoder` and `text_decoder` (one call per token). `other` = total − stages: the decoding "
            "loop (beam bookkeeping, logits processing) and glue.", "", *stage_table(results, table, order),
            "", "## Peak memory", "",
            "Peak resident set (ru_maxrss) of each contender's own process over all of that model's cases; "
            "in parentheses, the resident set right after loading.", "", *memory_table(results), "",
            "## Machine limits", "",
            f"- Matmul rate: **{lim['matmul']['gflops']:.0f} GFLOP/s** (fp32 {lim['matmul']['size']}³ GEMM, "
            f"{lim['matmul']['threads']} threads, best kernel {lim['matmul']['kernel']}; "
            + ", ".join(f"{k} {g:.0f}" for k, g in lim["matmul"]["by_kernel"].items()) + ").",
            f"- Memory bandwidth: **{lim['bandwidth']['gbps']:.1f} GB/s** (best of numpy copy "
            f"{lim['bandwidth']['copy_gbps']:.1f} GB/s counting read + write, torch 2-thread sum "
            f"{lim['bandwidth']['read_gbps']:.1f} GB/s read).",
            f"- Vision graph: {lf['flops'] / 1e9:.1f} GFLOP per image (patch embedding + "
            f"{vc['num_hidden_layers']} layers of attention and MLP at "
            f"{(vc['image_size'] // vc['patch_size']) ** 2 + 1} tokens)."]
    for c in ("ort-fp32", base):
        if f"{c}/vision_gflops" in lf:
            b8 = lf.get(f"{c}/vision8_gflops")
            out.append(f"  - {c}: {fmt_s(lf[f'{c}/vision_s'])} at batch 1 = {lf[f'{c}/vision_gflops']:.0f} GFLOP/s "
                       f"= **{lf[f'{c}/vision_gflops'] / lf['rate']:.0%}** of the matmul rate"
                       + (f"; batch 8: {b8:.0f} GFLOP/s = {b8 / lf['rate']:.0%}" if b8 else "") + ".")
    dec = results["model"]["decoder"]
    out.append(f"- Decoder step: {dec['read_bytes'] / 1e6:.0f} MB of weights read per step (decoder_step.onnx "
               f"initializers, without the {dec['gathered_bytes'] / 1e6:.0f} MB embedding tables that are only "
               f"gathered from); reading them once at the measured bandwidth takes **{fmt_s(lf['read_s'])}**. "
               f"Each step also reads the cross-attention K/V, {dec.get('cross_kv_bytes', 0) / 1e6:.0f} MB per "
               "row, not counted in the target.")
    for c in ("ort-fp32", base):
        if lf.get(f"{c}/per_token"):
            out.append(f"  - {c}: {fmt_s(lf[f'{c}/per_token'])} per token (caption greedy) = "
                       f"**{lf[f'{c}/per_token'] / lf['read_s']:.2f}×** the weight-read time.")
    out += more.int8_limit_lines(results, table, lf)
    out += ["", "## OpenVINO", "", *more.openvino_lines(results, table), "",
            "## BLIP-2 (stages: vision, Q-Former, prefill, steps)", "", *more.blip2_lines(results, lf), "",
            "## Memory and start-up", "", *more.memory_startup_lines(results)]
    out += ["", "## ONNX Runtime profiles (fp32 bundle)", "",
            "`SessionOptions.enable_profiling`, median per op type over 5 runs (the profiler adds its own "
            "overhead, so absolute times are above the end-to-end stage times).", "",
            *profile_section(results, lf, table), "", "## Notes", ""]
    for name, by_model in results["skipped"].items():
        notes = sorted(set(by_model.values()))
        out.append(f"- {name}: skipped ({'; '.join(notes)}).")
    grouped = {}
    for key, note in results["setup_notes"].items():
        model, kind = key.split("/", 1)
        grouped.setdefault((kind, note), []).append(model)
    for (kind, note), which in grouped.items():
        out.append(f"- {kind} bundle for {', '.join(which)}: {note}")
    for key, note in results["failures"].items():
        out.append(f"- **{key} failed**: {note}")
    same = [c["name"] for c in results["cases"] if _same_output(table.get(c["name"], {}), base)]
    # rows carry the start token before the new ones, except BLIP-2's prompted answers (the answer only)
    lead = {c["name"]: 0 if c["model"] in BLIP2 and c["task"] == "vqa" else 1 for c in results["cases"]}
    lengths = {s["output"]["lengths"][0] - lead.get(name, 1) for name, row in table.items() for s in row.values()
               if "lengths" in s["output"] and len(s["output"]["lengths"]) == 1}
    fixed = "exactly " + ", ".join(map(str, sorted(lengths))) if len(lengths) == 1 else f"varying lengths {lengths}"
    out.append(f"- Same work: every generation produced {fixed} new tokens per row; ort-fp32 outputs equal to "
               f"the {base} outputs (first row's tokens, or values to 1e-4) in: {', '.join(same) or 'none'}.")
    return "\n".join(out) + "\n"


def _same_output(row: dict, base: str) -> bool:
    if base not in row or "ort-fp32" not in row:
        return False
    a, b = row[base]["output"], row["ort-fp32"]["output"]
    if "lengths" in a:
        return a["first"] == b["first"] and a["lengths"] == b["lengths"]
    return bool(np.allclose(a["first"], b["first"], atol=1e-4))


def write(results: dict, folder: Path) -> None:
    from .plot import plot

    (folder / "RESULTS.md").write_text(markdown(results))
    table, order = collect(results)
    plot(results, table, order, folder / "results.png")


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results.json")
    write(json.loads(path.read_text()), path.parent)
