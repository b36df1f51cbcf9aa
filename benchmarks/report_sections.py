"""RESULTS.md sections beyond BLIP-base against transformers (benchmarks.report calls these): the
contenders' forms, the int8 GEMM limit, OpenVINO side by side, the targets that compare memory,
beams and OpenVINO, BLIP-2, and the memory and start-up benchmarks' results.

Each function takes results.json's contents (and the per-case summaries of report.collect) and
returns Markdown lines; a section whose measurements are absent says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .cases import BLIP2, NEW_TOKENS

HERE = Path(__file__).resolve().parent
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "Conv"}
# The performance goal's numeric targets (benchmarks.report's targets table)
TARGETS = {"caption_fp32": 1.8, "caption_int8": 5.0, "vision_share": 0.85, "decode_vs_read": 1.3, "batch8": 3.0,
           "int8_vs_fp32": 2.5}
# auto-fp32 is ours too: this runtime with OpenVINO for the graphs outside the decoding loop (backend="auto")
OURS = ("ort-fp32", "ort-int8", "ort-int8-cpu", "ort-int8-qdq", "ort-fp16", "ort-int4", "auto-fp32")
OURS_INT8 = ("ort-int8", "ort-int8-cpu", "ort-int8-qdq", "ort-int4")
OPENVINO = ("ov-fp32", "ov-int8", "ov-native-fp32", "ov-native-bf16", "ov-native-int8", "ov-native-int4")


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def workers(results) -> dict[tuple[str, str], dict]:
    return {(w["contender"], w["model"]): w for w in results["workers"]}


def contender_lines(results) -> list[str]:
    """What each contender that ran is: its bundle form or library precision."""
    seen, out = set(), []
    for w in results["workers"]:
        if w["contender"] in seen:
            continue
        seen.add(w["contender"])
        info = w["info"]
        what = info.get("form") or (f"eager PyTorch {info.get('dtype', 'float32')}, torch {info.get('torch')}, "
                                    f"transformers {info.get('transformers')}")
        if w["contender"] == "ort-int8":
            what += " (what `blip-export --precision int8` writes for ONNX Runtime: the bundle was converted with that name)"
        out.append(f"- `{w['contender']}`: {what}")
    return out


# -- the int8 GEMM limit -------------------------------------------------------------------------------
def int8_limit_lines(results, table, lf) -> list[str]:
    lim = results["limits"].get("int8")
    if not lim:
        return ["- int8 GEMM rate: not measured in this run."]
    ext = ", ".join(lim["extensions"]) or "none"
    out = [f"- int8 GEMM rate: **{lim['gops']:.0f} GOP/s** (u8 × s8 {lim['size']}³, {lim['threads']} threads, "
           f"best kernel {lim['kernel']}; " + ", ".join(f"{k} {g:.0f}" for k, g in lim["by_kernel"].items())
           + f"), {lim['gops'] / lf['rate']:.1f}× the fp32 rate; the CPU's int8/bf16 extensions: {ext}."]
    for c in OURS_INT8 + ("ov-int8", "ov-native-int8"):
        s = table.get("caption-greedy", {}).get(c)
        if s and s["stages"].get("vision"):
            gops = lf["flops"] / s["stages"]["vision"] / 1e9
            out.append(f"  - {c} vision graph: {fmt_s(s['stages']['vision'])} at batch 1 = {gops:.0f} GOP/s = "
                       f"**{gops / lim['gops']:.0%}** of the int8 GEMM rate ({gops / lf['rate']:.0%} of the fp32 one).")
    return out


# -- OpenVINO side by side -----------------------------------------------------------------------------
def openvino_lines(results, table) -> list[str]:
    """Time, stages and peak RSS of each OpenVINO contender beside ours, per case it ran."""
    ws = workers(results)
    ov = [c for c in OPENVINO if any(c in row for row in table.values())]
    if not ov:
        return ["No OpenVINO contender ran (`--contenders` without ov-*, or openvino / nncf not installed)."]
    stages = ("preprocess", "vision", "text_encoder", "cross_kv", "decoder_step")
    out = ["`ov-fp32` / `ov-int8` run our bundles' ONNX graphs on OpenVINO; `ov-native-*` is OpenVINO's own path "
           "(benchmarks/openvino_native.py: transformers' modules through openvino.convert_model, NNCF int8 / int4). "
           "Peak RSS is the contender's process over all cases of that model.", "",
           "| case | contender | total | preprocess | vision | text encoder | cross K/V | decoder steps | per token | "
           "peak RSS | tokens = transformers |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = results["baseline"]
    for case in results["cases"]:
        row = table.get(case["name"], {})
        if not any(c in row for c in ov):
            continue
        for c in [c for c in OURS if c in row] + [c for c in ov if c in row]:
            s, w = row[c], ws.get((c, case["model"]), {})
            same = "–"
            if base in row and "lengths" in s["output"]:
                same = "yes" if s["output"]["first"] == row[base]["output"]["first"] else "no"
            cells = [fmt_s(s["stages"].get(st)) if s["stages"].get(st) else "–" for st in stages]
            out.append(f"| {case['name']} | {c} | {fmt_s(s['median'])} | " + " | ".join(cells)
                       + f" | {fmt_s(s['per_token'])} | {w.get('peak_rss_mb', 0):.0f} MiB | {same} |")
    out += ["", "Precision by precision (ours against OpenVINO's best of the same precision; the gap's largest stages):", ""]
    pairs = (("fp32", "ort-fp32", ("ov-fp32", "ov-native-fp32")), ("int8", "ort-int8", ("ov-int8", "ov-native-int8")))
    for case in results["cases"]:
        row = table.get(case["name"], {})
        for what, ours, theirs in pairs:
            rivals = [c for c in theirs if c in row]
            if ours not in row or not rivals:
                continue
            ov = min(rivals, key=lambda c: row[c]["median"])
            a, b = row[ours], row[ov]
            lead = (f"ours ahead, {b['median'] / a['median']:.2f}×" if a["median"] <= b["median"] else
                    f"**{ov} ahead, {a['median'] / b['median']:.2f}×** (" + _where(b, a) + ")")
            out.append(f"- {case['name']}, {what}: {ours} {fmt_s(a['median'])}, {ov} {fmt_s(b['median'])}: {lead}.")
    return out


# -- the targets that compare beams, memory and OpenVINO --------------------------------------------------
def _ratio(table, case, c, base):
    row = table.get(case, {})
    return row[base]["median"] / row[c]["median"] if c in row and base in row else None


def more_targets(results, table) -> list[tuple[str, str, bool | None, str]]:
    """(target, measured, met, why when missed) for the targets report.targets does not cover."""
    base, ws, out = results["baseline"], workers(results), []
    g, b = _ratio(table, "caption-greedy", "ort-fp32", base), _ratio(table, "caption-beam3", "ort-fp32", base)
    why = ""
    if g and b and b < g:
        ours, theirs = table["caption-beam3"]["ort-fp32"], table["caption-beam3"][base]
        og, tg = table["caption-greedy"]["ort-fp32"], table["caption-greedy"][base]
        why = (f"a 3-row step costs ours {ours['per_token'] / og['per_token']:.2f}× a 1-row step and transformers "
               f"{theirs['per_token'] / tg['per_token']:.2f}× (per token {fmt_s(og['per_token'])} → "
               f"{fmt_s(ours['per_token'])} vs {fmt_s(tg['per_token'])} → {fmt_s(theirs['per_token'])}); beam "
               f"bookkeeping outside the graph: ours {fmt_s(ours['other'])}, transformers {fmt_s(theirs['other'])}")
    out.append(("caption 3 beams: ORT fp32's speed-up ≥ its greedy speed-up",
                f"{b:.2f}× vs greedy {g:.2f}×" if g and b else "not measured", None if not (g and b) else b >= g, why))
    ref = ws.get((base, "caption"))
    for c, share, what in (("ort-fp32", 1.0, "≤ transformers'"), ("ort-int8", 0.5, "≤ half of transformers'")):
        w = ws.get((c, "caption"))
        if not (ref and w):
            out.append((f"peak RSS, caption, {c} {what}", "not measured", None, ""))
            continue
        r = w["peak_rss_mb"] / ref["peak_rss_mb"]
        why = "" if r <= share else (
            f"after load {w['rss_after_load_mb']:.0f} MiB (transformers {ref['rss_after_load_mb']:.0f}); the rest of "
            f"the peak ({w['peak_rss_mb'] - w['rss_after_load_mb']:.0f} MiB) is ONNX Runtime's buffers during the cases "
            "(per option: RESULTS_memory.md)")
        out.append((f"peak RSS, caption, {c} {what}", f"{w['peak_rss_mb']:.0f} vs {ref['peak_rss_mb']:.0f} MiB "
                    f"= {r:.2f}×", r <= share, why))
    lost = []
    for case in results["cases"]:
        row = table.get(case["name"], {})
        ours = {c: row[c]["median"] for c in OURS if c in row}
        theirs = {c: row[c]["median"] for c in OPENVINO if c in row}
        if ours and theirs:
            best, ov = min(ours, key=ours.get), min(theirs, key=theirs.get)
            if theirs[ov] < ours[best]:
                lost.append(f"{case['name']}: {ov} {fmt_s(theirs[ov])} < {best} {fmt_s(ours[best])} ("
                            + _where(row[ov], row[best]) + ")")
    compared = [c["name"] for c in results["cases"] if any(k in table.get(c["name"], {}) for k in OPENVINO)]
    out.append(("ahead of OpenVINO on every case (our best form against OpenVINO's best)",
                ("behind on " + "; ".join(lost)) if lost else (f"ahead on {', '.join(compared)}" if compared else
                                                                "not measured"),
                None if not compared else not lost, ""))
    return out


def _where(a: dict, b: dict) -> str:
    """Where summary `a` is faster than `b`: the stages with the largest gaps."""
    gaps = {st: b["stages"].get(st, 0.0) - a["stages"].get(st, 0.0) for st in set(a["stages"]) | set(b["stages"])}
    top = sorted((g, st) for st, g in gaps.items() if g > 0)[::-1][:2]
    return ", ".join(f"{st} {fmt_s(a['stages'].get(st))} vs {fmt_s(b['stages'].get(st))}" for _, st in top) or "glue"


# -- BLIP-2 ----------------------------------------------------------------------------------------------
def blip2_lines(results, lf) -> list[str]:
    from .blip2_cases import STAGE_NAMES, STAGES

    facts = results.get("blip2_model")
    cases = [c for c in results["cases"] if c["model"] in BLIP2]
    runs = {(w["contender"], name): r for w in results["workers"] if w["model"] in BLIP2
            for name, r in w["cases"].items()}
    if not runs or not facts:
        return ["Not run (no BLIP-2 case in `--cases`, or every BLIP-2 contender was skipped: see the notes)."]
    vc, tc, ws = facts["vision_config"], facts["text_config"], workers(results)
    lim = results["limits"]
    vision_floor = facts["vision_flops"] / (lim["matmul"]["gflops"] * 1e9)
    int8_floor = facts["vision_flops"] / (lim["int8"]["gops"] * 1e9) if lim.get("int8") else None
    bw = lim["bandwidth"]["gbps"] * 1e9
    out = [f"Blip2ForConditionalGeneration, random weights: ViT {vc['num_hidden_layers']} layers × "
           f"{vc['hidden_size']} at {vc['image_size']} px ({facts['vision_flops'] / 1e9:.0f} GFLOP per image), "
           f"Q-Former, OPT {tc['num_hidden_layers']} layers × {tc['hidden_size']} (FFN {tc['ffn_dim']}, vocabulary "
           f"{tc['vocab_size']}); {NEW_TOKENS} new tokens forced. Floors: vision = its FLOPs at the fp32 GEMM rate "
           f"({fmt_s(vision_floor)})" + (f", at the int8 rate {fmt_s(int8_floor)}" if int8_floor else "")
           + "; LM step = the bytes its weights take (opt_step's initializers without the gathered tables; "
           f"transformers: the fp32 matrices, {facts['lm_matrix_bytes_fp32'] / 1e9:.2f} GB, half in bf16) at the "
           f"measured bandwidth ({lim['bandwidth']['gbps']:.1f} GB/s).", "",
           "| case | contender | total | speed-up | " + " | ".join(STAGE_NAMES[s] for s in STAGES)
           + " | per step | step floor | vision floor | peak RSS | tokens = transformers |",
           "|---|---|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|---:|---:|---|"]
    base = results["baseline"]
    for case in cases:
        ref = runs.get((base, case["name"]))
        for (c, name), r in runs.items():
            if name != case["name"]:
                continue
            t, st = float(np.median(r["times"])), r["stages"]
            med = {s: float(np.median([x["seconds"].get(s, 0.0) for x in st])) for s in STAGES}
            steps = int(np.median([x["calls"].get("opt_step", 0) for x in st]))
            per = med["opt_step"] / steps if steps else None
            w = ws[(c, case["model"])]
            kind = w["info"].get("kind")
            if kind in facts["step_bytes"]:
                step_floor = facts["step_bytes"][kind]["read_bytes"] / bw
            elif c.startswith("transformers"):
                step_floor = facts["lm_matrix_bytes_fp32"] / (2 if "bf16" in c else 1) / bw
            else:
                step_floor = None
            vf = int8_floor if kind and kind != "fp32" and int8_floor else vision_floor
            speed = f"{float(np.median(ref['times'])) / t:.2f}×" if ref and c != base else "–"
            same = "–" if not ref or c == base else ("yes" if r["output"]["first"] == ref["output"]["first"] else "no")
            out.append(f"| {case['name']} | {c} | {fmt_s(t)} | {speed} | " + " | ".join(fmt_s(med[s]) for s in STAGES)
                       + f" | {fmt_s(per)} ({steps}) | {fmt_s(step_floor)} | {fmt_s(vf)} | {w['peak_rss_mb']:.0f} MiB "
                       f"| {same} |")
    return out


# -- the memory and start-up benchmarks ------------------------------------------------------------------
def memory_startup_lines(results) -> list[str]:
    """benchmarks.memory's and benchmarks.startup's last results (memory.json, startup.json beside this
    file), rendered by their own report functions: separate runs (each takes its own processes and, for
    start-up, multi-GB files), not measured by benchmarks.run."""
    import importlib

    out = []
    for title, name in (("Memory per ONNX Runtime option", "memory"),
                        ("Start-up: load to the first result, verification per GB", "startup")):
        out += [f"### {title} (`python -m benchmarks.{name}`)", ""]
        path = HERE / f"{name}.json"
        if not path.is_file():
            out += [f"No {path.name}: run `python -m benchmarks.{name}` (it writes RESULTS_{name}.md).", ""]
            continue
        try:  # another script, maintained on its own: whatever fails there is a note here, not a failed report
            module = importlib.import_module(f"benchmarks.{name}")
            data = json.loads(path.read_text())
            # their title dropped, and their first paragraph's leading command line (it names the rendering)
            body = [line for line in module.report(data).splitlines()[1:]
                    if not line.startswith(f"`python -m benchmarks.{name}`")]
        except Exception as e:  # noqa: BLE001 (a json of another version of that script, or its import failing)
            out += [f"{path.name} could not be rendered ({type(e).__name__}: {e}); see RESULTS_{name}.md.", ""]
            continue
        load = data.get("load_before")
        out += [f"From {path.name} (scale `{data.get('scale')}`"
                + (f", load average {load:.2f} before" if isinstance(load, (int, float)) else "")
                + "; a separate run, not this one):", *[line.replace("## ", "#### ", 1) if line.startswith("## ")
                                                         else line for line in body], ""]
    return out
