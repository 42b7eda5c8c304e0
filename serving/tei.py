"""Text Embeddings Inference's `/predict` and the Hugging Face Inference API, for their standard clients.

Two request dialects share `POST /` (and `POST /predict` when the body carries one of their fields):
- TEI: `{"inputs", "truncate", "raw_scores", "truncation_direction"}`. As in TEI, `inputs` is a text, ONE
  pair `[a, b]`, or a batch `[[a], [a, b], ...]`; a single input gets a flat list of {score, label},
  a batch one list per input.
- Hugging Face (`InferenceClient.text_classification`, the transformers pipeline): a `parameters` object
  (`top_k`, `function_to_apply`); `inputs` is a text, a list of texts, or {"text", "text_pair"}; the
  answer is always one list per input (the client reads element 0 for its one text).
Labels come sorted by score, highest first. Formats checked against TEI's router/src/http/types.rs and
huggingface_hub 0.36's InferenceClient.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from serving.protocols import Served, sigmoid, softmax

# Body fields that only TEI or the Hugging Face client send: their presence picks this dialect on /predict.
DIALECT_FIELDS = ("truncate", "raw_scores", "truncation_direction", "parameters")


class HFParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: StrictInt | None = Field(None, ge=1, description="keep the k most probable labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="scores from the logits: softmax (default), sigmoid, or none (the logits)")


class TeiRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Any = Field(description="TEI: a text, one pair [a, b], or a batch [[a], [a, b], ...]. With `parameters` "
                        "(Hugging Face): a text, a list of texts, {text, text_pair} or a list of those.",
                        examples=["a gripping, funny film", ["A man plays.", "Someone plays."]])
    truncate: StrictBool | None = Field(None, description="cut inputs past max-tokens (default: the server's "
                                        "--on-long-input); false refuses them with 413, as TEI does")
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")
    truncation_direction: Literal["right", "Right"] = Field("right", description="only right (the end) is cut")
    parameters: HFParameters | None = None


class Label(BaseModel):
    label: str
    score: float


def is_dialect_body(body: bytes) -> bool:
    """True when a /predict body is TEI's or the Hugging Face client's rather than bertforge's own."""
    if not any(b'"' + k.encode() + b'"' in body for k in DIALECT_FIELDS):
        # the common case, decided without parsing the body twice; a key spelled with \u escapes falls
        # through to the native route, which refuses the unknown field (422)
        return False
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False  # the native route reports the bad JSON
    return isinstance(data, dict) and any(k in data for k in DIALECT_FIELDS)


def _texts(x, where: str) -> tuple:
    if isinstance(x, str):
        return (x,)
    if isinstance(x, dict) and set(x) <= {"text", "text_pair"} and isinstance(x.get("text"), str) and \
            isinstance(x.get("text_pair", ""), str):
        return (x["text"], x["text_pair"]) if "text_pair" in x else (x["text"],)
    if isinstance(x, list) and 1 <= len(x) <= 2 and all(isinstance(p, str) for p in x):
        return tuple(x)
    raise ValueError(f"{where}: expected a text, [text] or [text, text_pair]")


def parse_inputs(inputs, hf: bool) -> tuple[list, bool]:
    """(inputs for the predictor, whether the request was a batch)."""
    if isinstance(inputs, str):
        return [inputs], False
    if hf and isinstance(inputs, dict):
        return [_as_input(_texts(inputs, "inputs"))], False
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("inputs: expected a text, a pair or a non-empty batch")
    if hf:  # pipeline style: a list is several inputs
        return [_as_input(_texts(x, f"inputs.{i}")) for i, x in enumerate(inputs)], True
    if all(isinstance(x, str) for x in inputs):  # TEI: [a] is one text, [a, b] one pair
        if len(inputs) > 2:
            raise ValueError("inputs: a list of strings is one text or one pair; a batch is [[text], [text, text_pair], ...]")
        return [_as_input(tuple(inputs))], False
    batch = []
    for i, x in enumerate(inputs):
        if not isinstance(x, list):
            raise ValueError(f"inputs.{i}: a batch holds [text] or [text, text_pair] lists")
        batch.append(_as_input(_texts(x, f"inputs.{i}")))
    return batch, True


def _as_input(parts: tuple):
    return parts[0] if len(parts) == 1 else parts


def scores_of(answer, labels: list[str], how: str) -> list[dict]:
    logits = np.asarray(answer.logits, dtype=np.float64)
    if "value" in answer:  # regression: the value itself, under the one label
        values = logits
    else:
        values = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda z: z}[how](logits)
    ranked = sorted(zip(labels, values.tolist()), key=lambda p: -p[1])
    return [{"label": label, "score": score} for label, score in ranked]


async def answer(served: Served, body: bytes, deadline: float | None = None) -> JSONResponse:
    """A TEI or Hugging Face request body to its answer (the caller has read the body within its limit)."""
    from serving.app import ApiError, _describe

    try:
        req = TeiRequest.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(422, "validation", _describe(e.errors(include_url=False, include_input=False))) from None
    hf = req.parameters is not None
    try:
        inputs, batch = parse_inputs(req.inputs, hf)
    except ValueError as e:
        raise ApiError(422, "validation", str(e)) from None
    answers = await served.classify(inputs, "inputs", deadline)
    if req.truncate is False and any(a.truncated for a in answers):
        raise ApiError(413, "payload_too_large",
                       f"input longer than {served.predictor.max_tokens} tokens (truncate: false)")
    labels = served.predictor.labels
    if hf:
        how, top_k = req.parameters.function_to_apply or "softmax", req.parameters.top_k
        return JSONResponse([scores_of(a, labels, how)[:top_k] for a in answers])
    # TEI writes score before label
    lists = [[{"score": s["score"], "label": s["label"]} for s in scores_of(a, labels, "none" if req.raw_scores else "softmax")]
             for a in answers]
    return JSONResponse(lists if batch else lists[0])


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its $defs put in place, to declare a body read by hand in OpenAPI."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def router(served: Served, require_key) -> APIRouter:
    api = APIRouter(tags=["TEI / Hugging Face"])
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(TeiRequest)}}}}

    @api.post("/", dependencies=[Depends(require_key)], openapi_extra=body_schema,
              responses={200: {"model": list[Label] | list[list[Label]]}},
              summary="Classify (Text Embeddings Inference / Hugging Face Inference API format)")
    async def tei_predict(request: Request):
        deadline = time.monotonic() + served.config.request_timeout_s
        return await answer(served, await served.read_body(request, deadline), deadline)

    return api
