"""Issue 14: the serving edges an attacker or an operator finds. A real server on loopback, tiny models.

Faults are injected around the real ONNX Runtime session (a runtime that crashes, stalls or fails on one
word), never by replacing the server's own parts.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import textwrap
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from serving_helpers import export_tiny_onnx

from pipeline.errors import BertforgeError
from serving.config import ServeConfig
from serving.server import build_server, serve_in_thread

from conftest import make_tiny_bert

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_model(tiny_bert, tmp_path_factory):
    return export_tiny_onnx(tiny_bert, tmp_path_factory.mktemp("harden") / "onnx")


def config(**kw) -> ServeConfig:
    return ServeConfig(**{"port": 0, "num_threads": 1, "log_level": "error", "graceful_timeout_s": 2, **kw})


def predict(url, inputs, timeout=15, **kw):
    return httpx.post(f"{url}/predict", json={"inputs": inputs}, timeout=timeout, **kw)


class FaultyRuntime:
    """The real runtime, with one fault switched on from the test: `crash` raises an exception the
    batcher does not expect (BaseException), `hold` blocks the model thread until released, `poison`
    fails any batch that holds the token id of the word "poison"."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.config, self.tokenizer, self.format = runtime.config, runtime.tokenizer, runtime.format
        self.input_names = runtime.input_names
        self.poison_id = runtime.tokenizer.convert_tokens_to_ids("poison")
        self.crash = self.poison = False
        self.released = threading.Event()
        self.released.set()
        self.calls: list[int] = []  # batch size of every call

    def __call__(self, inputs):
        self.calls.append(len(inputs["input_ids"]))
        self.released.wait(30)
        if self.poison and (inputs["input_ids"] == self.poison_id).any():
            raise ValueError("the model failed on this batch")
        if self.crash:
            raise Crash("the model thread died")
        return self.runtime(inputs)


class Crash(BaseException):
    """Not an Exception: escapes `except Exception`, as asyncio.TimeoutError escaped `except TimeoutError` on 3.10."""


@pytest.fixture()
def faulty(onnx_model):
    from pipeline.inference import load_runtime

    return FaultyRuntime(load_runtime(onnx_model, num_threads=1))


def wait_until(check, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


# ---- item 2: a dead batcher -------------------------------------------------------------------------

def python310() -> str | None:
    """A working Python 3.10 interpreter (a pyenv shim may exist and still refuse to run)."""
    candidates = [shutil.which("python3.10"), *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def test_batcher_survives_its_idle_timeout_on_python310():
    exe = python310()
    if exe is None:
        pytest.skip("no Python 3.10 on this machine")
    # The batcher needs only the standard library, so Python 3.10 runs it as is: a batch held open by
    # max_wait_ms ends with wait_for's timeout, which on 3.10 is asyncio.TimeoutError.
    script = textwrap.dedent("""
        import asyncio, sys
        from serving.batcher import Batcher

        async def main():
            batcher = Batcher(lambda xs: [x.upper() for x in xs], max_batch_size=8, max_wait_ms=20)
            await batcher.start()
            for word in ("one", "two", "three"):
                answers = await asyncio.wait_for(batcher.submit([word]), 5)
                assert answers == [word.upper()], answers
            await batcher.stop()
            print("ok", sys.version_info[:2])

        asyncio.run(main())
    """)
    out = subprocess.run([exe, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok (3, 10)")


def test_dead_batcher_fails_its_requests_and_turns_readiness_off(onnx_model, faulty):
    with serve_in_thread(onnx_model, config(max_wait_ms=200), runtime=faulty) as url:
        faulty.released.clear()
        faulty.crash = True
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(predict(url, f"text {i}"))) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(faulty.calls) >= 3)  # warm-up (2 calls) + the held batch
        time.sleep(0.1)
        faulty.released.set()  # the model thread now raises Crash, which kills the batcher task
        for t in threads:
            t.join(20)
        assert sorted(r.status_code for r in results) == [503] * 3, [r.text for r in results]
        assert all(r.json()["error_type"] == "unavailable" for r in results)
        # Later requests are refused at once, and the orchestrator is told to stop routing here.
        assert predict(url, "later").status_code == 503
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and "batcher" in r.json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 200


# ---- item 3: deadlines, progress, one bad item, pairs ----------------------------------------------

def test_request_deadline_and_stalled_batcher(onnx_model, faulty):
    with serve_in_thread(onnx_model, config(request_timeout_s=1.0), runtime=faulty) as url:
        faulty.released.clear()  # the model hangs
        start = time.monotonic()
        r = predict(url, "never answered")
        assert r.status_code == 504 and r.json()["error_type"] == "timeout", r.text
        assert time.monotonic() - start < 5
        # A batch running for longer than the deadline: the batcher makes no progress, not ready.
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, 5)
        assert "progress" in httpx.get(f"{url}/readyz").json()["error"]
        faulty.released.set()
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 5)
        assert predict(url, "answered again").status_code == 200


def test_one_failing_item_does_not_fail_its_batch(onnx_model, faulty):
    faulty.poison = True
    with serve_in_thread(onnx_model, config(max_wait_ms=300, max_batch_size=16), runtime=faulty) as url:
        async def together():
            async with httpx.AsyncClient(timeout=15) as client:
                return await asyncio.gather(*[client.post(f"{url}/predict", json={"inputs": t})
                                              for t in ("a fine film", "poison", "dull", "poison pill")])

        fine, bad, dull, bad2 = asyncio.run(together())
        assert max(faulty.calls) >= 4  # they did share a batch
        assert fine.status_code == 200 and dull.status_code == 200
        assert bad.status_code == 500 and bad.json()["error_type"] == "model_error"
        assert bad2.status_code == 500
        assert predict(url, "still fine").status_code == 200


def export_onnx_without_token_types(model_dir: Path, out: Path) -> Path:
    """A classifier whose ONNX graph takes only input_ids and attention_mask (as DistilBERT's does)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(model_dir).eval()

    class NoTypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    out.mkdir(parents=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(NoTypes().eval(), (ids, torch.ones_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_pairs_refused_by_models_without_token_types(tmp_path, tiny_bert):
    onnx = export_onnx_without_token_types(tiny_bert, tmp_path / "no-types")
    with serve_in_thread(onnx, config()) as url:
        assert predict(url, "a single text is fine").status_code == 200
        r = predict(url, [["a pair", "is not"]])
        assert r.status_code == 422 and "pair" in r.json()["error"], r.text
        assert httpx.get(f"{url}/info").json()["accepts_pairs"] is False
    # A PyTorch model with a single token type: pair inputs (type id 1) used to index past its table.
    one_type = make_tiny_bert(tmp_path / "one-type")
    cfg = json.loads((one_type / "config.json").read_text())
    (one_type / "config.json").write_text(json.dumps({**cfg, "type_vocab_size": 1}))
    from transformers import BertForSequenceClassification

    import torch
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(one_type, ignore_mismatched_sizes=True).save_pretrained(one_type)
    with serve_in_thread(one_type, config(num_threads=None)) as url:
        assert predict(url, "single").status_code == 200
        r = predict(url, [["first", "second"]])
        assert r.status_code == 422, r.text


# ---- item 6: HTTP edges ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(onnx_model):
    with serve_in_thread(onnx_model, config(max_inputs_per_request=8, request_timeout_s=2)) as url:
        yield url


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_predict_wants_json(server, content_type):
    r = httpx.post(f"{server}/predict", content=b'{"inputs": "hi"}', headers={"Content-Type": content_type})
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type", r.text
    for ok in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        r = httpx.post(f"{server}/predict", content=b'{"inputs": "hi"}', headers={"Content-Type": ok})
        assert r.status_code == 200, (ok, r.text)


def test_api_key_guards_everything_but_the_probes(onnx_model):
    with serve_in_thread(onnx_model, config(api_key="s3cret")) as url:
        for path in ("/healthz", "/readyz"):
            assert httpx.get(f"{url}{path}").status_code == 200
        for path in ("/info", "/docs", "/openapi.json", "/metrics", "/redoc", "/docs/oauth2-redirect"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", path
            assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/info", headers=ok).json()["config"]["api_key"] is True
        assert httpx.get(f"{url}/openapi.json", headers=ok).status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


@pytest.mark.parametrize("body", [
    {"inputs": [1] * 100_000},
    {"inputs": [["a"]] * 60_000},
    {"inputs": ["ok"] * 9},
    {"inputs": [["a", "b"]] * 9},
])
def test_long_lists_refused_before_validation(server, body):
    r = httpx.post(f"{server}/predict", content=json.dumps(body).encode(), timeout=15,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit 8" in r.json()["error"], r.text


def test_only_the_first_validation_error_is_reported(server):
    r = predict(server, [1, 2, 3, 4])
    assert r.status_code == 422
    assert r.json()["error"].count(":") <= 2 and "inputs" in r.json()["error"]
    r = predict(server, "x" * 200_001)
    assert r.status_code == 413


def test_schema_states_its_limits(server):
    schema = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]["PredictRequest"]
    text = json.dumps(schema)
    assert '"maxItems": 8' in text and '"maxLength": 100000' in text


def _connect(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_slow_body_is_cut_off(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        start = time.monotonic()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < 6
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_connection_limit_and_keep_alive_timeout(onnx_model):
    with serve_in_thread(onnx_model, config(limit_concurrency=3, timeout_keep_alive_s=1)) as url:
        idle = [_connect(url) for _ in range(3)]
        try:
            time.sleep(0.2)
            r = httpx.get(f"{url}/healthz")
            assert r.status_code == 503  # uvicorn refuses past limit_concurrency
        finally:
            for s in idle[:2]:
                s.close()
        # An idle keep-alive connection is closed after timeout_keep_alive_s.
        with _connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.settimeout(5)
            start = time.monotonic()
            assert sock.recv(65536) == b""  # closed by the server
            assert time.monotonic() - start < 4
        idle[2].close()


def test_onnx_file_must_stay_inside_the_artifact(tmp_path, onnx_model):
    outside = tmp_path / "evil.onnx"
    outside.write_bytes((onnx_model / "model.onnx").read_bytes())
    for bad in ("../evil.onnx", str(outside), "sub/../../evil.onnx", "sub/model.onnx"):
        folder = tmp_path / "artifact"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(onnx_model, folder)
        (folder / "bertforge.json").write_text(json.dumps(
            {"stage": "export", "format": "onnx", "params": {"onnx_file": bad}}))
        with pytest.raises(BertforgeError, match="onnx_file .* is not a file in that folder"):
            build_server(folder, config())


# ---- item 7: threads follow the container's CPU quota ----------------------------------------------

def test_cpu_quota_from_cgroup_files(tmp_path):
    from serving.config import cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == 2  # 1.5 CPUs rounds up: a half core still runs a thread
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(v2) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 4
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("garbage\n")
    assert cpu_quota(v1) is None
    assert cpu_quota(tmp_path / "missing") is None


def test_default_threads_follow_the_quota(tmp_path, monkeypatch):
    from serving.config import default_threads

    v2 = tmp_path / "cg"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert default_threads(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    import os
    assert default_threads(v2) == len(os.sched_getaffinity(0))
    assert ServeConfig(port=0).resolved_threads() >= 1
    assert ServeConfig(port=0, num_threads=3).resolved_threads() == 3


def test_new_settings_are_validated():
    for bad in ({"request_timeout_s": 0}, {"limit_concurrency": 0}, {"timeout_keep_alive_s": -1}, {"max_text_chars": 0}):
        with pytest.raises(BertforgeError, match="must be positive"):
            ServeConfig(**bad)
    assert ServeConfig(limit_concurrency=None).limit_concurrency is None
