"""The Ray Serve application: one `BundleModel` deployment per bundle behind one `Gateway`.

Ray Serve does the batching (`@serve.batch`), replicas, queue bounds and HTTP; the deployments hold
a runtime and parse requests (blip_serve.inputs / openai_api), nothing more.
"""

import asyncio
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from . import openai_api
from .batching import Failed, run_calls
from .inputs import NEEDS, Call, Limits, RequestError, bundle_tasks, parse_task
from .metrics import Metrics, MetricsBuffer

RESULT_KEYS = {"caption": "captions", "answer": "answers", "match": "scores", "image_features": "features",
               "text_features": "features"}


@dataclass(frozen=True)
class ServeConfig:
    replicas: int = 1  # per bundle
    max_batch: int = 8  # client requests per @serve.batch call
    max_wait_ms: float = 10.0  # how long a replica waits to fill a batch
    max_ongoing: int = 16  # requests a replica holds at once (its batch queue)
    max_queued: int = 64  # requests waiting for a replica; beyond: 503
    cpus_per_replica: float = 0.5  # Ray resources (fractional: several replicas share 2 cores)
    threads: int | None = 1  # ONNX Runtime threads per replica
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)


@serve.deployment(graceful_shutdown_timeout_s=30)
class BundleModel:
    """Holds one BlipRuntime; requests arriving together run as one batch."""

    def __init__(self, bundle: str, config: ServeConfig, metrics):
        from blip_runtime import BlipRuntime

        self.name = Path(bundle).name
        self.runtime = BlipRuntime.load(bundle, threads=config.threads)
        self.metrics = MetricsBuffer(metrics)
        # One worker thread: the runtime runs one batch at a time while the event loop keeps
        # collecting the next one.
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.run.set_max_batch_size(config.max_batch)
        self.run.set_batch_wait_timeout_s(config.max_wait_ms / 1000.0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(self, calls: list[Call]) -> list:
        results, rows = await asyncio.get_running_loop().run_in_executor(self.pool, run_calls, self.runtime, calls)
        self.metrics.add("batch", self.name, len(calls), rows)
        return results


def _error(status: int, message: str, field_name: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field_name, "code": status}}, status_code=status)


app = FastAPI(title="blip-serve")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, graceful_shutdown_timeout_s=30)
@serve.ingress(app)
class Gateway:
    def __init__(self, models: dict, tasks: dict, config: ServeConfig, metrics):
        self.models, self.tasks, self.config, self.metrics = models, tasks, config, metrics
        self.buffer = MetricsBuffer(metrics)
        self.key = config.api_key.encode() if config.api_key else None

    def _auth(self, request: Request) -> None:
        if self.key is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                raise RequestError("authorization", "missing or wrong bearer token", status=401)

    async def _body(self, request: Request):
        self._auth(request)
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before reading it
            raise RequestError("body", f"{declared} bytes; expected at most {limit}", 413)
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError("body", f"{len(raw)} bytes; expected at most {limit}", 413)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError("body", f"not valid JSON ({e})") from None

    async def _call(self, model: str, call: Call):
        """Run on a replica. A replica that dies under the request (killed, node lost) gets it
        retried once on another; inference has no side effects."""
        for attempt in (0, 1):
            try:
                result = await self.models[model].run.remote(call)
                break
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt:
                    raise RequestError("model", f"{model}: the replica serving this request died; retry", 503)
                self.buffer.add("retry", model)
        if isinstance(result, Failed):
            message = result.message.replace("GenerationOptions.", "options.", 1)
            raise RequestError(result.field, message, named=result.field != "body")
        return result

    async def _handle(self, request: Request, route: str, work, model: str | None = None):
        """Parse, run `work(body)`, answer errors as JSON; count and time every request."""
        start = time.perf_counter()
        try:
            body = await self._body(request)
            model = model or (body.get("model") if isinstance(body, dict) else None)
            response = await work(body)
        except RequestError as e:
            response = _error(e.status, str(e), e.field)
        except BackPressureError:
            response = _error(503, f"{model}: overloaded (queue full); retry later")
        except Exception as e:  # a fault in the server, not in the request: say what it was
            response = _error(500, f"{model}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self.buffer.add("request", str(model), route, getattr(response, "status_code", 200), time.perf_counter() - start)
        return response

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok", "models": self.tasks}

    @app.get("/metrics")
    async def metrics_route(self):
        self.buffer.flush()  # replicas send theirs within MetricsBuffer.period
        return Response(await self.metrics.render.remote(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def list_models(self, request: Request):
        try:
            self._auth(request)
        except RequestError as e:
            return _error(e.status, str(e), e.field)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "blip-serve", "tasks": t}
                                           for m, t in self.tasks.items()]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def work(body):
            model, task, images, texts, options, n, stream = openai_api.parse_chat(body, self.tasks, self.config.limits)
            result = await self._call(model, Call(task, images, texts, options))
            if not stream:
                return JSONResponse(openai_api.completion(model, result, n))
            lines = [f"data: {json.dumps(c)}\n\n" for c in openai_api.chunks(model, result, n)] + ["data: [DONE]\n\n"]
            return StreamingResponse(iter(lines), media_type="text/event-stream")
        return await self._handle(request, "chat", work)

    @app.post("/v1/{model}/{task}")
    async def task(self, model: str, task: str, request: Request):
        async def work(body):
            if model not in self.models:
                raise RequestError("model", f"unknown model {model!r}; expected one of {sorted(self.models)}", 404)
            if NEEDS.get(task, task) not in self.tasks[model]:
                raise RequestError("task", f"{model} does {self.tasks[model]}; expected a route of those "
                                   f"({sorted(t for t, need in NEEDS.items() if need in self.tasks[model])})", 404)
            call = parse_task(task, body, self.config.limits)
            return {"model": model, "task": task, RESULT_KEYS[task]: await self._call(model, call)}
        return await self._handle(request, task, work, model)


def build_app(bundles: list[str], config: ServeConfig):
    """bundles: folders; each becomes a deployment named after its folder."""
    names = [Path(b).name for b in bundles]
    if len(set(names)) != len(names):
        raise ValueError(f"bundles: folder names must differ (they name the models), got {names}")
    tasks = {n: bundle_tasks(b) for n, b in zip(names, bundles)}
    metrics = Metrics.bind()
    models = {}
    for name, bundle in zip(names, bundles):
        models[name] = BundleModel.options(
            name=name, num_replicas=config.replicas, max_ongoing_requests=config.max_ongoing,
            max_queued_requests=config.max_queued, ray_actor_options={"num_cpus": config.cpus_per_replica},
        ).bind(str(Path(bundle).resolve()), config, metrics)
    return Gateway.bind(models, tasks, config, metrics)

