"""Experiment tracking through accelerate's trackers: a real fine-tuning run writes TensorBoard event files
and a real training loop writes a local MLflow store; both are read back with the libraries' own readers."""
from __future__ import annotations

import pytest

from conftest import make_tiny_bert
from pipeline import tracking
from pipeline.cli import main
from pipeline.tracking import TrackingConfig

tensorboard = pytest.importorskip("tensorboard", reason="the tracking extra (pip install 'bertforge[tracking]')")


@pytest.fixture(autouse=True)
def tracking_off_after():
    yield
    tracking.configure(TrackingConfig())  # the process-wide choice must not leak into other tests


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_finetune_reports_to_tensorboard(tmp_path, sst2_dir):
    import json

    model = make_tiny_bert(tmp_path / "base", seed=4)
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "sst2", "--model", str(model), "--out", str(out), "--glue-dir", str(sst2_dir),
                 "--max-train-examples", "64", "--epochs", "1", "--batch-size", "16", "--eval-every", "2",
                 "--learning-rate", "1e-3", "--warmup-ratio", "0.5", "--report-to", "tensorboard"]) == 0
    runs = list((out / "logs").iterdir())
    assert [r.name for r in runs] == ["finetune-sst2"]  # OUT/logs/<run name>
    s = _scalars(runs[0])
    assert [step for step, _ in s["train/loss"]] == [1, 2, 3, 4]  # every optimizer step
    lr = [v for _, v in s["train/learning_rate"]]
    assert max(lr) == pytest.approx(1e-3) and lr[-1] < max(lr)  # warm-up to the peak, then linear decay
    assert all(v > 0 for _, v in s["train/examples_per_s"])
    history = json.loads((out / "bertforge.json").read_text())["params"]["dev_history"]
    assert [(step, round(v, 5)) for step, v in s["dev/score"]] == [(h["step"], round(h["score"], 5)) for h in history]
    assert len(history) == 2


def test_training_loop_reports_every_loss_part_to_a_local_mlflow_store(tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra (pip install 'bertforge[tracking]')")
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.training import LoopConfig, TrainLoop

    tracking.configure(TrackingConfig("mlflow", logging_dir=str(tmp_path / "logs")))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = [{"x": torch.randn(4), "y": torch.tensor(i % 2)} for i in range(24)]

    def loss_fn(batch):
        ce = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        l2 = 1e-3 * model.weight.pow(2).sum()
        return {"loss": ce + l2, "ce": ce, "l2": l2}

    scores = iter([0.5, 0.75, 0.625])
    loop = TrainLoop(LoopConfig(epochs=3, batch_size=8, learning_rate=0.1, seed=1, group_by_length=False), model, data,
                     torch.utils.data.default_collate, loss_fn, tmp_path / "out", evaluate_fn=lambda: next(scores),
                     desc="kd sst2: prediction", progress=False)
    loop.run()

    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").as_uri())
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.run_name == "kd-sst2-prediction" and run.info.status == "FINISHED"
    assert run.data.params["loop.learning_rate"] == "0.1" and run.data.params["loop.epochs"] == "3"

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    for part in ("loss", "ce", "l2"):
        assert [step for step, _ in history(f"train/{part}")] == list(range(1, 10))  # 3 epochs x 3 steps
    ce, l2, loss = history("train/ce"), history("train/l2"), history("train/loss")
    assert all(abs(c + w - t) < 1e-5 for (_, c), (_, w), (_, t) in zip(ce, l2, loss))
    assert history("dev/score") == [(3, 0.5), (6, 0.75), (9, 0.625)]
    assert len(history("train/learning_rate")) == 9 and all(v > 0 for _, v in history("train/examples_per_s"))


def test_report_to_is_a_flag_of_every_training_command_and_run(tmp_path, capsys):
    from pipeline.cli import build_parser
    from pipeline.cli.common import configure_tracking

    for command in ("finetune", "distill", "prune", "run"):
        with pytest.raises(SystemExit):
            build_parser(command).parse_args([command, "--help"])
        assert "--report-to {none,tensorboard,mlflow}" in capsys.readouterr().out
    args = build_parser("run").parse_args(["run", "--report-to", "tensorboard"])
    configure_tracking(args, default_dir=tmp_path / "run" / "logs")
    assert tracking.active() == TrackingConfig("tensorboard", str(tmp_path / "run" / "logs"))
    with pytest.raises(SystemExit):
        build_parser("finetune").parse_args(["finetune", "--report-to", "wandb"])
