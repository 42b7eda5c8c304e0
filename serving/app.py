"""The HTTP API: POST /predict, GET /healthz, /readyz, /info, /metrics, OpenAPI at /docs.

Request bodies are read and validated here rather than by FastAPI's body parameter, so that the size
limit applies while reading and every malformed body (bad JSON, invalid UTF-8, wrong types) gets the
same JSON error shape. The schema is still declared for /docs.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.exceptions import HTTPException

from serving.batcher import Batcher, QueueFull
from serving.config import ServeConfig
from serving.metrics import ServingMetrics
from serving.predictor import InputTooLong, Predictor

log = logging.getLogger("bertforge.serve")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] | list[Annotated[list[StrictStr], Field(min_length=2, max_length=2)]] = Field(
        description='One text, a list of texts, or a list of [text, text_pair] pairs',
        examples=["a gripping, funny film", ["great", "dull"], [["A man plays.", "Someone plays."]]],
    )


class Prediction(BaseModel):
    label: str | None = Field(None, description="most probable label (classification)")
    score: float | None = Field(None, description="its probability")
    scores: dict[str, float] | None = Field(None, description="probability of every label")
    value: float | None = Field(None, description="the prediction of a regression model")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class ApiError(HTTPException):
    def __init__(self, status: int, error_type: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.error_type = error_type


_ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large", 422: "validation", 429: "overloaded", 503: "unavailable"}


def _error(status: int, message: str, error_type: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type or _ERROR_TYPES.get(status, "error")},
                        status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    """pydantic's errors in one line, without echoing the (possibly huge) input back."""
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("str", "list[str]", "list[list[str]]"))
    return f"{where}: {e['msg']}" if where else e["msg"]


class _RecordRequests:
    """Pure ASGI middleware counting requests by matched route (never the raw path: unbounded labels)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def create_app(model_dir: str | Path, config: ServeConfig | None = None, runtime=None) -> FastAPI:
    """Load the model now (a bad folder fails here, before any port is bound); warm it up at startup."""
    from pipeline.onnx_runtime import load_serving_runtime as load_runtime  # torch only for PyTorch artifacts
    from serving import oip, tei
    from serving.protocols import Served

    config = config or ServeConfig()
    runtime = runtime or load_runtime(model_dir, config.device, config.num_threads)
    metrics = ServingMetrics()
    predictor = Predictor(runtime, config.max_tokens, config.on_long_input, metrics)
    batcher = Batcher(predictor, config.max_batch_size, config.max_wait_ms, config.max_queue, metrics)
    state = {"ready": False, "warmup_s": None}

    async def warm_up():
        start = time.perf_counter()
        try:
            # The first calls of a runtime allocate and pick kernels; pay that before taking traffic.
            long_text = "warm " * predictor.max_tokens
            await batcher.run_in_worker(predictor, ["warm up"] * config.max_batch_size)
            await batcher.run_in_worker(predictor, [long_text])
        except Exception:  # a model that cannot run stays not-ready; /readyz says so
            log.exception("warm-up failed")
            return
        state["warmup_s"] = round(time.perf_counter() - start, 3)
        state["ready"] = True
        log.info("model warmed up in %.1fs, ready", state["warmup_s"])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        warm = asyncio.create_task(warm_up())
        yield
        # uvicorn has stopped accepting connections and waited for requests in flight; whatever is
        # still queued gets answered before the worker stops.
        state["ready"] = False
        warm.cancel()
        await batcher.stop()

    app = FastAPI(title="bertforge", version="0.1.0", lifespan=lifespan,
                  description=f"Sequence classification with `{Path(str(model_dir)).name}` ({runtime.format}).")
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, config
    app.add_middleware(_RecordRequests, metrics=metrics)
    served = Served(predictor, batcher, config, metrics, state, config.model_name or Path(str(model_dir)).name, runtime.format)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "error_type", None), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, _describe(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error", "internal")

    async def require_key(request: Request) -> None:
        if not config.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)",
                           {"WWW-Authenticate": "Bearer"})

    errors = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}}

    # /predict: bertforge's own answer, or TEI's when the body has a TEI / Hugging Face field (serving/tei.py)
    @app.post("/predict", dependencies=[Depends(require_key)], responses={200: {"model": PredictResponse}, **errors},
              openapi_extra=body_schema, summary="Classify texts or text pairs")
    @app.post("/v1/predict", dependencies=[Depends(require_key)], responses={200: {"model": PredictResponse}, **errors},
              openapi_extra=body_schema, summary="Classify texts or text pairs (always bertforge's own answer)")
    async def predict(request: Request):
        if not state["ready"]:
            raise ApiError(503, "unavailable", "model is warming up", {"Retry-After": "1"})
        body = await _read_body(request, config.max_body_bytes)
        if request.url.path == "/predict" and tei.is_dialect_body(body):
            return await tei.answer(served, body)
        try:
            inputs = PredictRequest.model_validate_json(body).inputs
        except ValidationError as e:
            raise ApiError(422, "validation", _describe(e.errors(include_url=False, include_input=False))) from None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise ApiError(422, "validation", "inputs: empty list")
        if len(inputs) > config.max_inputs_per_request:
            raise ApiError(413, "payload_too_large",
                           f"{len(inputs)} inputs in one request, limit {config.max_inputs_per_request}")
        inputs = [x if isinstance(x, str) else tuple(x) for x in inputs]
        for i, x in enumerate(inputs):
            if any(not part.strip() for part in ((x,) if isinstance(x, str) else x)):
                raise ApiError(422, "validation", f"inputs.{i}: empty text")
        try:
            answers = await batcher.submit(inputs)
        except QueueFull as e:
            raise ApiError(429, "overloaded", f"server busy: {e}", {"Retry-After": "1"}) from None
        except InputTooLong as e:
            raise ApiError(413, "payload_too_large", f"input too long: {e} (the server rejects rather than truncates)") from None
        metrics.inputs.inc(len(answers))
        return JSONResponse({"predictions": answers})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def readyz():
        if not state["ready"]:
            return _error(503, "model is warming up")
        return {"status": "ready", "warmup_s": state["warmup_s"]}

    @app.get("/info", summary="Model and server settings")
    async def info():
        return {"model": str(model_dir), "format": runtime.format, "labels": predictor.labels,
                "regression": predictor.regression, "max_tokens": predictor.max_tokens,
                "model_calls": batcher.model_calls, "config": config.public()}

    @app.get("/metrics", dependencies=[Depends(require_key)], summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    app.include_router(tei.router(served, require_key))
    app.include_router(oip.router(served, require_key))

    app.openapi_schema = None
    _original_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = _original_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {})["PredictRequest"] = \
                PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"body of {declared} bytes, limit {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
