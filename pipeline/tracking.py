"""Experiment tracking of the training loop through accelerate's trackers (TensorBoard or MLflow).

Each training loop (fine-tuning, each distillation phase, pruning's recovery) is one tracked run named
after it (`finetune-sst2`, `tinybert-sst2-intermediate`, ...). At every optimizer step it logs each loss
part (`train/<part>`), the learning rate and examples per second (wall time between steps, data loading
included); at every evaluation the dev score (`dev/score`). The loop's settings are the run's parameters.

Where the numbers go is chosen once per process (`configure`, from `--report-to` / `--logging-dir` of the
training commands and `bertforge run`), not in a stage's config: a tracker never enters a stage's
fingerprint or its resume check, so turning tracking on never retrains anything.

- tensorboard: event files under LOGGING_DIR/<run name> (default LOGGING_DIR: the stage's `OUT/logs`;
  `bertforge run`: `RUN/logs`, one folder for every stage). `tensorboard --logdir LOGGING_DIR`.
- mlflow: `$MLFLOW_TRACKING_URI` when set; else a local file store in LOGGING_DIR/mlruns (MLflow 3 keeps
  that backend in maintenance mode, so bertforge opts in with MLFLOW_ALLOW_FILE_STORE for it).
  `mlflow ui --backend-store-uri LOGGING_DIR/mlruns`.
"""
from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import BertforgeError
from pipeline.settings import setting

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


@dataclass
class TrackingConfig:
    report_to: str = setting("none", "log losses, learning rate, dev scores and examples/s with accelerate's trackers",
                             choices=("none", "tensorboard", "mlflow"))
    logging_dir: str | None = setting(None, "tracking folder (default: the stage's OUT/logs; bertforge run: RUN/logs)")

    def __post_init__(self):
        if self.report_to not in ("none", *PACKAGES):
            raise BertforgeError(f"--report-to must be none, tensorboard or mlflow, not {self.report_to!r}")


_active = TrackingConfig()


def configure(cfg: TrackingConfig) -> None:
    """Where this process's training loops report (checked now: a missing package is a clear error up front)."""
    global _active
    if cfg.report_to != "none" and not any(importlib.util.find_spec(p) for p in PACKAGES[cfg.report_to]):
        raise BertforgeError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: "
                             "pip install 'bertforge[tracking]'")
    _active = cfg


def active() -> TrackingConfig:
    return _active


def run_name(desc: str) -> str:
    """`tinybert sst2: intermediate` -> `tinybert-sst2-intermediate` (a folder and run name)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", desc).strip("-") or "train"


class Tracker:
    """One training loop's tracked run; every method is a no-op when tracking is off."""

    def __init__(self, out_dir: str | Path, desc: str, cfg: TrackingConfig | None = None):
        self.cfg = cfg or active()
        self.enabled = self.cfg.report_to != "none"
        self.name = run_name(desc)
        self.dir = Path(self.cfg.logging_dir or Path(out_dir) / "logs")
        self._accelerator = None
        self._last = None

    def accelerator_kwargs(self) -> dict[str, Any]:
        """What `Accelerator(...)` takes to carry the tracker."""
        if not self.enabled:
            return {}
        return {"log_with": self.cfg.report_to, "project_dir": str(self.dir)}

    def start(self, accelerator, config: dict) -> None:
        if not self.enabled:
            return
        self._accelerator = accelerator
        self.dir.mkdir(parents=True, exist_ok=True)
        init = {}
        if self.cfg.report_to == "mlflow":
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((self.dir / "mlruns").resolve().as_uri())
            init = {"mlflow": {"run_name": self.name}}
        accelerator.init_trackers(self.name, config=_flat(config), init_kwargs=init)
        self._last = time.perf_counter()

    def log_step(self, step: int, parts: dict[str, float], learning_rate: float, batch: dict, processes: int = 1) -> None:
        """One optimizer step: each loss part, the learning rate, examples per second since the last step
        (`batch`: this process's batch; every process trains on one as large)."""
        if self._accelerator is None:
            return
        now = time.perf_counter()
        examples = len(next(iter(batch.values()))) * processes
        values = {f"train/{k}": float(v) for k, v in parts.items()}
        values["train/learning_rate"] = float(learning_rate)
        values["train/examples_per_s"] = examples / max(now - self._last, 1e-9)
        self._accelerator.log(values, step=step)
        self._last = time.perf_counter()

    def log_eval(self, step: int, score: float) -> None:
        if self._accelerator is None:
            return
        self._accelerator.log({"dev/score": float(score)}, step=step)
        self._last = time.perf_counter()  # evaluation time is not training throughput

    def end(self) -> None:
        if self._accelerator is not None:
            self._accelerator.end_training()
            self._accelerator = None


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a.b` keys with plain values (what TensorBoard's hparams and MLflow params take)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
