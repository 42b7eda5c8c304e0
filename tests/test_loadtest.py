"""`bertforge loadtest`: real Locust runs (subprocess) against real servers on loopback: `bertforge serve`
and small endpoints written here that speak TEI, the Open Inference Protocol v2 and a custom JSON shape."""
from __future__ import annotations

import asyncio
import json
import urllib.request
import threading
import time
from contextlib import contextmanager

import pytest
from fastapi import FastAPI, Request
from serving_helpers import export_tiny_onnx

from pipeline.cli import main
from pipeline.errors import BertforgeError
from pipeline.report_serving import load_sweeps, markdown_table, plot_p99, serving_section, serving_table
from serving.config import ServeConfig
from serving.loadtest import (LabelCheck, find_knee, label_index, load_examples, make_endpoint, parse_duration,
                              read_locust_stats, run_loadtest, run_sweep)
from serving.loadtest_protocols import Malformed, Protocol, extract, parse_field
from serving.server import bind, serve_in_thread

SLEEP_S = 0.025  # the slow endpoint serialises requests behind this sleep: capacity ~ 1 / SLEEP_S = 40/s


@pytest.fixture(scope="module")
def server(tiny_bert, tmp_path_factory):
    model = export_tiny_onnx(tiny_bert, tmp_path_factory.mktemp("loadtest") / "onnx")
    config = ServeConfig(port=0, num_threads=1, max_wait_ms=2, log_level="warning", graceful_timeout_s=5)
    with serve_in_thread(model, config) as url:
        yield url


@contextmanager
def serve_app(app):
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def oracle_app():
    """An endpoint that knows SST-2 dev's gold labels, in several protocols; `/wrong/...` answers 200 with
    the opposite label, `/broken/...` leaves the label out of every other answer, `/slow/predict` answers
    one request at a time behind a fixed sleep."""
    names = ["negative", "positive"]
    gold = {a: label for a, _, label in load_examples("sst2")}
    app = FastAPI()
    lock = asyncio.Lock()
    calls = {"n": 0}

    def scored(text, flip=False):
        k = gold.get(text, 0) ^ flip
        return sorted([{"label": names[k], "score": 0.9}, {"label": names[1 - k], "score": 0.1}],
                      key=lambda s: -s["score"])

    @app.get("/health")
    async def health():
        return {}

    @app.post("/predict")
    async def tei(request: Request):
        inputs = (await request.json())["inputs"]
        return scored(inputs) if isinstance(inputs, str) else [scored(x[0]) for x in inputs]

    @app.post("/slow/predict")
    async def slow(request: Request):
        inputs = (await request.json())["inputs"]
        async with lock:
            await asyncio.sleep(SLEEP_S)
        return scored(inputs)

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2/models/oracle")
    async def metadata():
        return {"name": "oracle", "versions": ["1"], "platform": "test",
                "inputs": [{"name": "sentence", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
                "parameters": {"labels": names}}

    @app.post("/v2/models/oracle/infer")
    async def infer(request: Request):
        tensor = (await request.json())["inputs"][0]
        assert tensor["name"] == "sentence" and tensor["datatype"] == "BYTES"
        ks = [gold.get(t, 0) for t in tensor["data"]]
        n = len(ks)
        return {"model_name": "oracle", "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [n], "data": [names[k] for k in ks]},
            {"name": "probs", "datatype": "FP32", "shape": [n, 2], "data": [p for k in ks for p in ((0.2, 0.8) if k else (0.8, 0.2))]}]}

    @app.post("/{kind}/classify")
    async def custom(kind: str, request: Request):
        body = await request.json()
        calls["n"] += 1
        out = []
        for item in body["instances"]:
            k = gold.get(item["sentence"], 0) ^ (kind == "wrong")
            out.append({} if kind == "broken" and calls["n"] % 2 else {"class": names[k]})
        return {"results": out}

    return app


@pytest.fixture(scope="module")
def oracle():
    with serve_app(oracle_app()) as url:
        yield url


# -- against `bertforge serve` ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_closed_loop_run_through_the_cli(server, tmp_path, capsys):
    out = tmp_path / "lt"
    code = main(["loadtest", "--host", server, "--users", "3", "--spawn-rate", "3", "--duration", "4s", "--out", str(out)])
    assert code == 0, (out / "locust.log").read_text()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(capsys.readouterr().out) | {"command": summary["command"]}
    assert summary["requests"] > 10 and summary["failures"] == 0
    assert summary["failure_kinds"] == {"http": 0, "connection": 0, "malformed": 0, "not_sent": 0, "other": 0}
    assert summary["requests_per_s"] > 0 and 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    # The server saw the same traffic and batched it.
    assert summary["server"]["model_calls"] >= 1 and summary["server"]["mean_batch_size"] >= 1
    assert (out / "locust_stats.csv").is_file() and (out / "locust_report.html").is_file()
    assert read_locust_stats(out / "locust")["requests"] == summary["requests"]


@pytest.mark.slow
def test_served_labels_match_offline_predictions_under_batching(server, tmp_path, capsys):
    """Several users, several inputs per request, a batching server: every label must be the one the
    artifact gives that text alone (the artifact is found through the server's /info)."""
    out = tmp_path / "lt"
    code = main(["loadtest", "--host", server, "--users", "4", "--spawn-rate", "4", "--duration", "5s", "--batch", "4",
                 "--out", str(out), "--check-labels"])
    summary = json.loads((out / "summary.json").read_text())
    labels = summary["labels"]
    assert code == 0, labels
    assert summary["server"]["mean_batch_size"] > 1  # answers really were computed in mixed batches
    assert labels["answers"] > 100 and labels["disagreements"] == 0 and labels["ok"]
    assert labels["texts"] == 872 and labels["texts_answered"] > 50
    assert 0 <= labels["served_accuracy"] <= 1 and labels["offline_accuracy"] is not None


@pytest.mark.slow
def test_fixed_rate_pairs_from_a_glue_task(server, tmp_path, glue_dir):
    summary = run_loadtest(server, users=2, spawn_rate=2, duration="4s", out_dir=tmp_path, mode="fixed-rate",
                           rate=20, task="mrpc", glue_dir=glue_dir, batch=2)
    assert summary["failures"] == 0, summary["errors"]
    # Open loop: the rate is the schedule's, whatever the latency (reset after ramp-up).
    assert 10 <= summary["requests_per_s"] <= 30
    assert summary["inputs_per_request"] == 2 and summary["server"]["mean_batch_size"] >= 1
    first = (tmp_path / "texts.tsv").read_text().splitlines()[1].split("\t")
    assert len(first) == 3 and all(first)  # MRPC: sentence pairs and their gold label


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["tei", "oip"])
def test_bertforge_servers_tei_and_v2_routes_answer_like_the_artifact(server, tmp_path, protocol):
    """bertforge's own TEI and Open Inference Protocol routes under load: every label checked against the
    artifact's offline answer (found through /info) and the gold label."""
    out = tmp_path / protocol
    name = ["--model-name", "onnx"] if protocol == "oip" else []  # the default model name: the folder's
    artifact = json.loads(urllib.request.urlopen(f"{server}/info").read())["model"]  # for the offline answers
    code = main(["loadtest", "--host", server, "--protocol", protocol, *name, "--users", "2", "--duration", "3s",
                 "--batch", "2", "--out", str(out), "--check-labels", "--model", artifact])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0, summary["errors"]
    assert summary["requests"] > 10 and summary["labels"]["answers"] > 10
    # fp32 ONNX: batching never changes an answer, so any disagreement is a protocol bug
    assert summary["labels"]["disagreements"] == 0 and summary["labels"]["ok"] and code == 0, summary["labels"]


# -- other protocols, against the endpoints above --------------------------------------------------------------------

@pytest.mark.slow
def test_tei_answers_checked_against_gold(oracle, tmp_path):
    out = tmp_path / "tei"
    code = main(["loadtest", "--host", oracle, "--protocol", "tei", "--users", "2", "--duration", "3s", "--batch", "2",
                 "--out", str(out), "--check-labels", "--expected-accuracy", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["failures"] == 0 and summary["requests"] > 10
    assert summary["labels"]["served_accuracy"] == 1.0 and summary["labels"]["ok"]


@pytest.mark.slow
def test_oip_reads_input_names_and_class_names_from_metadata(oracle, tmp_path):
    endpoint = make_endpoint("oip", model_name="oracle", output_name="probs")  # scores: the labels come from metadata
    from serving.loadtest import prepare_check

    rows = load_examples("sst2")
    check = prepare_check(oracle, "sst2", rows, endpoint, expected_accuracy=1.0)
    summary = run_loadtest(oracle, users=2, spawn_rate=2, duration="3s", out_dir=tmp_path, endpoint=endpoint,
                           label_check=check, rows=rows, batch=3)
    assert json.loads((tmp_path / "endpoint.json").read_text())["input_names"] == ["sentence"]
    assert summary["failures"] == 0, summary["errors"]
    assert summary["path"] == "/v2/models/oracle/infer" and summary["labels"]["served_accuracy"] == 1.0


@pytest.mark.slow
def test_template_endpoint_and_a_wrong_one_caught_by_check_labels(oracle, tmp_path):
    template = tmp_path / "body.json"
    template.write_text(json.dumps({"instances": [{"sentence": "{{text}}"}], "meta": {"client": "bf {{text}}"}}))
    args = ["loadtest", "--host", oracle, "--protocol", "template", "--request-template", str(template),
            "--label-field", "$.results[*].class", "--header", "X-Team: nlp", "--users", "2", "--duration", "3s",
            "--check-labels", "--expected-accuracy", "1"]
    assert main([*args, "--path", "/right/classify", "--out", str(tmp_path / "right")]) == 0
    right = json.loads((tmp_path / "right" / "summary.json").read_text())
    assert right["failures"] == 0 and right["labels"]["served_accuracy"] == 1.0
    # Right status, wrong labels: no HTTP failure, but the check fails the run.
    assert main([*args, "--path", "/wrong/classify", "--out", str(tmp_path / "wrong")]) == 1
    wrong = json.loads((tmp_path / "wrong" / "summary.json").read_text())
    assert wrong["failures"] == 0 and wrong["labels"]["served_accuracy"] == 0.0 and not wrong["labels"]["ok"]


@pytest.mark.slow
def test_malformed_answers_are_failures_of_their_own_kind(oracle, tmp_path):
    template = tmp_path / "body.json"
    template.write_text(json.dumps({"instances": [{"sentence": "{{text}}"}]}))
    endpoint = make_endpoint("template", "/broken/classify", (), template, "results[0].class")
    summary = run_loadtest(oracle, users=2, spawn_rate=2, duration="3s", out_dir=tmp_path, endpoint=endpoint)
    kinds = summary["failure_kinds"]
    assert kinds["malformed"] > 0 and kinds["http"] == 0 and kinds["malformed"] == summary["failures"]
    assert 0.3 < summary["failure_ratio"] < 0.7  # every other answer lacks its label


@pytest.mark.slow
def test_sweep_finds_the_knee_of_a_server_with_known_capacity(oracle, tmp_path):
    endpoint = make_endpoint("tei", path="/slow/predict", ready_path="/health")
    sweep = run_sweep(oracle, tmp_path, slo_ms=250, fractions=(0.25, 0.5, 0.75, 1.3, 1.8), step_duration="5s",
                      estimate_users=4, estimate_duration="4s", step_users=2, endpoint=endpoint)
    capacity = 1 / SLEEP_S
    assert 0.5 * capacity < sweep["estimate"]["requests_per_s"] <= 1.05 * capacity
    knee = sweep["knee"]
    assert knee is not None and sweep["rps_at_slo"] == knee["achieved_rps"]
    assert 0.2 * capacity <= knee["offered_rps"] <= capacity
    # Past capacity the queue grows without bound: the open-loop p99 leaves the SLO.
    over = [s for s in sweep["steps"] if s["offered_rps"] > 1.2 * capacity]
    assert over and all(s["p99_ms"] > 250 for s in over)
    assert json.loads((tmp_path / "sweep.json").read_text()) == sweep

    # The report's serving section: one row per endpoint, and p99 against the offered rate.
    endpoints = load_sweeps([tmp_path])
    table = serving_table(endpoints)
    row = dict(zip(table["columns"], table["rows"][0]))
    assert row["req/s at SLO"] == knee["achieved_rps"] and row["p99 ms"] == knee["p99_ms"] <= 250
    assert row["failures"] == sum(s["failures"] for s in sweep["steps"]) and row["protocol"] == "tei"
    svg = plot_p99(endpoints, tmp_path / "p99.png")
    assert svg.startswith("<?xml") and "SLO p99 250 ms" in svg and (tmp_path / "p99.png").stat().st_size > 1000
    assert markdown_table(table).count("\n") == 2


# -- the pieces, without Locust ---------------------------------------------------------------------------------------

def test_plot_survives_a_sweep_without_one_successful_request():
    # on an overloaded machine every request of a short sweep can fail: no p99 anywhere
    failed = {"name": "int8", "slo_ms": 50, "knee": None,
              "steps": [{"offered_rps": 10, "p99_ms": None}, {"offered_rps": 20, "p99_ms": 0}]}
    svg = plot_p99([failed])
    assert svg.startswith("<?xml") and "no step had a successful request" in svg


def test_label_field_subset():
    answer = {"outputs": [{"data": ["a", "b"]}], "x y": [[{"label": "p"}]]}
    assert extract(answer, parse_field("outputs[0].data[*]")) == ["a", "b"]
    assert extract(answer, parse_field("$['x y'][0][0].label")) == ["p"]
    assert extract([{"label": "n"}], parse_field("$[0].label")) == ["n"]
    with pytest.raises(Malformed):
        extract(answer, parse_field("outputs[3].data"))
    with pytest.raises(ValueError, match="label field"):
        parse_field("outputs[0]..data")


def test_protocol_answers_parsed_and_malformed_ones_refused():
    tei = Protocol({"protocol": "tei"})
    assert tei.body(["a", ["b", "c"]]) == {"inputs": [["a"], ["b", "c"]], "raw_scores": False}
    assert tei.labels_of([{"label": "x", "score": 0.2}, {"label": "y", "score": 0.8}], 1) == ["y"]
    assert tei.labels_of([[{"label": "x", "score": 0.9}]], 1) == ["x"]  # Hugging Face's wrapped single answer
    for bad in ({"error": "x"}, [], [[{"label": "x", "score": 1}]] * 2, [{"label": "x"}]):
        with pytest.raises(Malformed):
            tei.labels_of(bad, 1)
    native = Protocol({})
    assert native.labels_of({"predictions": [{"label": "a"}, {"label": "b"}]}, 2) == ["a", "b"]
    with pytest.raises(Malformed):
        native.labels_of({"predictions": [{"label": "a"}]}, 2)
    oip = Protocol({"protocol": "oip", "input_names": ["text", "text_pair"], "labels": ["n", "p"]})
    assert oip.body([["a", "b"]])["inputs"][1] == {"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["b"]}
    scores = {"outputs": [{"name": "scores", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.7, 0.3]}]}
    assert oip.labels_of(scores, 2) == ["p", "n"]
    with pytest.raises(Malformed):
        oip.labels_of(scores, 3)
    template = Protocol({"protocol": "template", "template": {"q": "{{text}}", "p": "{{text_pair}}", "all": "{{texts}}"},
                         "label_field": "a"})
    assert template.body([["x", "y"]]) == {"q": "x", "p": "y", "all": [["x", "y"]]}


def test_label_check_and_knee():
    check = LabelCheck(["negative", "positive"], gold=[0, 1, 1, 0], offline=[0, 1, 0, 0], expected_accuracy=0.9)
    r = check.check({"0": {"negative": 3}, "1": {"LABEL_1": 1, "negative": 1}, "2": {"0": 2}, "3": {"maybe": 1}})
    assert r["texts_answered"] == 3 and r["unreadable_labels"] == 1 and r["texts_answered_differently"] == 1
    assert r["served_accuracy"] == round((1 + 0.5 + 0) / 3, 4)
    assert r["disagreements"] == 1 and not r["ok"]  # text 1 answered "negative" once; the artifact says positive
    assert label_index("positive", ["negative", "positive"]) == 1 and label_index("LABEL_7", ["a", "b"]) is None
    steps = [{"offered_rps": r, "achieved_rps": a, "p99_ms": p, "failures": f}
             for r, a, p, f in [(10, 10, 20, 0), (20, 20, 60, 0), (30, 29, 90, 2), (40, 31, 80, 0), (50, 30, 900, 0)]]
    assert find_knee(steps, 100)["offered_rps"] == 20  # 30: failures; 40: fell behind its rate
    assert find_knee(steps, 10) is None


def test_bad_arguments(tmp_path):
    assert parse_duration("90") == 90 and parse_duration("1m30s") == 90 and parse_duration("2h") == 7200
    with pytest.raises(BertforgeError, match="duration"):
        parse_duration("soon")
    with pytest.raises(BertforgeError, match="--rate"):
        run_loadtest("http://127.0.0.1:9", mode="fixed-rate", out_dir=tmp_path)
    with pytest.raises(BertforgeError, match="URL"):
        run_loadtest("127.0.0.1:9", out_dir=tmp_path)
    with pytest.raises(BertforgeError, match="not ready"):
        run_loadtest("http://127.0.0.1:9", out_dir=tmp_path, ready_timeout=1)
    with pytest.raises(BertforgeError, match="--request-template"):
        make_endpoint("template", "/x")
    with pytest.raises(BertforgeError, match="--model-name"):
        make_endpoint("oip")
    with pytest.raises(BertforgeError, match="NAME:VALUE"):
        make_endpoint("tei", headers=["nocolon"])
    (tmp_path / "t.json").write_text('{"q": "no placeholder"}')
    with pytest.raises(BertforgeError, match="placeholder"):
        make_endpoint("template", "/x", (), tmp_path / "t.json", "a")
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--protocol", "template", "--path", "/x"]) == 2


def test_serving_json_rows_grouped_by_model(tmp_path):
    rows = [{"model": m, "mode": mode, "target_rps": r, "rps": r, "p50_ms": 5, "p99_ms": p, "failures": 0, "slo_ms": 100,
             "knee": knee, "labels": {"answers": 10, "served_accuracy": 0.9, "disagreements": 0, "offline_dev_score": 0.91}}
            for m, mode, r, p, knee in [("a", "closed", None, 9, False), ("a", "fixed-rate", 20, 50, True),
                                        ("a", "fixed-rate", 40, 400, False), ("b", "fixed-rate", 5, 300, False)]]
    (tmp_path / "serving.json").write_text(json.dumps(rows))
    a, b = load_sweeps([tmp_path / "serving.json"])
    assert [s["offered_rps"] for s in a["steps"]] == [20, 40] and a["rps_at_slo"] == 20 and b["knee"] is None
    table = serving_table([a, b])
    assert table["rows"][0][2:] == [20, 100, 5, 50, 0, 0.9, 0.91, 0]
    assert table["rows"][1][2] is None  # no rate met the SLO
    section = serving_section([tmp_path / "serving.json"])
    assert section["table"] == table and section["markdown"].count("\n") == 3 and "<svg" in section["plot_svg"]
    with pytest.raises(BertforgeError, match="sweep.json"):
        load_sweeps([tmp_path / "missing"])
