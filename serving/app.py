"""The HTTP API: POST /predict, GET /healthz, /readyz, /info, /metrics, OpenAPI at /docs.

Request bodies are read and validated here rather than by FastAPI's body parameter, so that the size
limit applies while reading and every malformed body (bad JSON, invalid UTF-8, wrong types) gets the
same JSON error shape. The schema is still declared for /docs.

Every request has one deadline (request_timeout_s) over reading its body (408 past it: a slow client)
and waiting for its answer (504: a slow or stuck model). With an API key set, every route but the
probes /healthz and /readyz needs it (TEI's choice too: orchestrators probe without credentials).
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
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, create_model
from pydantic_core import from_json
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from serving.batcher import Batcher
from serving.config import ServeConfig
from serving.metrics import ServingMetrics
from serving.predictor import Predictor

log = logging.getLogger("bertforge.serve")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] | list[Annotated[list[StrictStr], Field(min_length=2, max_length=2)]] = Field(
        description='One text, a list of texts, or a list of [text, text_pair] pairs',
        examples=["a gripping, funny film", ["great", "dull"], [["A man plays.", "Someone plays."]]],
    )


def _request_model(max_inputs: int, max_chars: int) -> type[BaseModel]:
    """PredictRequest with this server's limits in its schema, so clients, /docs and the fuzzer see them
    (a longer list is refused by _parse_inputs before pydantic walks it)."""
    text = Annotated[StrictStr, Field(max_length=max_chars)]
    pair = Annotated[list[text], Field(min_length=2, max_length=2)]
    inputs = text | Annotated[list[text], Field(max_length=max_inputs)] | Annotated[list[pair], Field(max_length=max_inputs)]
    return create_model("PredictRequest", __base__=PredictRequest,
                        inputs=(inputs, Field(description=PredictRequest.model_fields["inputs"].description,
                                              examples=PredictRequest.model_fields["inputs"].examples)))


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
                408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "validation", 429: "overloaded", 500: "model_error", 503: "unavailable", 504: "timeout"}
# Answered without the API key: liveness and readiness probes (orchestrators send no credentials),
# ours and the Open Inference Protocol's (serving/oip.py, the routes KServe probes).
OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")


def _error(status: int, message: str, error_type: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type or _ERROR_TYPES.get(status, "error")},
                        status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    """pydantic's errors in one line, without echoing the (possibly huge) input back."""
    e = errors[0]
    # Union members tag the location ("constrained-str", "list[list[str]]"): only field names and indices stay.
    where = ".".join(str(p) for p in e.get("loc", ()) if not (isinstance(p, str) and p.rstrip("]").endswith("str")))
    return f"{where}: {e['msg']}" if where else e["msg"]


def _key_matches(headers: Headers, key: str) -> bool:
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return secrets.compare_digest(given.encode(), key.encode())


def _unauthorized() -> JSONResponse:
    return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})


class _RequireKey:
    """Pure ASGI middleware: with a key set, every path but the probes needs it, the docs and routes
    added later included (a route-level dependency would miss FastAPI's own /docs and /openapi.json)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or _key_matches(Headers(scope=scope), self.key):
            return await self.app(scope, receive, send)
        await _unauthorized()(scope, receive, send)


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


def _batch_invariant(model_dir) -> bool | None:
    """Whether an input's answer is independent of its batch neighbours, from the artifact's manifest (None:
    no manifest). Dynamic int8 quantizes each batch's activations with one scale taken over the whole batch;
    fp32, fp16 and static int8 (scales fixed at calibration) compute every row on its own."""
    from pipeline.artifacts import read_manifest

    manifest = read_manifest(model_dir)
    if manifest is None:
        return None
    return not (manifest.precision == "int8" and "dynamic" in str((manifest.params or {}).get("mode", "")))


def create_app(model_dir: str | Path, config: ServeConfig | None = None, runtime=None) -> FastAPI:
    """Load the model now (a bad folder fails here, before any port is bound); warm it up at startup."""
    from pipeline.onnx_runtime import load_serving_runtime as load_runtime  # torch only for PyTorch artifacts
    from serving import oip, tei
    from serving.protocols import Served

    config = config or ServeConfig()
    runtime = runtime or load_runtime(model_dir, config.device, config.resolved_threads())
    metrics = ServingMetrics()
    predictor = Predictor(runtime, config.max_tokens, config.on_long_input, metrics)
    batcher = Batcher(predictor, config.max_batch_size, config.max_wait_ms, config.max_queue, metrics)
    state = {"ready": False, "warmup_s": None}
    request_model = _request_model(config.max_inputs_per_request, config.max_text_chars)
    # Text pairs need segment (token type) ids: a graph without that input, or a model with a single
    # type, would silently ignore the second text or index past its table.
    accepts_pairs = ("token_type_ids" in getattr(runtime, "input_names", ("token_type_ids",))
                     and getattr(runtime.config, "type_vocab_size", 0) >= 2)
    batch_invariant = _batch_invariant(model_dir)
    if batch_invariant is False and config.max_batch_size > 1:
        log.warning("%s is dynamic int8: one activation scale per batch, so an answer can change with what it is "
                    "batched with (benchmarks/batch_invariance.py measures how often); quantize static, or serve "
                    "with --max-batch-size 1, for answers that do not", model_dir)

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
    if config.api_key:
        app.add_middleware(_RequireKey, key=config.api_key)
    app.add_middleware(_RecordRequests, metrics=metrics)
    served = Served(predictor, batcher, config, metrics, state, config.model_name or Path(str(model_dir)).name,
                    runtime.format, accepts_pairs)

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
        # _RequireKey already guards every route; kept per route so a route never depends on middleware order.
        if config.api_key and not _key_matches(request.headers, config.api_key):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)",
                           {"WWW-Authenticate": "Bearer"})

    errors = {code: {"model": ErrorResponse} for code in (401, 408, 413, 415, 422, 429, 500, 503, 504)}
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}}

    # /predict: bertforge's own answer, or TEI's when the body has a TEI / Hugging Face field (serving/tei.py)
    @app.post("/predict", dependencies=[Depends(require_key)], responses={200: {"model": PredictResponse}, **errors},
              openapi_extra=body_schema, summary="Classify texts or text pairs")
    @app.post("/v1/predict", dependencies=[Depends(require_key)], responses={200: {"model": PredictResponse}, **errors},
              openapi_extra=body_schema, summary="Classify texts or text pairs (always bertforge's own answer)")
    async def predict(request: Request):
        deadline = time.monotonic() + config.request_timeout_s
        if not state["ready"]:
            raise ApiError(503, "unavailable", "model is warming up", {"Retry-After": "1"})
        body = await served.read_body(request, deadline)
        if request.url.path == "/predict" and tei.is_dialect_body(body):
            return await tei.answer(served, body, deadline)
        inputs = _parse_inputs(body, request_model, config)
        answers = await served.classify([x if isinstance(x, str) else tuple(x) for x in inputs], "inputs", deadline)
        return JSONResponse({"predictions": answers})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model warmed up, batcher alive and making progress",
             responses={503: {"model": ErrorResponse}})
    async def readyz():
        if not state["ready"]:
            return _error(503, "model is warming up")
        if not batcher.alive:
            return _error(503, f"the batcher is not running ({batcher.failure!r})")
        if batcher.stalled_for() > config.request_timeout_s:
            return _error(503, f"no progress: one batch has run for {batcher.stalled_for():.0f}s "
                               f"(request timeout {config.request_timeout_s:g}s)")
        return {"status": "ready", "warmup_s": state["warmup_s"]}

    @app.get("/info", summary="Model and server settings")
    async def info():
        return {"model": str(model_dir), "format": runtime.format, "labels": predictor.labels,
                "regression": predictor.regression, "max_tokens": predictor.max_tokens, "accepts_pairs": accepts_pairs,
                "batch_invariant_answers": batch_invariant,
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
                request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _require_json(request: Request) -> None:
    """415 for a body declared as anything but JSON: a browser may post text/plain or a form cross-origin
    without a preflight, never application/json. A body without Content-Type is read as JSON (curl -d)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {media or 'nothing'!r}")


def _parse_inputs(body: bytes, request_model: type[BaseModel], config: ServeConfig) -> list:
    """The request's inputs as a list. Too many of them is refused (413) after parsing, before validation:
    a megabyte of small invalid items would otherwise cost pydantic a second of event-loop time."""
    try:
        data = from_json(body)
    except ValueError as e:
        raise ApiError(422, "validation", f"invalid JSON: {e}") from None
    given = data.get("inputs") if isinstance(data, dict) else None
    if isinstance(given, list) and len(given) > config.max_inputs_per_request:
        raise ApiError(413, "payload_too_large", f"{len(given)} inputs in one request, limit {config.max_inputs_per_request}")
    try:
        inputs = request_model.model_validate(data).inputs
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if any(err["type"] == "string_too_long" for err in errors):
            raise ApiError(413, "payload_too_large", f"a text over {config.max_text_chars} characters") from None
        raise ApiError(422, "validation", _describe(errors)) from None
    return [inputs] if isinstance(inputs, str) else inputs


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
