"""`bertforge run`: every stage into one folder on a tiny model; a re-run rebuilds exactly the stages whose
resolved config or inputs changed, and those after them (read from stages.json, not from log lines)."""
import json

import pytest

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest
from pipeline.errors import BertforgeError
from pipeline.run import load_run_config, plan_pipeline, run_pipeline

ORDER = ["teacher", "student", "pruned", "onnx", "int8", "bench", "report"]


def _tiny_cfg(teacher, out, *extra):
    return load_run_config("configs/quickstart.yaml", [
        f"out={out}", f"teacher.model={teacher}", "teacher.loop.epochs=1", "teacher.max_train_examples=96",
        "distill.max_train_examples=96", "distill.intermediate_epochs=1", "distill.prediction_epochs=1",
        "prune.max_train_examples=96", "export.validation_examples=32", "quantize.eval_examples=64",
        "bench.baseline=false", "bench.min_iters=2", "bench.min_seconds=0.05", "bench.cold_start=inprocess", "bench.texts_limit=24", *extra])


def _built(run) -> dict:
    return {name: entry.get("built_at") for name, entry in json.loads((run / "stages.json").read_text()).items()}


def _rebuilt(before: dict, after: dict) -> set:
    return {name for name, t in after.items() if t != before.get(name)}


def _from(stage: str, final: str = "int8") -> set:
    order = [final if s == "int8" else s for s in ORDER]
    return set(order[order.index(final if stage == "int8" else stage):])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    teacher = make_tiny_bert(root / "tiny", layers=6)
    made = run_pipeline(_tiny_cfg(teacher, root / "run"), progress=False)
    return root, teacher, made


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
    assert set(ledger) == set(ORDER) and all(v["status"] == "done" for v in ledger.values())
    # the fingerprinted config is the resolved library config: the shared settings reached every stage
    assert ledger["teacher"]["config"]["loop"]["seed"] == 42 and ledger["pruned"]["config"]["task"] == "sst2"


# Every top-level shared setting and one field of each stage: exactly that stage and the later ones.
CHANGES = [
    ("seed=7", _from("teacher")),
    ("max_length=32", _from("teacher")),
    ("task=mrpc", _from("teacher")),
    ("threads=1", _from("teacher")),
    ("teacher.loop.learning_rate=3e-4", _from("teacher")),
    ("distill.prediction_lr=1e-4", _from("student")),
    ("distill.loop.batch_size=16", _from("student")),
    ("prune.heads=0.25", _from("pruned")),
    ("export.atol=1e-3", _from("onnx")),
    ("quantize.per_channel=true", _from("int8")),
    ("quantize.mode=fp16", _from("int8", final="fp16")),
    ("bench.min_iters=3", {"bench", "report"}),
    ("report.device=cpu", {"report"}),
]


@pytest.mark.parametrize("change,expected", CHANGES, ids=[c for c, _ in CHANGES])
def test_a_change_rebuilds_exactly_its_stage_and_the_later_ones(finished_run, change, expected):
    root, teacher, _ = finished_run
    plan = plan_pipeline(_tiny_cfg(teacher, root / "run", change))
    assert {name for name, status in plan.items() if status == "rebuild"} == expected
    assert plan_pipeline(_tiny_cfg(teacher, root / "run")) == {s: "up to date" for s in ORDER}


def test_rerun_rebuilds_what_the_plan_says(finished_run):
    root, teacher, _ = finished_run
    run = root / "run"
    before = _built(run)
    run_pipeline(_tiny_cfg(teacher, run), progress=False)
    assert _rebuilt(before, _built(run)) == set()

    # static QDQ wants the unfused graph: both the export and the quantization change, nothing before them
    changed = _tiny_cfg(teacher, run, "export.optimize=none", "quantize.mode=static")
    plan = plan_pipeline(changed)
    before = _built(run)
    run_pipeline(changed, progress=False)
    assert _rebuilt(before, _built(run)) == {s for s, status in plan.items() if status == "rebuild"} == _from("onnx")
    assert read_manifest(run / "int8").params["mode"] == "static"


def test_fp16_run_names_its_last_folder_fp16(finished_run):
    root, teacher, _ = finished_run
    run = root / "run"
    made = run_pipeline(_tiny_cfg(teacher, run, "quantize.mode=fp16"), progress=False)
    assert "fp16" in made and read_manifest(run / "fp16").precision == "fp16"
    assert json.loads((run / "bench" / "bench.json").read_text())["final"] == "fp16"
    assert json.loads((run / "report" / "report.json").read_text())["final"] == "fp16"


@pytest.mark.slow
def test_loadtest_stage_serves_the_final_artifact_and_the_report_shows_it(finished_run):
    """`loadtest.enabled`: the final artifact served on loopback and swept; only the load test and the report
    are new work, and the report gains its serving section."""
    root, teacher, _ = finished_run
    run = root / "run"
    run_pipeline(_tiny_cfg(teacher, run), progress=False)  # back to the plain run, whatever tests before changed
    cfg = _tiny_cfg(teacher, run, "loadtest.enabled=true", "loadtest.users=2", "loadtest.duration=3s",
                    "loadtest.steps=0.5,1", "loadtest.step_duration=2s", "loadtest.server_threads=1")
    plan = plan_pipeline(cfg)
    assert {s for s, status in plan.items() if status == "rebuild"} == {"loadtest", "report"}
    run_pipeline(cfg, progress=False)
    sweep = json.loads((run / "loadtest" / "sweep.json").read_text())
    assert [round(s["fraction"], 2) for s in sweep["steps"]] == [0.5, 1.0] and sweep["slo_ms"] == 100
    assert all(s["failures"] == 0 for s in sweep["steps"])
    assert "## Serving under load" in (run / "report" / "report.md").read_text()
    assert plan_pipeline(cfg)["loadtest"] == "up to date"


@pytest.mark.slow
def test_each_change_really_rebuilds_its_stage_and_the_later_ones(finished_run, glue_dir):
    """The plan's promise, built for real: changes piled up from the last stage to the first."""
    root, teacher, _ = finished_run
    run = root / "real"
    base = [f"glue_dir={glue_dir}"]
    run_pipeline(_tiny_cfg(teacher, run, *base), progress=False)
    piled = list(base)
    for change, stage in [("report.device=cpu", "report"), ("bench.min_iters=3", "bench"),
                          ("quantize.per_channel=true", "int8"), ("export.atol=1e-3", "onnx"),
                          ("prune.heads=0.25", "pruned"), ("distill.prediction_lr=1e-4", "student"),
                          ("teacher.loop.learning_rate=3e-4", "teacher"), ("max_length=32", "teacher"),
                          ("seed=7", "teacher"), ("task=mrpc", "teacher")]:
        piled.append(change)
        before = _built(run)
        run_pipeline(_tiny_cfg(teacher, run, *piled), progress=False)
        expected = {"bench", "report"} if stage == "bench" else {"report"} if stage == "report" else _from(stage)
        assert _rebuilt(before, _built(run)) == expected, change


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(BertforgeError, match="config file .* not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(BertforgeError, match="bad run config"):
        load_run_config("configs/quickstart.yaml", ["distill.no_such_field=1"])
    with pytest.raises(BertforgeError, match="bad run config"):
        load_run_config("configs/quickstart.yaml", ["prune.heads=lots"])
    with pytest.raises(BertforgeError, match="teacher.epochs is now teacher.loop.epochs"):
        load_run_config("configs/quickstart.yaml", ["teacher.epochs=2"])
    with pytest.raises(BertforgeError, match="distill.loop.mixed_precision is now distill.loop.precision"):
        load_run_config("configs/quickstart.yaml", ["distill.loop.mixed_precision=bf16"])
    with pytest.raises(BertforgeError, match="prune.model is set by the run"):
        load_run_config("configs/quickstart.yaml", ["prune.model=elsewhere"])


def test_every_config_in_configs_loads():
    for path in ("configs/quickstart.yaml", "configs/sst2-report.yaml", "configs/tinybert-glue.yaml"):
        cfg = load_run_config(path)
        assert cfg.teacher.loop.seed == cfg.seed and cfg.quantize.task == cfg.task
