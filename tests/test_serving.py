"""`bertforge serve`: a real uvicorn server on loopback, a tiny model, real HTTP requests."""
from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import export_tiny_onnx

from pipeline.cli import main
from pipeline.errors import BertforgeError
from serving.config import ServeConfig
from serving.server import build_server, serve_in_thread

from conftest import make_tiny_bert


@pytest.fixture(scope="module")
def onnx_model(tiny_bert, tmp_path_factory):
    return export_tiny_onnx(tiny_bert, tmp_path_factory.mktemp("serve") / "onnx")


def config(**kw) -> ServeConfig:
    # One ONNX Runtime thread: per session (no global state) and immune to this machine's contention.
    return ServeConfig(**{"port": 0, "num_threads": 1, "log_level": "warning", "graceful_timeout_s": 5, **kw})


@pytest.fixture(scope="module")
def server(onnx_model):
    with serve_in_thread(onnx_model, config(max_wait_ms=30, max_body_bytes=20_000, max_inputs_per_request=8)) as url:
        yield url


def metric(url: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def predict(url, inputs, **kw):
    return httpx.post(f"{url}/predict", json={"inputs": inputs}, timeout=30, **kw)


def test_single_text_batch_and_pairs(server, onnx_model):
    one = predict(server, "a gripping, funny film")
    assert one.status_code == 200
    [p] = one.json()["predictions"]
    assert set(p["scores"]) == {"negative", "positive"}
    assert p["label"] == max(p["scores"], key=p["scores"].get)
    assert p["score"] == pytest.approx(max(p["scores"].values()))
    assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-5)

    texts = ["short", "a much longer sentence that needs many more word pieces than the first one", "middling text"]
    batch = predict(server, texts).json()["predictions"]
    assert len(batch) == 3
    # Padding to the batch's longest text must not change a text's answer.
    alone = [predict(server, t).json()["predictions"][0] for t in texts]
    for b, a in zip(batch, alone):
        assert b["scores"]["positive"] == pytest.approx(a["scores"]["positive"], abs=1e-5)

    pairs = predict(server, [["A man plays guitar.", "Someone makes music."], ["x", "y"]]).json()["predictions"]
    assert len(pairs) == 2
    # Same texts as a pair and as one sentence are different inputs (token type ids, [SEP]).
    assert pairs[0]["scores"] != predict(server, "A man plays guitar. Someone makes music.").json()["predictions"][0]["scores"]


def test_matches_the_model_called_directly(server, onnx_model):
    from pipeline.inference import load_runtime

    runtime = load_runtime(onnx_model, num_threads=1)
    enc = runtime.tokenizer(["a fine film", "dull"], padding=True, return_tensors="np")
    logits = runtime(dict(enc))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    served = predict(server, ["a fine film", "dull"]).json()["predictions"]
    assert [s["scores"]["positive"] for s in served] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)


def test_concurrent_requests_share_model_calls(server):
    calls_before = metric(server, "bertforge_model_calls_total")

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.post(f"{server}/predict", json={"inputs": f"text number {i}"})
                                          for i in range(24)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 24
    calls = metric(server, "bertforge_model_calls_total") - calls_before
    assert 1 <= calls < 24, f"{calls} model calls for 24 concurrent requests"


BAD_REQUESTS = [
    # (description, request kwargs, expected status)
    ("malformed JSON", dict(content=b'{"inputs": "unclosed'), 422),
    ("invalid UTF-8", dict(content=b'{"inputs": "caf\xe9 \xff"}'), 422),
    ("lone surrogate escape", dict(content=b'{"inputs": "\\ud800"}'), 422),
    ("empty body", dict(content=b""), 422),
    ("not an object", dict(json=["a", "b"]), 422),
    ("missing inputs", dict(json={"text": "hello"}), 422),
    ("unknown field", dict(json={"inputs": "hi", "top_k": 3}), 422),
    ("number", dict(json={"inputs": 3}), 422),
    ("null", dict(json={"inputs": None}), 422),
    ("object", dict(json={"inputs": {"text": "a"}}), 422),
    ("list of numbers", dict(json={"inputs": [1, 2]}), 422),
    ("texts and pairs mixed", dict(json={"inputs": ["a", ["b", "c"]]}), 422),
    ("pair of three", dict(json={"inputs": [["a", "b", "c"]]}), 422),
    ("pair of one", dict(json={"inputs": [["a"]]}), 422),
    ("empty string", dict(json={"inputs": ""}), 422),
    ("whitespace string", dict(json={"inputs": "   \n"}), 422),
    ("empty list", dict(json={"inputs": []}), 422),
    ("empty half of a pair", dict(json={"inputs": [["a", ""]]}), 422),
    ("too many inputs", dict(json={"inputs": ["t"] * 9}), 413),
    ("body over the limit", dict(json={"inputs": "x" * 30_000}), 413),
    ("chunked body over the limit", dict(content=iter([b'{"inputs": "', b"y" * 25_000, b'"}'])), 413),
]


@pytest.mark.parametrize("what,kwargs,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_json_4xx(server, what, kwargs, status):
    r = httpx.post(f"{server}/predict", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and body["error_type"]


def raw_http(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_broken_http_gets_4xx(server):
    # Below the app: the HTTP parser answers these (plain text), and the server carries on.
    bad_length = b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{"inputs": "a"}'
    assert raw_http(server, bad_length).startswith(b"HTTP/1.1 400")
    assert raw_http(server, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_unknown_routes_methods_and_huge_text(server):
    r = httpx.get(f"{server}/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = httpx.get(f"{server}/predict")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.put(f"{server}/healthz")
    assert r.status_code == 405
    # A huge text under the body limit is truncated to max_tokens and answered.
    r = predict(server, "word " * 3_900)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    r = predict(server, "\u00e9\u4e2d\U0001F600 emoji and accents")
    assert r.status_code == 200
    assert metric(server, "bertforge_http_requests_total", status="500") == 0
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_metrics_health_and_docs(server):
    predict(server, ["one", "two"])
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["status"] == "ready"
    assert metric(server, "bertforge_http_requests_total", route="/predict", method="POST", status="200") >= 1
    assert metric(server, "bertforge_http_request_duration_seconds_count", route="/predict") >= 1
    assert metric(server, "bertforge_batch_size_count") >= 1
    assert metric(server, "bertforge_inputs_total") >= 2
    assert metric(server, "bertforge_queue_depth") == 0
    # Unknown paths share one label: a scanner cannot blow up the metrics' cardinality.
    httpx.get(f"{server}/random/path/123")
    assert metric(server, "bertforge_http_requests_total", route="unmatched", status="404") >= 1
    schema = httpx.get(f"{server}/openapi.json").json()
    assert "/predict" in schema["paths"] and "PredictRequest" in schema["components"]["schemas"]
    assert httpx.get(f"{server}/docs").status_code == 200
    info = httpx.get(f"{server}/info").json()
    assert info["format"] == "onnx" and info["labels"] == ["negative", "positive"]
    assert info["config"]["api_key"] is False


def test_burst_past_the_queue_gets_429(onnx_model):
    # The batch waits up to 300 ms to fill, so the burst lands while the first inputs are still queued.
    with serve_in_thread(onnx_model, config(max_queue=6, max_inputs_per_request=2, max_batch_size=64, max_wait_ms=300)) as url:
        async def burst():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*[client.post(f"{url}/predict", json={"inputs": ["a", "b"]})
                                              for _ in range(12)])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) <= 3  # 6 inputs at most, 2 per request
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error_type"] == "overloaded" and refused.headers["retry-after"]
        assert predict(url, "after the burst").status_code == 200


def test_api_key_and_rejecting_long_inputs(onnx_model):
    with serve_in_thread(onnx_model, config(api_key="s3cret", max_tokens=16, on_long_input="reject")) as url:
        assert predict(url, "hi").status_code == 401
        assert predict(url, "hi", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
        ok = {"Authorization": "Bearer s3cret"}
        assert predict(url, "hi", headers=ok).status_code == 200
        assert predict(url, "hi", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = predict(url, ["fine", "far too long " * 20], headers=ok)
        assert r.status_code == 413 and "tokens" in r.json()["error"]
        r = predict(url, "y" * 5_000, headers=ok)  # refused before tokenizing
        assert r.status_code == 413
        assert predict(url, "ten words or so fit well within sixteen tokens", headers=ok).status_code == 200


class GatedRuntime:
    """The real runtime, held back until released: lets a test see the server before warm-up ends."""

    def __init__(self, runtime):
        self.runtime, self.released = runtime, threading.Event()
        self.config, self.tokenizer, self.format = runtime.config, runtime.tokenizer, runtime.format

    def __call__(self, inputs):
        self.released.wait(30)
        return self.runtime(inputs)


def test_not_ready_until_warmed_up(onnx_model):
    from pipeline.inference import load_runtime

    gated = GatedRuntime(load_runtime(onnx_model, num_threads=1))
    with serve_in_thread(onnx_model, config(), wait_ready=False, runtime=gated) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
        assert predict(url, "too early").status_code == 503
        gated.released.set()
        for _ in range(100):
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert predict(url, "now").status_code == 200


def test_shutdown_answers_requests_in_flight(onnx_model):
    results = []
    with serve_in_thread(onnx_model, config(max_wait_ms=2000, max_batch_size=64)) as url:
        def call(i):
            results.append(predict(url, f"in flight {i}").status_code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for _ in range(200):  # until all six are queued, waiting for their batch to fill
            if metric(url, "bertforge_inputs_in_flight") == 6:
                break
            threading.Event().wait(0.01)
        assert metric(url, "bertforge_model_calls_total") == 0  # not answered yet
    # Leaving the block asked the server to stop while they were queued.
    for t in threads:
        t.join(10)
    assert results == [200] * 6
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


def test_pytorch_artifact_and_regression(tmp_path, tiny_bert, server):
    # The PyTorch folder the ONNX file was exported from answers the same.
    with serve_in_thread(tiny_bert, config(num_threads=None)) as url:
        assert httpx.get(f"{url}/info").json()["format"] == "pytorch"
        from_torch = predict(url, "a fine film").json()["predictions"][0]["scores"]["positive"]
    assert from_torch == pytest.approx(predict(server, "a fine film").json()["predictions"][0]["scores"]["positive"], abs=1e-4)

    regression = make_tiny_bert(tmp_path / "stsb", num_labels=1, task="stsb")
    with serve_in_thread(regression, config(num_threads=None)) as url:
        [p] = predict(url, [["A man plays.", "A person plays."]]).json()["predictions"]
        assert set(p) == {"value"} and isinstance(p["value"], float)


def test_bad_model_folder_fails_at_start(tmp_path, onnx_model, capsys):
    with pytest.raises(BertforgeError, match="no config.json"):
        build_server(tmp_path, config())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BertforgeError, match="config"):
        build_server(tmp_path, config())
    onnx = tmp_path / "corrupt"
    onnx.mkdir()
    for f in onnx_model.iterdir():
        if f.suffix != ".onnx":
            (onnx / f.name).write_bytes(f.read_bytes())
    (onnx / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(BertforgeError, match="cannot load ONNX model"):
        build_server(onnx, config())
    with pytest.raises(BertforgeError, match="max-batch-size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(BertforgeError, match="max-queue"):
        ServeConfig(max_queue=4, max_inputs_per_request=8)

    # The command itself: exit 2 and one line.
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bertforge serve: error:") and "does not exist" in err[0]
