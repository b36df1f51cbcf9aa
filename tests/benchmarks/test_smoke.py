"""The benchmark code runs end to end on the tiny models. Nothing here is timed or compared:
speed is what benchmarks/ reports, never what a test asserts."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import run

HAS_OPENVINO = bool(importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"))


def test_benchmark_runs_on_tiny_model(tmp_path):
    """BLIP's cases, int8 as `--precision int8` resolves it, BLIP-2's caption case and (where openvino
    and nncf are installed) OpenVINO's own path; trt-fp16 is skipped with its reason on a CPU."""
    ov = ["ov-native-fp32"] if HAS_OPENVINO else []
    contenders = ["transformers", "ort-fp32", "ort-int8", "trt-fp16", *ov]
    code = run.main(["--scale", "tiny", "--repeats", "1", "--contenders", ",".join(contenders),
                     "--cases", "caption-greedy,itm,blip2-caption", "--no-fusions", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ran = {(w["contender"], case) for w in results["workers"] for case in w["cases"]}
    expected = {(c, k) for c in ("transformers", "ort-fp32", "ort-int8") for k in ("caption-greedy", "itm", "blip2-caption")}
    assert ran == expected | {(c, "caption-greedy") for c in ov}
    assert not results["failures"]
    assert "trt-fp16" in results["skipped"]
    forms = {w["contender"]: w["info"].get("form") for w in results["workers"]}
    assert forms["ort-int8"] == "int8-cpu"  # what blip-export --precision int8 writes for ONNX Runtime on a CPU
    assert not any(w["torch_loaded"] for w in results["workers"] if not w["contender"].startswith("transformers"))
    caption = {w["contender"]: w["cases"]["caption-greedy"]["output"]["first"] for w in results["workers"]
               if "caption-greedy" in w["cases"]}
    blip2 = {w["contender"]: w["cases"]["blip2-caption"]["output"]["first"] for w in results["workers"]
             if "blip2-caption" in w["cases"]}
    assert caption["ort-fp32"] == caption["transformers"] and blip2["ort-fp32"] == blip2["transformers"]
    for c in ov:  # OpenVINO's own path in f32 decodes transformers' tokens
        assert caption[c] == caption["transformers"]
    assert results["limits"]["int8"]["gops"] > 0
    versus = results["paired_transformers"]  # alternating rounds, each contender in its own process
    assert versus["processes"] and versus["order"] == ["transformers", "ort-fp32", "ort-int8"]
    assert set(versus["ratios"]) == {"transformers/ort-fp32", "transformers/ort-int8"}
    assert all(len(r["per_round"]) == 2 and r["min"] > 0 for r in versus["ratios"].values())
    assert versus["tokens"]["ort-fp32"] == versus["tokens"]["transformers"] == caption["transformers"]
    assert versus["forms"]["ort-int8"] == "int8-cpu"
    text = (tmp_path / "RESULTS.md").read_text()
    fp32_row = next(line for line in text.splitlines() if line.startswith("| caption batch 1 greedy, ORT fp32 ≥ 1.8×"))
    assert "paired (ort-fp32, median of 2 alternating rounds, each contender in its own process" in fp32_row
    assert "each in a worker process of its own" in text
    for section in ("## End to end", "## Targets", "## Stage breakdown", "## Peak memory", "## Machine limits",
                    "int8 GEMM rate", "## OpenVINO", "## BLIP-2", "## Memory and start-up"):
        assert section in text
    assert "| blip2-caption | ort-fp32 |" in text and "ahead of OpenVINO" in text
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_paired_int8_vs_fp32_on_tiny_model(tmp_path):
    """benchmarks.paired alternates the bundles in one process and reports per-round ratios; the
    report's int8-vs-fp32 target then quotes the paired median."""
    from benchmarks import models, paired, report

    models.build("tiny", ["fp32", "int8-cpu"], only=("caption",))
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


def test_serving_worker_refuses_anything_but_one_case(capsys):
    """`benchmarks.worker --serve` runs exactly one case; zero or several is a one-line usage error."""
    from benchmarks import worker

    for cases in ("caption-greedy,caption-beam3", "itm"):  # two cases; a case of another model (none left)
        with pytest.raises(SystemExit) as e:
            worker.main(["ort-fp32", "caption", "--scale", "tiny", "--cases", cases, "--serve"])
        assert e.value.code == 2
        assert "--serve: --cases must name one case of caption" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino and nncf are not installed")
def test_openvino_native_int8_runs_on_tiny_model():
    """OpenVINO's NNCF int8 path converts and decodes 20 forced tokens (its tokens may differ: int8)."""
    from benchmarks import models
    from benchmarks.cases import CASES, images
    from benchmarks.openvino_native import OvNativeContender

    assert not models.build("tiny", ["ov-native-int8"], only=("caption",))
    c = OvNativeContender("int8")
    info = c.load("tiny", "caption")
    assert "NNCF int8 vision" in info["form"]
    case = next(k for k in CASES if k.name == "caption-batch8")
    tokens = c.run(case, images(case.batch, seed=1))
    assert [len(t) for t in tokens] == [21] * case.batch  # [DEC] + 20 forced new tokens per image
    assert c.supports(next(k for k in CASES if k.name == "caption-beam3"))  # beams: a reason, not a run
