"""blip-serve as a command: it starts its own Ray on 127.0.0.1, answers with a bearer token taken
from the environment, drains and exits 0 on SIGTERM leaving no Ray process behind; its
--write-triton-repo and argument errors. And run_calls (the one place that calls the runtime for
a batch): grouped results equal one call per request, one bad request fails alone."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blip_export.defaults import sample_images
from blip_runtime import BlipRuntime
from serve_bundles import shared_bundles
from blip_serve.batching import Failed, run_calls
from blip_serve.inputs import Call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return shared_bundles(tmp_path_factory)


def test_run_calls_groups_and_isolates_errors(bundles):
    from PIL import Image

    rt = BlipRuntime.load(bundles["caption"])
    samples = sample_images()
    images = [Image.open(s["path"]) for s in samples[:5]]
    calls = [
        Call("caption", (images[0], images[1]), None, ()),
        Call("caption", (images[2],), ("a small",), ()),
        Call("caption", (images[3],), None, (("num_beams", 2),)),
        Call("caption", (images[4],), None, ()),
        Call("caption", (images[0],), None, (("num_beams", 2),)),
        Call("caption", (images[1],), ("a \ud800",), ()),  # a lone surrogate: refused by the runtime
        Call("caption", (images[2],), ("a large",), ()),
    ]
    results, rows = run_calls(rt, calls)
    assert sorted(rows) == [1, 1, 1, 2, 3]  # plain, two beams, and the prompts' group rerun one by one
    paths = [s["path"] for s in samples[:5]]
    assert results[0] == rt.caption(paths[:2])
    assert results[1] == rt.caption([paths[2]], "a small")
    assert results[2] == rt.caption([paths[3]], num_beams=2)
    assert results[3] == rt.caption([paths[4]])
    assert results[4] == rt.caption([paths[0]], num_beams=2)
    assert isinstance(results[5], Failed)
    print(results[5].message)
    assert results[6] == rt.caption([paths[2]], "a large")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(temp: Path) -> list[str]:
    """Processes still running from the Ray session under `temp` (their command lines name it)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if str(temp) in line and "ps -eo" not in line]


def test_blip_serve_command_serves_and_stops_on_sigterm(bundles, tmp_path):
    requests = pytest.importorskip("requests")
    pytest.importorskip("ray.serve")
    # A short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    port, temp = _free_port(), Path(tempfile.mkdtemp(prefix="blip-serve-"))
    env = {**os.environ, "BLIP_SERVE_API_KEY": "k3y", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "blip_serve.cli", str(bundles["caption"]), str(bundles["vqa"]),
                             "--port", str(port), "--num-cpus", "2", "--temp-dir", str(temp), "--replicas", "1"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or the app not deployed yet
                pass
            assert time.time() < deadline, "blip-serve not up after 120 s"
            time.sleep(0.5)
        s = sample_images()[0]
        body = {"images": [base64.b64encode(open(s["path"], "rb").read()).decode()]}
        assert requests.post(url + "/v1/caption/caption", json=body, timeout=60).status_code == 401
        r = requests.post(url + "/v1/caption/caption", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60)
        assert r.json()["captions"] == BlipRuntime.load(bundles["caption"]).caption([s["path"]])
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
        print(log[-600:])
        assert proc.returncode == 0
        assert "shutting down" in log
        deadline = time.time() + 30
        while _ray_processes(temp) and time.time() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(temp), _ray_processes(temp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_write_triton_repo_command_and_errors(bundles, tmp_path):
    out = subprocess.run([sys.executable, "-m", "blip_serve.cli", "--write-triton-repo", str(tmp_path / "repo"),
                          str(bundles["vqa"]), str(bundles["itm"])], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [
        "itm_image_features", "itm_match", "itm_text_features", "vqa_answer"]
    config = (tmp_path / "repo" / "vqa_answer" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dynamic_batching" in config and 'name: "QUESTION"' in config
    bad = subprocess.run([sys.executable, "-m", "blip_serve.cli", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a bundle folder" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "blip_serve.cli", str(bundles["vqa"]), "--replicas", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--replicas=0" in bad.stderr
