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
