"""Recipe: the whole pipeline as one job, into one run folder.

    teacher -> [general distillation] -> [augmentation] -> task distillation -> pruning -> ONNX export
            -> int8 quantization -> BERT-base baseline -> bench -> report

Each stage writes `RUN/<stage>/` (an artifact folder with its `bertforge.json`, or the bench/report files)
and its fingerprint (the stage's settings plus its input's checksums) into `RUN/stages.json`. On a re-run a
stage whose output exists with the same fingerprint is skipped; an interrupted training stage resumes
from its checkpoint. So a crash costs at most the steps since the last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.artifacts import read_manifest
from pipeline.data import sample_data_dir
from pipeline.errors import BertforgeError


@dataclass
class TeacherStage:
    model: str = "all-MiniLM-L6-v2"  # hub id or folder; fine-tuned here unless `finetune` is false
    finetune: bool = True
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_train_examples: int | None = None


@dataclass
class GeneralStage:
    enabled: bool = False
    teacher: str | None = None  # a pretrained (not fine-tuned) encoder; default: the teacher's model
    corpus: str | None = None  # one text per line
    student_config: str = "tinybert-4l-312d"
    epochs: int = 3
    learning_rate: float = 1e-4
    max_train_examples: int | None = None


@dataclass
class AugmentStage:
    enabled: bool = False
    mlm: str | None = None  # masked LM; None: GloVe candidates for every word (documented fallback)
    n: int = 20
    p: float = 0.4
    k: int = 15
    max_examples: int | None = None


@dataclass
class DistillStage:
    student: str | None = None  # an already distilled student folder: the stage is not run
    method: str = "tinybert"
    student_config: str | None = None  # named config or CONFIG.json (random init, or from the general stage)
    init_from_teacher: str | None = "3"  # teacher layers the student starts from, when no general stage
    mapping: str = "uniform"
    intermediate_epochs: int | None = None  # None: the paper's table (20; CoLA 50)
    prediction_epochs: int = 3
    intermediate_lr: float = 5e-5
    prediction_lr: float = 3e-5
    batch_size: int = 32
    max_train_examples: int | None = None


@dataclass
class PruneStage:
    enabled: bool = True
    heads: float = 0.5
    ffn: float = 0.5
    per_layer: bool = False
    recover_epochs: int = 1
    learning_rate: float = 5e-5
    max_train_examples: int | None = None  # rows of the recovery distillation (None: the whole train split)


@dataclass
class ExportStage:
    optimize: str = "O2"
    device: str = "cpu"


@dataclass
class QuantizeStage:
    mode: str = "dynamic"
    tolerance: float | None = None  # accuracy-aware: allowed relative dev-score drop


@dataclass
class BenchStage:
    enabled: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    seq_lens: list[int] = field(default_factory=lambda: [128])
    min_iters: int = 10
    min_seconds: float = 1.0
    max_seconds: float = 30.0
    baseline: bool = True
    baseline_model: str = "bert-base-uncased"
    threads: int | None = None
    device: str = "auto"


@dataclass
class RunConfig:
    out: str = "runs/quickstart"
    task: str = "sst2"
    glue_dir: str | None = None  # None: the SST-2 sample shipped with bertforge
    seed: int = 42
    threads: int | None = None
    max_length: int | None = None
    teacher: TeacherStage = field(default_factory=TeacherStage)
    general: GeneralStage = field(default_factory=GeneralStage)
    augment: AugmentStage = field(default_factory=AugmentStage)
    distill: DistillStage = field(default_factory=DistillStage)
    prune: PruneStage = field(default_factory=PruneStage)
    export: ExportStage = field(default_factory=ExportStage)
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    bench: BenchStage = field(default_factory=BenchStage)


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (may be None: the defaults) merged over the typed defaults, then `key=value` overrides."""
    schema = OmegaConf.structured(RunConfig)
    try:
        parts = [schema]
        if path:
            if not Path(path).is_file():
                raise BertforgeError(f"config file {path} not found")
            parts.append(OmegaConf.load(path))
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*parts))
    except BertforgeError:
        raise
    except Exception as e:  # omegaconf's validation errors: unknown key, wrong type
        raise BertforgeError(f"bad run config: {str(e).splitlines()[0]}") from None


class Run:
    """Runs the stages in order; `stages.json` in the run folder records what each produced."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        self.glue_dir = cfg.glue_dir or str(sample_data_dir())
        self.ledger_path = self.out / "stages.json"
        self.ledger: dict[str, Any] = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def _fingerprint(self, name: str, settings: dict, inputs: list[str | None]) -> str:
        def input_id(path):
            manifest = read_manifest(path) if path and Path(path).is_dir() else None
            return [f["sha256"] for f in manifest.files] if manifest else path

        blob = json.dumps({"stage": name, "settings": settings, "inputs": [input_id(p) for p in inputs]},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stage(self, name: str, settings: dict, inputs: list[str | None], work, done_file: str = "bertforge.json") -> Path:
        """Run `work(out_dir, resume)` unless its output exists with the same fingerprint."""
        folder = self.out / name
        key = self._fingerprint(name, settings, inputs)
        entry = self.ledger.get(name, {})
        if entry.get("fingerprint") == key and (folder / done_file).exists():
            print(f"[run] {name}: up to date, skipped", file=sys.stderr)
            return folder
        resume = entry.get("fingerprint") == key and (folder / "checkpoints").is_dir()
        if entry.get("fingerprint") not in (None, key) and folder.exists():
            print(f"[run] {name}: settings or inputs changed, rebuilding", file=sys.stderr)
            import shutil

            shutil.rmtree(folder)
        print(f"[run] {name}: {'resuming' if resume else 'running'}", file=sys.stderr)
        self.ledger[name] = {"fingerprint": key, "status": "running", "settings": settings}
        self._save_ledger()
        start = time.perf_counter()
        work(folder, resume)
        self.ledger[name].update(status="done", wall_s=round(time.perf_counter() - start, 1))
        self._save_ledger()
        return folder

    def _save_ledger(self) -> None:
        from pipeline.atomic import atomic_write_json  # a kill mid-write must not tear the ledger

        atomic_write_json(self.ledger_path, self.ledger, default=str)

    # -- the stages ----------------------------------------------------------------------------
    def run(self) -> dict[str, Path]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        made: dict[str, Path] = {}
        made["teacher"] = self.teacher()
        general = self.general_distillation() if cfg.general.enabled else None
        train_file = self.augment() if cfg.augment.enabled else None
        made["student"] = self.task_distillation(made["teacher"], general, train_file)
        made["pruned"] = self.prune(made["student"], made["teacher"]) if cfg.prune.enabled else made["student"]
        made["onnx"] = self.export(made["pruned"])
        made["int8"] = self.quantize(made["onnx"])
        if cfg.bench.enabled:
            bench = self.bench(made)
            made["report"] = self.report(bench)
        return made

    def teacher(self) -> Path:
        t = self.cfg.teacher
        if not t.finetune:
            return Path(t.model)
        from pipeline.finetune import FinetuneConfig, finetune
        from pipeline.training import LoopConfig

        def work(out, resume):
            finetune(FinetuneConfig(task=self.cfg.task, model=t.model, out=str(out), glue_dir=self.glue_dir,
                                    max_train_examples=t.max_train_examples, max_length=self.cfg.max_length,
                                    num_threads=self.cfg.threads,
                                    loop=LoopConfig(epochs=t.epochs, batch_size=t.batch_size,
                                                    learning_rate=t.learning_rate, seed=self.cfg.seed)),
                     resume=resume, progress=self.progress)

        return self.stage("teacher", asdict(t) | {"task": self.cfg.task, "glue_dir": self.glue_dir}, [], work)

    def general_distillation(self) -> Path:
        from pipeline.distill import distill
        from pipeline.distill.config import DistillConfig
        from pipeline.distill.students import StudentSpec
        from pipeline.training import LoopConfig

        g = self.cfg.general
        if not g.corpus:
            raise BertforgeError("general.enabled needs general.corpus (a text file, one text per line)")

        def work(out, resume):
            distill(DistillConfig(stage="general", teacher=g.teacher or self.cfg.teacher.model, out=str(out),
                                  student=StudentSpec(config=g.student_config), corpus=g.corpus,
                                  max_train_examples=g.max_train_examples, num_threads=self.cfg.threads,
                                  loop=LoopConfig(epochs=g.epochs, learning_rate=g.learning_rate, seed=self.cfg.seed)),
                    resume=resume, progress=self.progress)

        return self.stage("general", asdict(g), [g.corpus], work)

    def augment(self) -> Path:
        from pipeline.distill.augment import AugmentConfig, augment_dataset

        a = self.cfg.augment

        def work(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            augment_dataset(AugmentConfig(task=self.cfg.task, out=str(out / "train.tsv"), glue_dir=self.glue_dir,
                                          mlm=a.mlm, n=a.n, p=a.p, k=a.k, max_examples=a.max_examples,
                                          seed=self.cfg.seed, num_threads=self.cfg.threads), progress=self.progress)

        folder = self.stage("augment", asdict(a) | {"task": self.cfg.task, "glue_dir": self.glue_dir}, [], work,
                            done_file="train.tsv")
        return folder / "train.tsv"

    def task_distillation(self, teacher: Path, general: Path | None, train_file: Path | None) -> Path:
        from pipeline.distill import distill
        from pipeline.distill.config import DistillConfig
        from pipeline.distill.students import StudentSpec
        from pipeline.training import LoopConfig

        d = self.cfg.distill
        if d.student:
            if read_manifest(d.student) is None:
                raise BertforgeError(f"distill.student {d.student} is not a bertforge artifact (no bertforge.json)")
            return Path(d.student)
        if general is not None:
            student = StudentSpec(pretrained=str(general))
        elif d.student_config:
            student = StudentSpec(config=d.student_config)
        else:
            student = StudentSpec(init_from_teacher=d.init_from_teacher)

        def work(out, resume):
            distill(DistillConfig(stage="task", teacher=str(teacher), out=str(out), method=d.method, student=student,
                                  mapping=d.mapping, task=self.cfg.task, glue_dir=self.glue_dir,
                                  train_file=str(train_file) if train_file else None,
                                  max_train_examples=d.max_train_examples, max_length=self.cfg.max_length,
                                  intermediate_epochs=d.intermediate_epochs, intermediate_lr=d.intermediate_lr,
                                  prediction_epochs=d.prediction_epochs, prediction_lr=d.prediction_lr,
                                  num_threads=self.cfg.threads,
                                  loop=LoopConfig(batch_size=d.batch_size, seed=self.cfg.seed)),
                    resume=resume, progress=self.progress)

        inputs = [str(teacher), str(general) if general else None, str(train_file) if train_file else None]
        return self.stage("student", asdict(d), inputs, work)

    def prune(self, student: Path, teacher: Path) -> Path:
        from pipeline.prune import PruneConfig, prune
        from pipeline.training import LoopConfig

        p = self.cfg.prune

        def work(out, resume):
            prune(PruneConfig(model=str(student), task=self.cfg.task, out=str(out), glue_dir=self.glue_dir,
                              heads=p.heads, ffn=p.ffn, per_layer=p.per_layer, recover_epochs=p.recover_epochs,
                              max_train_examples=p.max_train_examples, max_length=self.cfg.max_length,
                              loop=LoopConfig(epochs=max(p.recover_epochs, 1), learning_rate=p.learning_rate,
                                              seed=self.cfg.seed)),
                  resume=resume, progress=self.progress)

        return self.stage("pruned", asdict(p), [str(student)], work)

    def export(self, model: Path) -> Path:
        from pipeline.export import ExportConfig, export

        e = self.cfg.export

        def work(out, resume):
            export(ExportConfig(model=str(model), out=str(out), task=self.cfg.task, glue_dir=self.glue_dir,
                                optimize=e.optimize, device=e.device, max_length=self.cfg.max_length),
                   progress=self.progress)

        return self.stage("onnx", asdict(e), [str(model)], work)

    def quantize(self, model: Path) -> Path:
        from pipeline.quantize import QuantizeConfig, quantize

        q = self.cfg.quantize

        def work(out, resume):
            quantize(QuantizeConfig(model=str(model), out=str(out), mode=q.mode, task=self.cfg.task,
                                    glue_dir=self.glue_dir, tolerance=q.tolerance, max_length=self.cfg.max_length),
                     progress=self.progress)

        return self.stage("int8", asdict(q), [str(model)], work)

    def bench(self, made: dict[str, Path]) -> Path:
        from pipeline.bench import ArtifactSpec, BenchConfig, benchmark_artifacts, write_bench

        b = self.cfg.bench
        specs = [ArtifactSpec(name, path) for name, path in made.items() if name != "report"]

        def work(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            all_specs = list(specs)
            if b.baseline:
                from pipeline.baseline import build_baseline

                built = build_baseline(self.out / "bert-base-baseline", task=self.cfg.task, hub_id=b.baseline_model)
                all_specs += [ArtifactSpec("bert-base-torch-fp32", built["torch_fp32"]),
                              ArtifactSpec("bert-base-ort-int8", built["ort_int8"])]
            result = benchmark_artifacts(all_specs, BenchConfig(
                batch_sizes=b.batch_sizes, seq_lens=b.seq_lens, min_iters=b.min_iters, min_seconds=b.min_seconds,
                max_seconds=b.max_seconds, threads=b.threads or self.cfg.threads, device=b.device),
                progress=self.progress)
            result.update(final="int8", teacher="teacher", command=shlex.join(sys.argv))
            write_bench(result, out / "bench.json")

        return self.stage("bench", asdict(b), [str(p) for p in made.values()], work, done_file="bench.json")

    def report(self, bench: Path) -> Path:
        from pipeline.report import ReportConfig, build_report

        def work(out, resume):
            data = json.loads((bench / "bench.json").read_text())
            build_report(data, out, ReportConfig(final="int8", teacher="teacher", command=data.get("command")))

        return self.stage("report", {}, [str(bench / "bench.json")], work, done_file="report.html")


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict[str, Path]:
    return Run(cfg, progress).run()
