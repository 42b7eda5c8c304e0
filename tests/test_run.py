"""`bertforge run`: every stage into one folder on a tiny model; a re-run skips what is done."""
import json

import pytest

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest
from pipeline.errors import BertforgeError
from pipeline.run import load_run_config, run_pipeline


def _tiny_cfg(teacher, out, *extra):
    return load_run_config("configs/quickstart.yaml", [
        f"out={out}", f"teacher.model={teacher}", "teacher.epochs=1", "teacher.max_train_examples=96",
        "distill.max_train_examples=96", "distill.intermediate_epochs=1", "distill.prediction_epochs=1",
        "bench.baseline=false", "bench.min_iters=2", "bench.min_seconds=0.05", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    teacher = make_tiny_bert(root / "tiny", layers=6)
    made = run_pipeline(_tiny_cfg(teacher, root / "run"), progress=False)
    return root, teacher, made


@pytest.mark.slow
def test_every_stage_leaves_its_artifact_and_the_report(finished_run):
    root, _, made = finished_run
    run = root / "run"
    for stage, fmt in [("teacher", "pytorch"), ("student", "pytorch"), ("pruned", "pytorch"), ("onnx", "onnx"), ("int8", "onnx")]:
        manifest = read_manifest(run / stage)
        assert manifest is not None and manifest.format == fmt, stage
        assert manifest.metrics["dev"]["score"] is not None
    assert read_manifest(run / "int8").precision == "int8"
    # lineage runs back through every stage to the source model
    stages = [e["stage"] for e in read_manifest(run / "int8").lineage]
    assert stages[0] == "source" and "finetune" in stages and "distill" in stages and "prune" in stages
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["final_score"] == pytest.approx(read_manifest(run / "int8").metrics["dev"]["score"])
    assert (run / "report" / "report.html").stat().st_size > 1000
    ledger = json.loads((run / "stages.json").read_text())
    assert all(v["status"] == "done" for v in ledger.values())


@pytest.mark.slow
def test_rerun_skips_done_stages_and_rebuilds_changed_ones(finished_run, capsys):
    root, teacher, _ = finished_run
    run = root / "run"
    before = {s: (run / s / "bertforge.json").stat().st_mtime_ns for s in ("teacher", "student", "pruned", "onnx", "int8")}
    capsys.readouterr()
    run_pipeline(_tiny_cfg(teacher, run), progress=False)
    err = capsys.readouterr().err
    assert err.count("up to date, skipped") == 7
    assert all((run / s / "bertforge.json").stat().st_mtime_ns == t for s, t in before.items())

    # static QDQ wants the unfused graph: both the export and the quantization change, nothing before them
    run_pipeline(_tiny_cfg(teacher, run, "export.optimize=none", "quantize.mode=static"), progress=False)
    err = capsys.readouterr().err
    assert "onnx: settings or inputs changed, rebuilding" in err and "int8: settings or inputs changed, rebuilding" in err
    assert all((run / s / "bertforge.json").stat().st_mtime_ns == before[s] for s in ("teacher", "student", "pruned"))
    assert read_manifest(run / "int8").params["mode"] == "static"


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(BertforgeError, match="config file .* not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(BertforgeError, match="bad run config"):
        load_run_config("configs/quickstart.yaml", ["distill.no_such_field=1"])
    with pytest.raises(BertforgeError, match="bad run config"):
        load_run_config("configs/quickstart.yaml", ["prune.heads=lots"])
