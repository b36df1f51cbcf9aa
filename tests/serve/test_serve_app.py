"""The Ray Serve application, for real, on 127.0.0.1: task routes and the OpenAI route (through the
`openai` client) answer what BlipRuntime answers directly, concurrent requests are batched (seen in
/metrics), bad input gets a 400 naming the field, no token a 401, a full queue a 503, and a killed
replica is replaced while requests keep being answered."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
from PIL import Image  # noqa: E402

from blip_export.defaults import sample_images  # noqa: E402
from blip_runtime import BlipRuntime  # noqa: E402
from serve_bundles import shared_bundles  # noqa: E402

KEY = "test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from blip_serve.app import ServeConfig, build_app
    from blip_serve.inputs import Limits

    bundles = shared_bundles(tmp_path_factory)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(replicas=1, max_batch=8, max_wait_ms=50, cpus_per_replica=0.2, api_key=KEY,
                             limits=Limits(max_pixels=100_000, max_body_bytes=1_000_000))
        serve.run(build_app([str(bundles[n]) for n in ("caption", "vqa", "itm")], config), name="blip",
                  route_prefix="/")
        # A second application with a queue of one: the overload test floods it, not the first.
        tiny = ServeConfig(max_batch=1, max_ongoing=1, max_queued=1, cpus_per_replica=0.2)
        serve.run(build_app([str(bundles["caption"])], tiny), name="tiny", route_prefix="/tiny")
        yield {"url": f"http://127.0.0.1:{port}", "bundles": bundles,
               "rt": {n: BlipRuntime.load(b) for n, b in bundles.items()}}
    finally:
        serve.shutdown()
        ray.shutdown()


def post(server, path, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server["url"] + path, json=body, headers=headers, timeout=timeout)


def test_task_routes_equal_runtime(server):
    samples = sample_images()
    paths = [s["path"] for s in samples[:4]]
    images = [b64(p) for p in paths]
    rt = server["rt"]
    r = post(server, "/v1/caption/caption", {"images": images})
    assert r.status_code == 200, r.text
    assert r.json()["captions"] == rt["caption"].caption(paths)
    r = post(server, "/v1/caption/caption", {"images": images[:2], "prompt": "a small", "options": {"num_beams": 3}})
    assert r.json()["captions"] == rt["caption"].caption(paths[:2], "a small", num_beams=3)
    questions = [s["question"] for s in samples[:4]]
    r = post(server, "/v1/vqa/answer", {"images": [f"data:image/png;base64,{i}" for i in images], "questions": questions})
    assert r.json()["answers"] == rt["vqa"].answer(paths, questions)
    texts = ["a red triangle", "a green circle", "a blue shape", "a small black rectangle in the top left"]
    r = post(server, "/v1/itm/match", {"images": images, "texts": texts})
    err = np.abs(np.array(r.json()["scores"]) - rt["itm"].match(paths, texts)).max()
    print(f"match over HTTP vs runtime: max abs error {err:.1e}")
    assert err == 0.0  # float32 -> JSON double -> float32 is exact
    r = post(server, "/v1/itm/image_features", {"images": images})
    assert np.array_equal(np.float32(r.json()["features"]), rt["itm"].image_features(paths))
    r = post(server, "/v1/itm/text_features", {"texts": texts})
    assert np.array_equal(np.float32(r.json()["features"]), rt["itm"].text_features(texts))


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list().data} == {"caption", "vqa", "itm"}
    s = sample_images()[1]
    url = f"data:image/png;base64,{b64(s['path'])}"
    image = {"type": "image_url", "image_url": {"url": url}}
    rt = server["rt"]

    out = client.chat.completions.create(model="caption", messages=[{"role": "user", "content": [image]}])
    assert [c.message.content for c in out.choices] == rt["caption"].caption([s["path"]])
    out = client.chat.completions.create(model="vqa", messages=[
        {"role": "user", "content": [image, {"type": "text", "text": s["question"]}]}], max_tokens=5)
    assert out.choices[0].message.content == rt["vqa"].answer([s["path"]], s["question"], max_new_tokens=5)[0]

    # n > 1 greedy: the n best beams; with temperature: n seeded samples, equal to the runtime's.
    out = client.chat.completions.create(model="caption", messages=[{"role": "user", "content": [image]}], n=3)
    assert [c.message.content for c in out.choices] == rt["caption"].caption(
        [s["path"]], num_beams=3, num_return_sequences=3)[0]
    out = client.chat.completions.create(model="caption", messages=[{"role": "user", "content": [image]}], n=4,
                                         temperature=1.0, top_p=0.9, seed=7)
    want = rt["caption"].caption([s["path"]], do_sample=True, temperature=1.0, top_p=0.9, seed=7,
                                 num_return_sequences=4)[0]
    assert [c.message.content for c in out.choices] == want

    stream = client.chat.completions.create(model="caption", stream=True, n=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a large"}, image]}])
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == rt["caption"].caption([s["path"]], "a large", num_beams=2, num_return_sequences=2)[0]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="caption", messages=[{"role": "user", "content": [image]}])
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="caption", messages=[{"role": "user", "content": "no image"}])


def _metric(text: str, name: str, model: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_clients_batched_and_equal(server):
    samples = sample_images()
    paths = [s["path"] for s in samples]
    want = server["rt"]["caption"].caption(paths)
    time.sleep(1.0)  # observations of earlier tests reach the metrics replica first (MetricsBuffer.period)
    before = requests.get(server["url"] + "/metrics", timeout=30).text

    def one(i):
        r = post(server, "/v1/caption/caption", {"images": [b64(paths[i % len(paths)])]})
        return i, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    for i, status, body in results:
        assert status == 200, body
        assert body["captions"] == [want[i % len(paths)]]
    deadline = time.time() + 10
    while True:  # replicas send their observations a few times a second
        after = requests.get(server["url"] + "/metrics", timeout=30).text
        calls, reqs = (_metric(after, f"blip_serve_batch_requests_{k}", "caption")
                       - _metric(before, f"blip_serve_batch_requests_{k}", "caption") for k in ("count", "sum"))
        served = _metric(after, "blip_serve_requests_total", "caption") - _metric(before, "blip_serve_requests_total", "caption")
        if (reqs >= 48 and served >= 48) or time.time() > deadline:
            break
        time.sleep(0.2)
    print(f"48 concurrent requests ran in {calls:.0f} batches (mean {reqs / calls:.1f} requests per batch)")
    assert reqs >= 48 and calls < reqs  # some batch held more than one request
    assert served >= 48  # (observations of earlier tests may still arrive)
    assert "blip_serve_request_latency_seconds_bucket" in after


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("path, body, field", [
    ("/v1/caption/caption", {"images": ["not base64!"]}, "images[0]"),
    ("/v1/caption/caption", {"images": [base64.b64encode(b"not an image").decode()]}, "images[0]"),
    ("/v1/caption/caption", {"images": [_png(400, 300)]}, "images[0]"),  # 120,000 pixels > 100,000
    ("/v1/caption/caption", {"prompt": "a"}, "images"),
    ("/v1/vqa/answer", {"images": [_png(8, 8)]}, "questions"),
    ("/v1/caption/caption", {"images": [_png(8, 8)], "options": {"beams": 2}}, "options.beams"),
    ("/v1/caption/caption", {"images": [_png(8, 8)], "options": {"num_beams": 2.5}}, "options.num_beams"),  # the runtime's
    ("/v1/caption/caption", {"images": [_png(8, 8)], "prompt": "a \ud800"}, "prompt[0]"),  # checks
    ("/v1/chat/completions", {"model": "caption", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}, "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", {"model": "caption", "messages": [], "temperature": -1}, "messages"),
])
def test_bad_input_is_400_naming_the_field(server, path, body, field):
    r = post(server, path, body)
    print(r.json()["error"]["message"])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_auth_size_and_health(server):
    body = {"images": [_png(8, 8)]}
    assert post(server, "/v1/caption/caption", body, key=None).status_code == 401
    assert post(server, "/v1/caption/caption", body, key="wrong").status_code == 401
    assert requests.get(server["url"] + "/v1/models", timeout=30).status_code == 401
    r = post(server, "/v1/caption/caption", {"images": ["A" * 1_200_000]})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    assert post(server, "/v1/nope/caption", body).status_code == 404
    assert post(server, "/v1/caption/answer", body).status_code == 404  # a caption bundle does no VQA
    h = requests.get(server["url"] + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["models"]["itm"] == ["itm", "itc"]


def test_overload_is_503(server):
    image = _png(64, 64)

    def one(_):
        r = requests.post(server["url"] + "/tiny/v1/caption/caption", timeout=120,
                          json={"images": [image] * 8, "options": {"num_beams": 3, "max_new_tokens": 20}})
        return r.status_code, r.json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    statuses = [s for s, _ in results]
    print("statuses under overload:", sorted(statuses))
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    assert all("overloaded" in b["error"]["message"] for s, b in results if s == 503)


def _replicas(deployment: str) -> set[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]
            and a["name"].startswith("SERVE_REPLICA::blip#")}


def test_killed_replica_is_replaced(server):
    samples = sample_images()
    want = server["rt"]["vqa"].answer([samples[0]["path"]], samples[0]["question"])
    body = {"images": [b64(samples[0]["path"])], "questions": samples[0]["question"]}
    old = _replicas("vqa")
    assert len(old) == 1, old
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set() and len(results) < 400:  # bounded
            r = post(server, "/v1/vqa/answer", body, timeout=120)
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(next(iter(old)), namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline and not (_replicas("vqa") - old):
        time.sleep(0.5)
    new = _replicas("vqa") - old
    n_before = len(results)
    while time.time() < deadline and len(results) < n_before + 8:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    statuses = [s for s, _ in results]
    time.sleep(0.5)  # the gateway's last observations
    retried = _metric(requests.get(server["url"] + "/metrics", timeout=30).text, "blip_serve_retries_total", "vqa")
    print(f"replica {sorted(old)} killed, replaced by {sorted(new)}; {len(results)} requests: "
          f"{statuses.count(200)} answered ({retried:.0f} of them retried on the new replica), "
          f"{statuses.count(503)} told to retry")
    assert new, "no new replica started within 90 s"
    for status, b in results:  # every request got an answer or a clear error
        assert status in (200, 503), b
        if status == 200:
            assert b["answers"] == want
        else:
            assert "died" in b["error"]["message"] or "overloaded" in b["error"]["message"]
    assert statuses[-8:] == [200] * 8  # answered again after the replacement
