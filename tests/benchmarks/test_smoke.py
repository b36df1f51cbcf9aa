"""The benchmark code runs end to end on the tiny model. Nothing here is timed or compared:
speed is what benchmarks/ reports, never what a test asserts."""

from __future__ import annotations

import json

from benchmarks import run


def test_benchmark_runs_on_tiny_model(tmp_path):
    code = run.main(["--scale", "tiny", "--repeats", "1", "--contenders", "transformers,ort-fp32,trt-fp16",
                     "--cases", "caption-greedy,itm", "--no-fusions", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ran = {(w["contender"], case) for w in results["workers"] for case in w["cases"]}
    assert ran == {(c, k) for c in ("transformers", "ort-fp32") for k in ("caption-greedy", "itm")}
    assert not results["failures"]
    assert "trt-fp16" in results["skipped"]
    assert not any(w["torch_loaded"] for w in results["workers"] if w["contender"] == "ort-fp32")
    text = (tmp_path / "RESULTS.md").read_text()
    for section in ("## End to end", "## Targets", "## Stage breakdown", "## Peak memory", "## Machine limits"):
        assert section in text
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_paired_int8_vs_fp32_on_tiny_model(tmp_path):
    """benchmarks.paired alternates the bundles in one process and reports per-round ratios; the
    report's int8-vs-fp32 target then quotes the paired median."""
    from benchmarks import models, paired, report

    models.build("tiny", ["fp32", "int8-cpu"])
    out = tmp_path / "paired.json"
    assert paired.main(["--scale", "tiny", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["order"] == ["ort-fp32", "ort-int8-cpu"] and result["rounds"] == 2
    r = result["ratios"]["ort-fp32/ort-int8-cpu"]
    assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"] and r["min"] > 0
    assert result["lengths"]["ort-fp32"] == result["lengths"]["ort-int8-cpu"] == [21]  # [DEC] + 20 forced tokens
    lines = report.paired_lines(result)
    assert "ort-int8-cpu: median" in lines[-1]
    assert paired.main(["--scale", "tiny", "--contenders", "transformers,ort-fp32"]) == 1  # not a bundle contender
