"""The Open Inference Protocol (KServe v2, also Triton's HTTP API), so KServe, Triton clients and
tritonclient.http can call the model.

One model, version "1", named by `--model-name` (default: the artifact folder's name). Inputs: `text`
(BYTES, shape [N] or [N, 1]) and optionally `text_pair` (same shape). Outputs: `label` (BYTES [N]),
`scores` (FP32 [N, L], probabilities in label order) and `logits` (FP32 [N, L]); a regression model has no
`label` and L = 1. Outputs are always JSON tensors; inputs may also use Triton's binary tensor extension
(tritonclient's default), which puts length-prefixed BYTES after the JSON header.
"""
from __future__ import annotations

import json
import struct
import time
from importlib import metadata

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.protocols import Served

VERSION = "1"
INPUTS = ("text", "text_pair")
OUTPUTS = ("label", "scores", "logits")


def model_metadata(served: Served) -> dict:
    n = len(served.predictor.labels)
    outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1, n]},
               {"name": "logits", "datatype": "FP32", "shape": [-1, n]}]
    if not served.predictor.regression:
        outputs.insert(0, {"name": "label", "datatype": "BYTES", "shape": [-1]})
    return {
        "name": served.model_name, "versions": [VERSION],
        "platform": "onnxruntime_onnx" if served.format == "onnx" else "pytorch_libtorch",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                   {"name": "text_pair", "datatype": "BYTES", "shape": [-1], "optional": True}],
        "outputs": outputs,
        # not in the protocol's schema, which has no place for class names; clients may ignore it
        "parameters": {"labels": served.predictor.labels, "max_tokens": served.predictor.max_tokens},
    }


def _bytes_elements(raw: bytes, where: str) -> list[str]:
    """Triton's binary BYTES tensor: each element a 4-byte little-endian length, then that many bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ValueError(f"{where}: truncated binary BYTES element")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise ValueError(f"{where}: truncated binary BYTES element")
        out.append(raw[at:at + n].decode("utf-8"))
        at += n
    return out


def _flatten(data) -> list:
    """JSON tensor data may be row-major flat or nested like the shape."""
    if isinstance(data, list) and any(isinstance(d, list) for d in data):
        return [x for d in data for x in _flatten(d)]
    return data if isinstance(data, list) else [data]


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, list[str]]]:
    """(the request JSON, {input name: texts}); ValueError says what is wrong."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ValueError("invalid Inference-Header-Content-Length")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("body is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ValueError("inputs: expected a list of tensors")
    tensors, offset = {}, 0
    for i, t in enumerate(request["inputs"]):
        where = f"inputs.{i}"
        if not isinstance(t, dict) or t.get("name") not in INPUTS:
            raise ValueError(f"{where}: name must be one of {', '.join(INPUTS)}")
        where = f"input {t['name']}"
        if t["name"] in tensors:
            raise ValueError(f"{where}: given twice")
        if t.get("datatype") != "BYTES":
            raise ValueError(f"{where}: datatype must be BYTES, got {t.get('datatype')!r}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(type(d) is int and d >= 0 for d in shape) \
                or (len(shape) == 2 and shape[1] != 1):
            raise ValueError(f"{where}: shape must be [N] or [N, 1], got {shape!r}")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise ValueError(f"{where}: binary_data_size beyond the body")
            try:
                data = _bytes_elements(binary[offset:offset + size], where)
            except UnicodeDecodeError:
                raise ValueError(f"{where}: text is not UTF-8") from None
            offset += size
        else:
            data = _flatten(t.get("data"))
            if not all(isinstance(x, str) for x in data):
                raise ValueError(f"{where}: data must be strings")
        if len(data) != shape[0]:
            raise ValueError(f"{where}: shape {shape} but {len(data)} elements")
        tensors[t["name"]] = data
    if "text" not in tensors:
        raise ValueError("input text is required")
    if "text_pair" in tensors and len(tensors["text_pair"]) != len(tensors["text"]):
        raise ValueError("inputs text and text_pair differ in length")
    return request, tensors


def requested_outputs(request: dict, regression: bool) -> list[str]:
    available = [o for o in OUTPUTS if not (regression and o == "label")]
    asked = request.get("outputs")
    if asked is None:
        return available
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise ValueError("outputs: expected a list of {\"name\": ...}")
    names = [o["name"] for o in asked]
    for name in names:
        if name not in available:
            raise ValueError(f"output {name!r} unknown; this model has {', '.join(available)}")
    return names


def router(served: Served, require_key) -> APIRouter:
    from serving.app import ApiError

    api = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

    def check_model(name: str, version: str | None = None) -> None:
        if name != served.model_name or version not in (None, VERSION):
            raise ApiError(404, "not_found", f"model {name!r} version {version or VERSION} not found; this server "
                           f"serves {served.model_name!r} version {VERSION}")

    @api.get("", summary="Server metadata")
    async def server_metadata():
        try:
            version = metadata.version("bertforge")
        except metadata.PackageNotFoundError:
            version = "0+unknown"
        return {"name": "bertforge", "version": version, "extensions": []}

    @api.get("/health/live", summary="Server live")
    async def live():
        return {"live": True}

    @api.get("/health/ready", summary="Server ready (model warmed up)")
    async def ready():
        return JSONResponse({"ready": served.state["ready"]}, status_code=200 if served.state["ready"] else 503)

    @api.get("/models/{name}", summary="Model metadata")
    @api.get("/models/{name}/versions/{version}", summary="Model metadata")
    async def model(name: str, version: str | None = None):
        check_model(name, version)
        return model_metadata(served)

    @api.get("/models/{name}/ready", summary="Model ready")
    @api.get("/models/{name}/versions/{version}/ready", summary="Model ready")
    async def model_ready(name: str, version: str | None = None):
        check_model(name, version)
        return JSONResponse({"name": served.model_name, "ready": served.state["ready"]},
                            status_code=200 if served.state["ready"] else 503)

    @api.post("/models/{name}/infer", dependencies=[Depends(require_key)], summary="Inference (JSON tensors)")
    @api.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_key)], summary="Inference")
    async def infer(name: str, request: Request, version: str | None = None):
        deadline = time.monotonic() + served.config.request_timeout_s
        check_model(name, version)
        binary = request.headers.get("inference-header-content-length")  # Triton's JSON header + binary tensors
        body = await served.read_body(request, deadline, json_only=binary is None)
        try:
            req, tensors = parse_request(body, request.headers.get("inference-header-content-length"))
            outputs = requested_outputs(req, served.predictor.regression)
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        texts = tensors["text"]
        inputs = list(zip(texts, tensors["text_pair"])) if "text_pair" in tensors else texts
        answers = await served.classify(inputs, "text", deadline)
        logits = np.array([a.logits for a in answers], dtype=np.float32).reshape(len(answers), -1)
        columns = {
            "label": ("BYTES", [len(answers)], [a.get("label") for a in answers]),
            "scores": ("FP32", list(logits.shape),
                       logits.ravel().tolist() if served.predictor.regression
                       else [a["scores"][label] for a in answers for label in served.predictor.labels]),
            "logits": ("FP32", list(logits.shape), logits.ravel().tolist()),
        }
        response = {"model_name": served.model_name, "model_version": VERSION,
                    "outputs": [{"name": n, "datatype": columns[n][0], "shape": columns[n][1], "data": columns[n][2]}
                                for n in outputs]}
        if isinstance(req.get("id"), str):
            response["id"] = req["id"]
        return response

    return api
