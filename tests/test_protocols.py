"""Standard clients against `bertforge serve` on loopback: Hugging Face's InferenceClient (TEI / Inference
API format), tritonclient.http (Open Inference Protocol), and the torch-free serving path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import export_tiny_onnx

from serving.config import ServeConfig
from serving.server import serve_in_thread

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, funny film", "dull and far too long", "it rains"]
PAIRS = [("A man plays the guitar.", "Someone plays music."), ("The cat sleeps.", "A dog barks loudly.")]


@pytest.fixture(scope="module")
def onnx_model(request, tmp_path_factory):
    """A tiny ONNX artifact; $BERTFORGE_TEST_ONNX names a prebuilt one (the slim serving install has no
    torch to build it: CI exports it in the full environment first)."""
    out = tmp_path_factory.mktemp("protocols") / "sst2-tiny"
    if os.environ.get("BERTFORGE_TEST_ONNX"):
        return Path(shutil.copytree(os.environ["BERTFORGE_TEST_ONNX"], out))
    return export_tiny_onnx(request.getfixturevalue("tiny_bert"), out)


@pytest.fixture(scope="module")
def server(onnx_model):
    config = ServeConfig(port=0, num_threads=1, log_level="warning", graceful_timeout_s=5, max_inputs_per_request=8,
                         max_tokens=16)
    with serve_in_thread(onnx_model, config) as url:
        yield url


def native(url, inputs) -> list[dict]:
    r = httpx.post(f"{url}/v1/predict", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def post(url, body, path="/"):
    return httpx.post(f"{url}{path}", json=body, timeout=30)


@pytest.fixture
def hub_client_on_loopback(monkeypatch):
    """huggingface_hub refuses every URL, loopback included, when HF_HUB_OFFLINE is set (as in the test
    environment): let its session reach this server only for the test."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if hasattr(constants, "is_offline_mode"):  # huggingface_hub >= 1.0 asks on every request
        monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    reset = getattr(_http, "reset_sessions", lambda: None)  # < 1.0 mounts the offline adapter per session
    reset()
    yield
    monkeypatch.undo()
    reset()


def test_hugging_face_inference_client(server, hub_client_on_loopback):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server)
    for text in TEXTS:
        expected = native(server, text)[0]
        got = client.text_classification(text)
        assert [g.label for g in got] == sorted(expected["scores"], key=expected["scores"].get, reverse=True)
        assert [g.score for g in got] == pytest.approx([expected["scores"][g.label] for g in got], abs=1e-6)
        top = client.text_classification(text, top_k=1)
        assert len(top) == 1 and top[0].label == expected["label"]
        raw = client.text_classification(text, function_to_apply="none")
        logits = np.array([r.score for r in raw])
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert probs.tolist() == pytest.approx([expected["scores"][r.label] for r in raw], abs=1e-5)
        sig = client.text_classification(text, function_to_apply="sigmoid")
        assert [s.score for s in sig] == pytest.approx((1 / (1 + np.exp(-logits))).tolist(), abs=1e-5)


def test_tei_request_and_response_shapes(server):
    one = post(server, {"inputs": TEXTS[0]}).json()
    assert [p["label"] for p in one] and list(one[0]) == ["score", "label"]
    assert [p["score"] for p in one] == sorted((p["score"] for p in one), reverse=True)
    expected = native(server, TEXTS[0])[0]
    assert {p["label"]: p["score"] for p in one} == pytest.approx(expected["scores"], abs=1e-6)
    # TEI: [a, b] is ONE pair; a batch is [[a], [a, b]]
    pair = post(server, {"inputs": list(PAIRS[0])}).json()
    assert {p["label"]: p["score"] for p in pair} == pytest.approx(native(server, [list(PAIRS[0])])[0]["scores"], abs=1e-6)
    batch = post(server, {"inputs": [[TEXTS[1]], list(PAIRS[1])]}).json()
    assert len(batch) == 2 and all(isinstance(b, list) for b in batch)
    want = native(server, [TEXTS[1]])[0]["scores"], native(server, [list(PAIRS[1])])[0]["scores"]
    for got, w in zip(batch, want):
        assert {p["label"]: p["score"] for p in got} == pytest.approx(w, abs=1e-6)
    raw = post(server, {"inputs": TEXTS[0], "raw_scores": True}).json()
    z = np.array([p["score"] for p in raw])
    assert (np.exp(z) / np.exp(z).sum()).tolist() == pytest.approx([expected["scores"][p["label"]] for p in raw], abs=1e-5)
    # /predict speaks TEI when the body has a TEI field, bertforge's own answer otherwise
    via_predict = post(server, {"inputs": TEXTS[0], "raw_scores": False}, "/predict").json()
    assert [p["label"] for p in via_predict] == [p["label"] for p in one]
    assert "predictions" in post(server, {"inputs": TEXTS[0]}, "/predict").json()


def test_tei_truncation_and_bad_bodies(server):
    long = "word " * 200  # far past max_tokens=16
    assert post(server, {"inputs": long, "truncate": True}).status_code == 200
    assert post(server, {"inputs": long}).status_code == 200  # the server's --on-long-input (truncate)
    refused = post(server, {"inputs": long, "truncate": False})
    assert refused.status_code == 413 and "truncate" in refused.json()["error"]
    assert post(server, {"inputs": TEXTS[0], "truncate": False}).status_code == 200
    for body in ({"inputs": ["a", "b", "c"]}, {"inputs": [1]}, {"inputs": []}, {"inputs": [["a"], "b"]},
                 {"inputs": "x", "parameters": {"top_k": 0}}, {"inputs": "x", "parameters": {"function_to_apply": "relu"}},
                 {"inputs": "x", "truncation_direction": "left"}, {"inputs": "x", "other": 1}, {"inputs": " "},
                 {"inputs": [["a", "b", "c"]]}, {"inputs": {"text": 3}, "parameters": {}}):
        r = post(server, body)
        assert r.status_code == 422 and r.json()["error"], (body, r.text)
    assert post(server, {"inputs": [[t] for t in TEXTS * 3]}).status_code == 413  # 9 inputs, limit 8


def test_hugging_face_pipeline_style_batches_and_pairs(server):
    got = post(server, {"inputs": TEXTS[:2], "parameters": {}}).json()
    assert len(got) == 2 and all(isinstance(g, list) for g in got)  # a list of texts is a batch here
    pair = post(server, {"inputs": {"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}, "parameters": {"top_k": 1}}).json()
    assert pair[0][0]["label"] == native(server, [list(PAIRS[0])])[0]["label"]


def text(values) -> list[str]:
    """BYTES outputs: tritonclient gives str for JSON tensors, bytes for binary ones."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def test_triton_client_json_and_binary_tensors(server, onnx_model):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    name = onnx_model.name  # the artifact folder's name
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and [i["name"] for i in meta["inputs"]] == ["text", "text_pair"]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"label": "BYTES", "scores": "FP32", "logits": "FP32"}
    labels = meta["parameters"]["labels"]

    expected = native(server, TEXTS)
    for binary in (False, True):  # JSON tensors, then tritonclient's default binary tensor extension
        texts = triton.InferInput("text", [len(TEXTS)], "BYTES")
        texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object), binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "scores")] if not binary else None
        result = client.infer(name, [texts], outputs=outputs, request_id="r1")
        assert text(result.as_numpy("label")) == [e["label"] for e in expected]
        scores = result.as_numpy("scores")
        assert scores.shape == (len(TEXTS), len(labels)) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, [[e["scores"][lab] for lab in labels] for e in expected], atol=1e-6)
        if binary:
            assert result.as_numpy("logits").shape == scores.shape
    # a text_pair input makes pairs
    first = triton.InferInput("text", [2, 1], "BYTES")
    first.set_data_from_numpy(np.array([[p[0]] for p in PAIRS], dtype=object), binary_data=False)
    second = triton.InferInput("text_pair", [2, 1], "BYTES")
    second.set_data_from_numpy(np.array([[p[1]] for p in PAIRS], dtype=object), binary_data=False)
    result = client.infer(name, [first, second], outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    assert text(result.as_numpy("label")) == [p["label"] for p in native(server, [list(p) for p in PAIRS])]
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("other", [first])


def test_open_inference_protocol_errors_are_4xx_json(server, onnx_model):
    url = f"{server}/v2/models/{onnx_model.name}/infer"
    ok = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]}
    r = httpx.post(url, json=ok, timeout=30)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label", "scores", "logits"]
    assert httpx.post(url.replace("/infer", "/versions/1/infer"), json=ok, timeout=30).status_code == 200
    assert httpx.post(url.replace("/infer", "/versions/2/infer"), json=ok, timeout=30).status_code == 404
    bad = [{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
           {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["one"]}]},
           {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
           {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}]},
           {"inputs": [{"name": "text_pair", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
           {**ok, "outputs": [{"name": "embedding"}]}, {"inputs": "text"}, []]
    for body in bad:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"], (body, r.text)
    r = httpx.post(url, content=b'{"inputs": []}xx', headers={"Inference-Header-Content-Length": "99"}, timeout=30)
    assert r.status_code == 400


def test_model_name_flag(onnx_model):
    import tritonclient.http as triton

    config = ServeConfig(port=0, num_threads=1, log_level="warning", graceful_timeout_s=5, model_name="sentiment")
    with serve_in_thread(onnx_model, config) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_model_ready("sentiment") and not client.is_model_ready(onnx_model.name)


# Serving an ONNX artifact with torch absent: a child process whose sys.path holds the site-packages
# minus torch (a folder of links), so `import torch` fails there as in a `bertforge[serve]` install.
SLIM_CHILD = r"""
import json, sys, urllib.request
import importlib.util
assert importlib.util.find_spec("torch") is None, "torch is importable: the blocker failed"
from pipeline.cli import build_parser
assert "needs `pip install bertforge[all]`" in build_parser().format_help()  # the other commands say what they lack
args = build_parser("serve").parse_args(["serve", "--model", sys.argv[1], "--port", "0", "--threads", "1"])
from serving.config import ServeConfig
from serving.server import serve_in_thread
with serve_in_thread(args.model, ServeConfig(port=0, num_threads=1, log_level="warning")) as url:
    def post(path, body):
        req = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=30))
    out = {"native": post("/v1/predict", {"inputs": ["a gripping film"]})["predictions"][0]["scores"],
           "tei": post("/", {"inputs": "a gripping film"}),
           "v2": post("/v2/models/" + args.model.rstrip("/").split("/")[-1] + "/infer",
                      {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a gripping film"]}]})}
assert "torch" not in sys.modules and "transformers" not in sys.modules, "serving imported torch or transformers"
print(json.dumps(out))
"""


def site_packages_without(names: tuple[str, ...], into: Path) -> Path:
    """`into` filled with links to every entry of this interpreter's site-packages except those named."""
    import site

    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if not entry.name.lower().startswith(names) and not (into / entry.name).exists():
                (into / entry.name).symlink_to(entry)
    return into


def test_onnx_serving_never_imports_torch(onnx_model, server):
    with tempfile.TemporaryDirectory() as tmp:
        site = site_packages_without(("torch", "functorch", "transformers"), Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]), "HF_HUB_OFFLINE": "1"}
        # -S: no site-packages of its own, only the filtered view on PYTHONPATH
        done = subprocess.run([sys.executable, "-S", "-c", SLIM_CHILD, str(onnx_model)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # the same answers as the full install's server
    assert out["native"] == pytest.approx(native(server, ["a gripping film"])[0]["scores"], abs=1e-6)
    assert out["tei"] == post(server, {"inputs": "a gripping film"}).json()
    assert out["v2"]["outputs"][0]["data"] == [native(server, ["a gripping film"])[0]["label"]]


def test_full_install_serves_onnx_without_importing_torch(onnx_model):
    """With torch installed, `bertforge serve` on an ONNX artifact still leaves it unimported (cold start
    and memory): the CLI imports only the command it runs, the app only the ONNX runtime."""
    child = ("import sys; from pipeline.cli import build_parser; "
             "build_parser('serve').parse_args(['serve', '--model', sys.argv[1]]); "
             "from serving.app import create_app; from serving.config import ServeConfig; "
             "create_app(sys.argv[1], ServeConfig(num_threads=1)); "
             "assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", child, str(onnx_model)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
