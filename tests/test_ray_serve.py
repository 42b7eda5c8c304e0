"""`bertforge serve --engine ray`: two Ray Serve replicas on loopback answer as the plain server does."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import export_tiny_onnx

from serving.config import ServeConfig
from serving.server import serve_in_thread

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install bertforge[ray])")

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, funny film", "dull and far too long", "it rains"]


def answers(url: str, name: str) -> dict:
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    return {
        "native": httpx.post(f"{url}/v1/predict", json={"inputs": TEXTS}, timeout=60).json()["predictions"],
        "tei": httpx.post(f"{url}/", json={"inputs": [[t] for t in TEXTS]}, timeout=60).json(),
        "v2": httpx.post(f"{url}/v2/models/{name}/infer", json=v2, timeout=60).json()["outputs"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ray_replicas_answer_like_the_plain_server(tiny_bert, tmp_path):
    model = export_tiny_onnx(tiny_bert, tmp_path / "sst2-tiny")
    with serve_in_thread(model, ServeConfig(port=0, num_threads=1, log_level="warning")) as url:
        expected = answers(url, model.name)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(model), "--engine", "ray",
                             "--replicas", "2", "--threads", "1", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    ray_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a Ray cluster takes a minute to start on a busy 2-core machine
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{ray_url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Ray Serve not ready after 300 s"
            time.sleep(2)
        for line in proc.stdout:  # the driver prints Ray's count once the deployment is up
            if line.startswith("replicas running:"):
                assert int(line.split(":")[1]) == 2
                break
        # the same answers through every protocol, whichever replica takes each request
        for _ in range(3):
            got = answers(ray_url, model.name)
            assert [g["label"] for g in got["native"]] == [e["label"] for e in expected["native"]]
            for g, e in zip(got["native"], expected["native"]):
                assert g["scores"] == pytest.approx(e["scores"], abs=1e-6)
            assert [[p["label"] for p in g] for g in got["tei"]] == [[p["label"] for p in e] for e in expected["tei"]]
            assert got["v2"][0] == expected["v2"][0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
