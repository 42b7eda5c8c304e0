"""`bertforge loadtest`: real Locust runs (subprocess) against a real server on loopback."""
from __future__ import annotations

import json

import pytest
from serving_helpers import export_tiny_onnx

from pipeline.cli import main
from pipeline.errors import BertforgeError
from serving.config import ServeConfig
from serving.loadtest import parse_duration, read_locust_stats, run_loadtest
from serving.server import serve_in_thread


@pytest.fixture(scope="module")
def server(tiny_bert, tmp_path_factory):
    model = export_tiny_onnx(tiny_bert, tmp_path_factory.mktemp("loadtest") / "onnx")
    config = ServeConfig(port=0, num_threads=1, max_wait_ms=2, log_level="warning", graceful_timeout_s=5)
    with serve_in_thread(model, config) as url:
        yield url


@pytest.mark.slow
def test_closed_loop_run_through_the_cli(server, tmp_path, capsys):
    out = tmp_path / "lt"
    code = main(["loadtest", "--host", server, "--users", "3", "--spawn-rate", "3", "--duration", "4s", "--out", str(out)])
    assert code == 0, (out / "locust.log").read_text()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(capsys.readouterr().out) | {"command": summary["command"]}
    assert summary["requests"] > 10 and summary["failures"] == 0
    assert summary["requests_per_s"] > 0 and 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    # The server saw the same traffic and batched it.
    assert summary["server"]["model_calls"] >= 1 and summary["server"]["mean_batch_size"] >= 1
    assert (out / "locust_stats.csv").is_file() and (out / "locust_report.html").is_file()
    assert read_locust_stats(out / "locust")["requests"] == summary["requests"]


@pytest.mark.slow
def test_fixed_rate_pairs_from_a_glue_task(server, tmp_path, glue_dir):
    summary = run_loadtest(server, users=2, spawn_rate=2, duration="4s", out_dir=tmp_path, mode="fixed-rate",
                           rate=20, task="mrpc", glue_dir=glue_dir, batch=2)
    assert summary["failures"] == 0, summary["errors"]
    # Open loop: the rate is the schedule's, whatever the latency (reset after ramp-up).
    assert 10 <= summary["requests_per_s"] <= 30
    assert summary["inputs_per_request"] == 2 and summary["server"]["mean_batch_size"] >= 1
    first = (tmp_path / "texts.tsv").read_text().splitlines()[1].split("\t")
    assert len(first) == 2 and all(first)  # MRPC: sentence pairs


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
