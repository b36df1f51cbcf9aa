"""The Triton model repository `blip-serve --write-triton-repo` writes, served by the real
tritonserver binary from the nvidia-pytriton wheel (its Python backend on the CPU) on 127.0.0.1
and driven by tritonclient over HTTP: every task answers what BlipRuntime answers directly.

nvidia-pytriton pins numpy < 2, so the server runs from a venv of its own, created once and cached
in the repository's .venv-triton/ (git-ignored); the test skips when it cannot be created (no
package index). That venv sees this repository through a .pth file, as an editable install would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")

from blip_export.defaults import sample_images  # noqa: E402
from blip_runtime import BlipRuntime  # noqa: E402
from serve_bundles import shared_bundles  # noqa: E402
from blip_serve.triton import write_triton_repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-triton"
REQUIREMENTS = ["nvidia-pytriton", "numpy<2", "pillow", "tokenizers", "onnxruntime", "tqdm"]


def triton_venv() -> tuple[Path, Path]:
    """-> (the venv's python, the wheel's tritonserver folder), creating the venv on first use."""
    py = VENV / "bin" / "python"
    marker = VENV / ".blip-ready"
    if not (marker.is_file() and json.loads(marker.read_text()) == REQUIREMENTS):
        try:
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
            subprocess.run([str(py), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True, capture_output=True,
                           timeout=1200)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot create the Triton venv in {VENV}: {getattr(e, 'stderr', b'')[-400:]!r}")
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "blip_trt_repo.pth").write_text(f"{ROOT}\n")  # blip_runtime and blip_serve, as -e would
    server = site / "pytriton" / "tritonserver"
    version = subprocess.check_output([str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                      text=True).strip()
    stub = server / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():  # the wheel ships one stub per Python version; the backend wants it beside itself
        shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    marker.write_text(json.dumps(REQUIREMENTS))
    return py, server


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    import socket

    py, server_dir = triton_venv()
    bundles = shared_bundles(tmp_path_factory)
    repo = tmp_path_factory.mktemp("triton") / "repo"
    written = write_triton_repo(repo, [bundles[n] for n in ("caption", "vqa", "itm")], max_batch=8, max_wait_ms=20)
    assert sorted(written) == ["caption_caption", "itm_image_features", "itm_match", "itm_text_features", "vqa_answer"]
    for folder in written.values():
        assert (folder / "config.pbtxt").is_file() and (folder / "1" / "bundle" / "manifest.json").is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    libdir = subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                     text=True).strip()
    env = {**os.environ, "LD_LIBRARY_PATH": libdir, "PATH": f"{py.parent}:{os.environ['PATH']}"}
    log = open(repo.parent / "tritonserver.log", "w")
    proc = subprocess.Popen(
        [str(server_dir / "bin" / "tritonserver"), f"--model-repository={repo}",
         f"--backend-directory={server_dir / 'backends'}", "--http-address=127.0.0.1", f"--http-port={port}",
         "--allow-grpc=false", "--allow-metrics=false", "--exit-timeout-secs=10"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo.parent)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=8)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail("tritonserver exited:\n" + (repo.parent / "tritonserver.log").read_text()[-3000:])
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            if time.time() > deadline:
                pytest.fail("tritonserver not ready after 180 s:\n" + (repo.parent / "tritonserver.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"client": client, "rt": {n: BlipRuntime.load(b) for n, b in bundles.items()}}
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _bytes(name: str, values: list) -> "httpclient.InferInput":
    t = httpclient.InferInput(name, [len(values), 1], "BYTES")
    t.set_data_from_numpy(np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=np.object_))
    return t


def test_triton_tasks_equal_runtime(triton):
    client, rt = triton["client"], triton["rt"]
    samples = sample_images()[:4]
    paths = [s["path"] for s in samples]
    images = _bytes("IMAGE", [open(p, "rb").read() for p in paths])

    out = client.infer("caption_caption", [images]).as_numpy("TEXT")
    assert [v[0].decode() for v in out] == rt["caption"].caption(paths)
    options = _bytes("OPTIONS", [json.dumps({"num_beams": 3})] * 4)
    out = client.infer("caption_caption", [images, _bytes("PROMPT", ["a small"] * 4), options]).as_numpy("TEXT")
    assert [v[0].decode() for v in out] == rt["caption"].caption(paths, "a small", num_beams=3)

    questions = [s["question"] for s in samples]
    out = client.infer("vqa_answer", [images, _bytes("QUESTION", questions)]).as_numpy("TEXT")
    assert [v[0].decode() for v in out] == rt["vqa"].answer(paths, questions)

    texts = ["a red triangle", "a green circle", "a blue shape", "a small black rectangle in the top left"]
    score = client.infer("itm_match", [images, _bytes("TEXT", texts)]).as_numpy("SCORE")
    err = float(np.abs(score[:, 0] - rt["itm"].match(paths, texts)).max())
    print(f"Triton ITM vs runtime: max abs error {err:.1e}")
    assert err == 0.0
    feats = client.infer("itm_image_features", [images]).as_numpy("FEATURES")
    assert np.array_equal(feats, rt["itm"].image_features(paths))
    feats = client.infer("itm_text_features", [_bytes("TEXT", texts)]).as_numpy("FEATURES")
    assert np.array_equal(feats, rt["itm"].text_features(texts))


def test_triton_concurrent_requests_and_errors(triton):
    client, rt = triton["client"], triton["rt"]
    samples = sample_images()
    paths = [s["path"] for s in samples]
    want = rt["caption"].caption(paths)


    def counts():
        stats = client.get_inference_statistics("caption_caption")["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    rows0, runs0 = counts()
    # tritonclient.http is not thread-safe; async_infer keeps up to `concurrency` requests in flight.
    pending = [client.async_infer("caption_caption", [_bytes("IMAGE", [open(paths[i % len(paths)], "rb").read()])])
               for i in range(24)]
    got = [p.get_result().as_numpy("TEXT")[0][0].decode() for p in pending]
    assert got == [want[i % len(paths)] for i in range(24)]
    deadline = time.time() + 10
    while True:  # the statistics may be updated just after the responses are sent
        rows, runs = (a - b for a, b in zip(counts(), (rows0, runs0)))
        if rows >= 24 or time.time() > deadline:
            break
        time.sleep(0.1)
    print(f"24 concurrent one-image requests: {rows} rows in {runs} executions")
    assert rows == 24 and runs < 24  # the dynamic batcher grouped requests

    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=r"IMAGE\[0\]: not a readable image"):
        client.infer("caption_caption", [_bytes("IMAGE", [b"not an image"])])
    with pytest.raises(InferenceServerException, match="num_beams"):
        client.infer("caption_caption", [_bytes("IMAGE", [open(paths[0], "rb").read()]),
                                         _bytes("OPTIONS", [json.dumps({"num_beams": 0})])])
