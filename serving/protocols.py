"""What the protocol front ends (native, TEI, Open Inference Protocol) share: one model behind one batcher.

Each front end parses its own wire format into a list of texts or pairs, calls `Served.classify`, and
writes the answers in its own shape; admission (ready, limits, queue) is the same for all of them.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from serving.batcher import Batcher, BatcherDown, ModelError, QueueFull
from serving.config import ServeConfig
from serving.predictor import Answer, Input, InputTooLong, Predictor


@dataclass
class Served:
    predictor: Predictor
    batcher: Batcher
    config: ServeConfig
    metrics: object
    state: dict  # the app's {"ready": bool, ...}
    model_name: str
    format: str  # "onnx" or "pytorch"
    accepts_pairs: bool = True  # False for a model without token types (found at startup)

    async def read_body(self, request, deadline: float, json_only: bool = True) -> bytes:
        """The request's body within the size limit and the request's deadline (413, 408); declared as
        anything but JSON it gets 415 unless `json_only` is off (Triton's binary tensors)."""
        from serving.app import ApiError, _read_body, _require_json

        if json_only:
            _require_json(request)
        try:
            return await asyncio.wait_for(_read_body(request, self.config.max_body_bytes), deadline - time.monotonic())
        except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            raise ApiError(408, "request_timeout",
                           f"body not received within {self.config.request_timeout_s:g}s") from None

    async def classify(self, inputs: list[Input], where: str = "inputs", deadline: float | None = None) -> list[Answer]:
        """Admission and answers, the same for every protocol: each error becomes its status here."""
        from serving.app import ApiError

        if deadline is None:
            deadline = time.monotonic() + self.config.request_timeout_s
        if not self.state["ready"]:
            raise ApiError(503, "unavailable", "model is warming up", {"Retry-After": "1"})
        if not inputs:
            raise ApiError(422, "validation", f"{where}: empty list")
        if len(inputs) > self.config.max_inputs_per_request:
            raise ApiError(413, "payload_too_large",
                           f"{len(inputs)} inputs in one request, limit {self.config.max_inputs_per_request}")
        for i, x in enumerate(inputs):
            parts = (x,) if isinstance(x, str) else x
            if any(len(part) > self.config.max_text_chars for part in parts):
                raise ApiError(413, "payload_too_large", f"a text over {self.config.max_text_chars} characters")
            if any(not part.strip() for part in parts):
                raise ApiError(422, "validation", f"{where}.{i}: empty text")
            if not self.accepts_pairs and not isinstance(x, str):
                raise ApiError(422, "validation", f"{where}.{i}: this model takes single texts, not pairs "
                                                  "(it has no token type ids)")
        try:
            answers = await asyncio.wait_for(self.batcher.submit(inputs), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.config.request_timeout_s:g}s",
                           {"Retry-After": "1"}) from None
        except QueueFull as e:
            raise ApiError(429, "overloaded", f"server busy: {e}", {"Retry-After": "1"}) from None
        except BatcherDown as e:
            raise ApiError(503, "unavailable", str(e), {"Retry-After": "1"}) from None
        except ModelError as e:
            raise ApiError(500, "model_error", f"the model failed on this input: {e}") from None
        except InputTooLong as e:
            raise ApiError(413, "payload_too_large", f"input too long: {e} (the server rejects rather than truncates)") from None
        self.metrics.inputs.inc(len(answers))
        return answers


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))
