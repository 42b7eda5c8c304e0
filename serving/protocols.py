"""What the protocol front ends (native, TEI, Open Inference Protocol) share: one model behind one batcher.

Each front end parses its own wire format into a list of texts or pairs, calls `Served.classify`, and
writes the answers in its own shape; admission (ready, limits, queue) is the same for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.batcher import Batcher, QueueFull
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

    async def classify(self, inputs: list[Input], where: str = "inputs") -> list[Answer]:
        from serving.app import ApiError

        if not self.state["ready"]:
            raise ApiError(503, "unavailable", "model is warming up", {"Retry-After": "1"})
        if not inputs:
            raise ApiError(422, "validation", f"{where}: empty list")
        if len(inputs) > self.config.max_inputs_per_request:
            raise ApiError(413, "payload_too_large",
                           f"{len(inputs)} inputs in one request, limit {self.config.max_inputs_per_request}")
        for i, x in enumerate(inputs):
            if any(not part.strip() for part in ((x,) if isinstance(x, str) else x)):
                raise ApiError(422, "validation", f"{where}.{i}: empty text")
        try:
            answers = await self.batcher.submit(inputs)
        except QueueFull as e:
            raise ApiError(429, "overloaded", f"server busy: {e}", {"Retry-After": "1"}) from None
        except InputTooLong as e:
            raise ApiError(413, "payload_too_large", f"input too long: {e} (the server rejects rather than truncates)") from None
        self.metrics.inputs.inc(len(answers))
        return answers


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))
