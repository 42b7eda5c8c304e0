"""The training loop every recipe shares: AdamW with linear warm-up and decay, progress bars showing
the loss parts, periodic checkpoints with exact resume, evaluation on dev and best-checkpoint keeping.

A recipe supplies what differs: the trainable modules, a `loss_fn(batch) -> {"loss": ..., part: ...}`,
an `evaluate_fn() -> score` and a `save_best_fn(score)`. Resume is exact: the data order depends only on
(seed, epoch), the RNG states are saved, so a killed and resumed run ends with the same weights as an
uninterrupted one. Multi-GPU runs go through Hugging Face accelerate (`accelerate launch bertforge ...`).
"""
from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from pipeline.atomic import complete_candidates, publish_dir, staging_dir
from pipeline.errors import BertforgeError
from pipeline.settings import setting
from pipeline.tracking import Tracker

CHECKPOINT_DIR = "checkpoints"


@dataclass
class LoopConfig:
    epochs: int = setting(3, "training epochs")
    batch_size: int = setting(32, "examples per optimizer step")
    learning_rate: float = setting(5e-5, "peak learning rate of AdamW")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = setting(0.1, "fraction of the steps with a linear learning-rate warm-up")
    max_grad_norm: float = setting(1.0, "clip gradients to this norm (0: no clipping)")
    eval_every: int | None = setting(None, "evaluate every N optimizer steps (default: each epoch)")
    checkpoint_every: int = setting(200, "save resume state every N optimizer steps")
    max_steps_per_epoch: int | None = setting(None, "cut epochs short (smoke tests, quick runs)")
    seed: int = setting(42, "seed of the data order and initialisation")
    precision: str = setting("auto", "autocast precision; auto: bf16 on a GPU that has it, else fp32 (on a CPU with bf16 "
                                     "instructions bf16 trained faster at the same dev score over 3 seeds, on short "
                                     "schedules only: benchmarks/results/train_speed.json; pass bf16 to use it)",
                             choices=("auto", "fp32", "bf16", "fp16"))
    group_by_length: bool = setting(True, "batches of similar length (less padding), drawn from shuffled mega-batches "
                                          "in random order (off: plain shuffling)", flag="--no-group-by-length")
    fused_optimizer: bool = setting(True, "torch's fused AdamW kernel (one pass over the parameters) instead of the "
                                          "per-parameter loop", flag="--no-fused-optimizer")


def resolve_precision(precision: str) -> str:
    """`LoopConfig.precision` as accelerate's `mixed_precision` ("no", "fp16" or "bf16")."""
    if precision == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if gpu_bf16 else "no"
    return "no" if precision == "fp32" else precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain numbers, so `torch.load(weights_only=True)` reads them back."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainLoop:
    def __init__(self, cfg: LoopConfig, modules: torch.nn.Module, dataset, collator, loss_fn: Callable[[dict], dict],
                 out_dir: str | Path, evaluate_fn: Callable[[], float] | None = None,
                 save_best_fn: Callable[[float], None] | None = None, desc: str = "train",
                 run_config: dict | None = None, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.cfg = cfg
        self.dataset, self.collator, self.loss_fn = dataset, collator, loss_fn
        self.evaluate_fn, self.save_best_fn = evaluate_fn, save_best_fn
        self.desc, self.progress = desc, progress
        self.ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
        self.run_config = run_config or {}
        self.tracker = Tracker(out_dir, desc)  # --report-to: loss parts, learning rate, examples/s, dev scores
        precision = resolve_precision(cfg.precision)
        # accelerate keeps one precision per process; a process whose loops ask for different ones (a run config
        # with a bf16 stage after an fp32 one, the training-speed benchmark) re-creates that state. Only the
        # precision state goes: the distributed process group stays.
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                                       **self.tracker.accelerator_kwargs())
        # Every process must take the same number of steps: each step ends in a collective (the gradient
        # average), so a process with one batch more than the others would wait for them forever.
        self.steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size) // self.accelerator.num_processes
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        total = self.steps_per_epoch * cfg.epochs
        decay = [p for n, p in modules.named_parameters() if p.requires_grad and not _no_decay(n)]
        no_decay = [p for n, p in modules.named_parameters() if p.requires_grad and _no_decay(n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                      fused=cfg.fused_optimizer or None)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        # Recipes call their models directly (not through a DDP wrapper), so gradients are averaged across
        # processes explicitly in `_train_step`. The scheduler is not prepared: accelerate would step it
        # once per process, and the batches are already sharded here.
        self.modules = modules.to(self.accelerator.device)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.scheduler = scheduler
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_score": None, "total_steps": total,
                      "history": []}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # -- checkpoints ---------------------------------------------------------------------------
    # A checkpoint is published with `publish_dir`: written into `last.tmp`, then `last` moves to
    # `last.prev` and `last.tmp` to `last`, so a kill at any instant leaves one complete copy to resume
    # from (`last`, or `last.prev` after a kill between the two moves).
    def has_checkpoint(self) -> bool:
        return bool(complete_candidates(self.ckpt_dir / "last")) or (self.ckpt_dir / "last").exists()

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        last = self.ckpt_dir / "last"
        tmp = staging_dir(last)
        torch.save({
            "modules": self.accelerator.unwrap_model(self.modules).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "state": self.state,
        }, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps({"loop": asdict(self.cfg), "run": self.run_config}, indent=2, default=str))
        publish_dir(tmp, last)

    def load_checkpoint(self) -> None:
        """Resume from the newest complete checkpoint; a damaged one falls back to the one before it."""
        candidates = complete_candidates(self.ckpt_dir / "last")
        if not candidates:
            raise BertforgeError(f"cannot resume: {self.ckpt_dir / 'last'} is incomplete (cut short while written, "
                                 f"or made by an older bertforge); delete {self.ckpt_dir} to train from the start")
        errors = []
        for folder in candidates:
            try:
                saved = json.loads((folder / "config.json").read_text())
                ckpt = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            except Exception as e:  # a torn zip, bad JSON or a foreign pickle: all mean "damaged"
                # (torch's weights_only refusal suggests weights_only=False: not advice to pass on)
                why = ("it holds objects other than tensors and plain values" if isinstance(e, pickle.UnpicklingError)
                       else _first_line(e))
                errors.append(f"{folder}: {why}")
                tqdm.write(f"[{self.desc}] checkpoint {folder} is damaged ({why}), trying an older one")
                continue
            self._check_settings(folder, saved)
            try:
                self.accelerator.unwrap_model(self.modules).load_state_dict(ckpt["modules"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                _set_rng_state(ckpt["rng"])
                # checkpoints written before dev history was kept lack it
                self.state = {"history": [], **ckpt["state"]}
                return
            except Exception as e:
                errors.append(f"{folder}: {_first_line(e)}")
        raise BertforgeError(f"cannot resume: the checkpoint is damaged ({errors[0]}); "
                             f"delete {self.ckpt_dir} to train from the start")

    def _check_settings(self, folder: Path, saved: dict) -> None:
        mine = json.loads(json.dumps({"loop": asdict(self.cfg), "run": self.run_config}, default=str))
        if saved != mine:
            diff = sorted(k for part in ("loop", "run") for k in set(saved[part]) | set(mine[part])
                          if saved[part].get(k) != mine[part].get(k))
            raise BertforgeError(f"cannot resume from {folder}: the run's settings changed ({', '.join(diff)})")

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> float | None:
        """Train to the end; returns the best dev score (None when there is no evaluation)."""
        from pipeline.data import train_loader

        if self.has_checkpoint():
            if not resume:
                raise BertforgeError(f"{self.ckpt_dir.parent} holds an unfinished run: pass --resume to continue it")
            self.load_checkpoint()
        else:
            seed_everything(self.cfg.seed)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        bar = tqdm(total=self.state["total_steps"], initial=self.state["global_step"], desc=self.desc,
                   disable=not (self.progress and self.accelerator.is_main_process), dynamic_ncols=True)
        self.tracker.start(self.accelerator, {"loop": asdict(self.cfg), "run": self.run_config})
        while self.state["epoch"] < self.cfg.epochs:
            epoch = self.state["epoch"]
            self.modules.train()
            loader = train_loader(self.dataset, self.collator, self.cfg.batch_size, self.cfg.seed, epoch,
                                  group_by_length=self.cfg.group_by_length)
            for i, batch in enumerate(loader):
                step = i // world
                if i % world != rank or step < self.state["step_in_epoch"]:
                    continue  # another process's batch, or already trained before the resume
                if step >= self.steps_per_epoch:
                    break
                parts = self._train_step(batch)
                self.state["step_in_epoch"] = step + 1
                self.state["global_step"] += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()}, refresh=False)
                gs = self.state["global_step"]
                self.tracker.log_step(gs, parts, self.scheduler.get_last_lr()[0], batch, world)
                if self.cfg.eval_every and gs % self.cfg.eval_every == 0:
                    self._evaluate()
                if self.cfg.checkpoint_every and gs % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self.state["epoch"] += 1
            self.state["step_in_epoch"] = 0
            if not self.cfg.eval_every or self.state["global_step"] % self.cfg.eval_every:
                self._evaluate()
            self.save_checkpoint()
        bar.close()
        self.tracker.end()
        return self.state["best_score"]

    def _train_step(self, batch: dict) -> dict[str, float]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.accelerator.autocast():
            parts = self.loss_fn(batch)
        self.accelerator.backward(parts["loss"])
        if self.accelerator.num_processes > 1:
            for p in self.modules.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.modules.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in parts.items()}

    def _evaluate(self) -> None:
        if self.evaluate_fn is None:
            if self.save_best_fn and self.accelerator.is_main_process:
                self.save_best_fn(float("nan"))  # nothing to compare: the latest is kept
            return
        self.modules.eval()
        score = self.evaluate_fn() if self.accelerator.is_main_process else None
        self.modules.train()
        best = self.state["best_score"]
        if score is not None:
            self.state["history"].append({"step": self.state["global_step"], "score": score})
            self.tracker.log_eval(self.state["global_step"], score)
        if score is not None and (best is None or score > best):
            self.state["best_score"] = score
            if self.save_best_fn:
                self.save_best_fn(score)
        if score is not None:  # only the main process evaluates
            tqdm.write(f"[{self.desc}] step {self.state['global_step']}: dev score {score:.4f} "
                       f"(best {self.state['best_score']:.4f})")

    @property
    def history(self) -> list[dict]:
        """Every dev evaluation of the run, in order: [{"step", "score"}]."""
        return list(self.state["history"])

    def finish(self) -> None:
        """Remove the resume state once the final artifact is written."""
        if self.accelerator.is_main_process and self.ckpt_dir.exists():
            # Moved aside first: a kill while deleting must not leave a half checkpoint that looks resumable.
            trash = self.ckpt_dir.with_name(f".{CHECKPOINT_DIR}.trash")
            shutil.rmtree(trash, ignore_errors=True)
            self.ckpt_dir.replace(trash)
            shutil.rmtree(trash, ignore_errors=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
