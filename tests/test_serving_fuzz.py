"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): a few hundred
generated requests, valid and invalid, with stray headers and content types; none may get a 5xx or hang.
benchmarks/reliability_serving.py runs thousands of them against the int8 student."""
from __future__ import annotations

import pytest
from serving_helpers import export_tiny_onnx

from serving.config import ServeConfig
from serving.server import serve_in_thread

pytest.importorskip("schemathesis")


@pytest.mark.slow
def test_fuzzed_requests_never_get_5xx_or_hang(tiny_bert, tmp_path):
    from benchmarks.reliability_serving import fuzz_api

    model = export_tiny_onnx(tiny_bert, tmp_path / "onnx")
    config = ServeConfig(port=0, num_threads=1, log_level="error", graceful_timeout_s=2,
                         max_inputs_per_request=16, request_timeout_s=10)
    with serve_in_thread(model, config) as url:
        tally = fuzz_api(url, cases=300, seed=1, timeout_s=10)
    assert tally["cases"] >= 250, tally
    assert tally["5xx"] == 0 and tally["hangs"] == 0 and tally["connection_errors"] == 0, tally["failures"]
    # The generated requests reached the model and its refusals alike.
    assert tally["statuses"].get("200", 0) > 10 and tally["statuses"].get("422", 0) > 10, tally["statuses"]
