"""Recipe: the whole pipeline as one job, into one run folder.

    teacher -> [general distillation] -> [augmentation] -> task distillation -> pruning -> ONNX export
            -> quantization -> [load test of the served artifact] -> BERT-base baseline -> bench -> report

The run config composes the stages' own config dataclasses (`FinetuneConfig`, `DistillConfig`, ...): a
section holds exactly the library's fields, and the settings every stage shares (task, glue_dir, seed,
max_length, threads) are set once at the top and interpolated into each section. Fields that wire one
stage's output into the next (`out`, `model`, ...) read "(set by the run)".

Each stage writes `RUN/<stage>/` and records in `RUN/stages.json` its fingerprint: the sha256 of the fully
resolved config the stage was called with, its inputs' checksums and the bertforge version. So a changed
setting, however new, rebuilds that stage and every stage after it (their inputs' checksums change); an
unchanged stage is skipped; an interrupted training stage resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.artifacts import MANIFEST, read_manifest
from pipeline.artifacts import sha256 as _sha256
from pipeline.bench import BenchConfig
from pipeline.budget import BudgetConfig
from pipeline.data import sample_data_dir
from pipeline.distill.augment import AugmentConfig
from pipeline.distill.config import DistillConfig, StudentSpec
from pipeline.errors import BertforgeError
from pipeline.export import ExportConfig
from pipeline.finetune import FinetuneConfig
from pipeline.prune import PruneConfig
from pipeline.quantize import QuantizeConfig
from pipeline.report import ReportConfig
from pipeline.settings import setting

WIRED = "(set by the run)"
# Top-level settings interpolated into every section that has a field of that name.
SHARED = {"task": "${task}", "glue_dir": "${glue_dir}", "max_length": "${max_length}", "seed": "${seed}",
          "num_threads": "${threads}", "threads": "${threads}"}


def _section(cls, not_shared: tuple[str, ...] = (), **values):
    """`cls` with the library's defaults, the shared settings interpolated and `values` on top."""
    required = {f.name: WIRED for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    cfg = cls(**{**required, **values})
    for name, ref in SHARED.items():
        if name not in not_shared and name not in values and hasattr(cfg, name):
            setattr(cfg, name, ref)
    if hasattr(cfg, "loop"):
        cfg.loop.seed = SHARED["seed"]
    return cfg


# A section is a stage's library config plus the run's switches for it (whether the stage runs at all).
@dataclass
class TeacherSection(FinetuneConfig):
    finetune: bool = setting(True, "fine-tune `model` on the task; false: `model` is already the teacher")


@dataclass
class GeneralSection(DistillConfig):
    enabled: bool = setting(False, "run general distillation on `corpus` before the task stage")


@dataclass
class AugmentSection(AugmentConfig):
    enabled: bool = setting(False, "augment the task's training set for task distillation")


@dataclass
class DistillSection(DistillConfig):
    distilled: str | None = setting(None, "an already distilled student folder: the stage is not run")


@dataclass
class PruneSection(PruneConfig):
    enabled: bool = setting(True, "prune the student")


@dataclass
class BenchSection(BenchConfig):
    enabled: bool = setting(True, "benchmark every artifact and write the report")
    baseline: bool = setting(True, "add BERT-base in PyTorch fp32 and ONNX Runtime int8")
    baseline_model: str = setting("bert-base-uncased", "hub id or folder of the baseline: a fine-tuned classifier is "
                                                       "the accurate baseline (scored on dev); `teacher`: the run's teacher, "
                                                       "as in the TinyBERT paper; a base model: speed and size only")


@dataclass
class LoadtestSection:
    """A load test of the final artifact, served on loopback: `bertforge serve` and `bertforge loadtest`
    run as subprocesses (Locust must never share a process with torch), their flags from these fields."""
    enabled: bool = setting(False, "serve the final artifact on loopback and load-test it; the report shows it")
    mode: str = setting("sweep", "sweep: capacity at the SLO (open-loop steps); closed: `users` closed-loop users",
                        choices=("sweep", "closed"))
    slo_ms: float = setting(100.0, "p99 latency objective whose knee the sweep finds")
    users: int = setting(8, "closed-loop users (sweep: of its first capacity estimate)")
    duration: str = setting("15s", "the closed run (sweep: its first estimate)")
    steps: str = setting("0.1,0.25,0.5,0.75,1,1.25,1.5", "sweep: offered rates as fractions of the estimate")
    step_duration: str = setting("10s", "sweep: seconds per offered rate")
    check_labels: bool = setting(True, "check every served label against the dev set and the artifact's offline answer")
    server_threads: int | None = setting(None, "the server's runtime threads (default: the run's threads)")


@dataclass
class RunConfig:
    out: str = "runs/quickstart"
    task: str = "sst2"
    glue_dir: str | None = None  # None: the SST-2 sample shipped with bertforge
    seed: int = 42
    threads: int | None = None
    max_length: int | None = None  # None: each task's default (64 single sentence, 128 pairs)
    teacher: TeacherSection = field(default_factory=lambda: _section(TeacherSection, model="all-MiniLM-L6-v2"))
    general: GeneralSection = field(default_factory=lambda: _section(
        GeneralSection, not_shared=("task", "glue_dir", "max_length"), stage="general", teacher="${teacher.model}",
        student=StudentSpec(config="tinybert-4l-312d")))
    augment: AugmentSection = field(default_factory=lambda: _section(AugmentSection, not_shared=("max_length",)))
    distill: DistillSection = field(default_factory=lambda: _section(
        DistillSection, stage="task", student=StudentSpec(init_from_teacher="3")))
    prune: PruneSection = field(default_factory=lambda: _section(PruneSection, heads=0.5, ffn=0.5, recover_epochs=1))
    export: ExportConfig = field(default_factory=lambda: _section(ExportConfig))
    quantize: QuantizeConfig = field(default_factory=lambda: _section(QuantizeConfig))
    bench: BenchSection = field(default_factory=lambda: _section(BenchSection, not_shared=("seed",), texts="${task}"))
    loadtest: LoadtestSection = field(default_factory=LoadtestSection)
    report: ReportConfig = field(default_factory=ReportConfig)
    # budget.max_drop set: the accuracy-budget search (pipeline/budget.py) replaces the fixed
    # distill -> prune -> export -> quantize stages; their sections still give the settings it varies from
    budget: BudgetConfig = field(default_factory=BudgetConfig)


# Keys of earlier run configs, so an old YAML file gets a pointer instead of "key not found".
RENAMED = {
    "teacher.epochs": "teacher.loop.epochs", "teacher.learning_rate": "teacher.loop.learning_rate",
    "teacher.batch_size": "teacher.loop.batch_size", "general.epochs": "general.loop.epochs",
    "general.learning_rate": "general.loop.learning_rate", "general.student_config": "general.student.config",
    "distill.student_config": "distill.student.config", "distill.init_from_teacher": "distill.student.init_from_teacher",
    "distill.batch_size": "distill.loop.batch_size", "prune.learning_rate": "prune.loop.learning_rate",
    **{f"{stage}.loop.mixed_precision": f"{stage}.loop.precision" for stage in ("teacher", "general", "distill", "prune")},
}


def _check_renamed(part) -> None:
    flat = OmegaConf.to_container(part, resolve=False) if part is not None else {}
    for key, new in RENAMED.items():
        *parents, name = key.split(".")
        node = flat
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            raise BertforgeError(f"bad run config: {key} is now {new}")
    if isinstance(flat.get("distill"), dict) and isinstance(flat["distill"].get("student"), str):
        raise BertforgeError("bad run config: distill.student (a distilled folder) is now distill.distilled")


# Fields the run fills with the previous stage's output: a value given for them would be ignored, so it is refused.
WIRED_FIELDS = {"teacher": ("out",), "general": ("out", "stage"), "augment": ("out",),
                "distill": ("out", "teacher", "stage"), "prune": ("out", "model"), "export": ("out", "model"),
                "quantize": ("out", "model")}


def _check_wired(cfg: RunConfig) -> None:
    for section, names in WIRED_FIELDS.items():
        defaults = getattr(RunConfig(), section)
        for name in names:
            if getattr(getattr(cfg, section), name) != getattr(defaults, name):
                raise BertforgeError(f"bad run config: {section}.{name} is set by the run (from the stage before it)")


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
        for part in parts[1:]:
            _check_renamed(part)
        cfg = OmegaConf.to_object(OmegaConf.merge(*parts))
    except BertforgeError:
        raise
    except Exception as e:  # omegaconf's validation errors: unknown key, wrong type
        raise BertforgeError(f"bad run config: {str(e).splitlines()[0]}") from None
    _check_wired(cfg)
    cfg.budget.check()
    return cfg


def final_stage_name(mode: str) -> str:
    """The last stage's folder, named for what it holds."""
    return "fp16" if mode == "fp16" else "int8"


def _library(cls, section, **wired):
    """The library config `cls` from a run section: its own fields only, with the run's wiring."""
    values = {f.name: getattr(section, f.name) for f in fields(cls)}
    return cls(**{**values, **wired})


def _version() -> str:
    try:
        return metadata.version("bertforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _input_id(path: str | None):
    """What an input contributes to a fingerprint: an artifact's manifest (it lists every file's sha256, and
    the settings and lineage that made them, so a rebuilt stage always rebuilds the ones after it), the
    sha256 of a plain file or of a folder's files, or the name itself (a hub id)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        if read_manifest(p) is not None:
            return _sha256(p / MANIFEST)
        return {str(f.relative_to(p)): _sha256(f) for f in sorted(p.rglob("*")) if f.is_file()}
    if p.is_file():
        return _sha256(p)
    return str(path)


class Run:
    """Runs the stages in order; `stages.json` in the run folder records what each produced.

    With `dry_run`, nothing is built: `plan` says, per stage, whether it would be rebuilt ("rebuild")
    or skipped ("up to date")."""

    def __init__(self, cfg: RunConfig, progress: bool = True, dry_run: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress, self.dry_run = progress, dry_run
        self.glue_dir = cfg.glue_dir or str(sample_data_dir())
        self.ledger_path = self.out / "stages.json"
        self.ledger: dict[str, Any] = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.plan: dict[str, str] = {}
        self._pending: list[Path] = []  # dry run: folders that would be rebuilt

    # -- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def fingerprint(name: str, config: dict, inputs: list) -> str:
        blob = json.dumps({"stage": name, "config": config, "inputs": inputs, "bertforge": _version()},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stage(self, name: str, config, inputs: list[str | None], work, done_file: str = "bertforge.json",
              wired: tuple[str, ...] = ("out",), extra: dict | None = None) -> Path:
        """Run `work(out_dir, resume)` unless its output exists with the same fingerprint. `config` is the
        library config the stage is called with; its `wired` fields (paths) enter through `inputs`."""
        folder = self.out / name
        settings = {k: v for k, v in asdict(config).items() if k not in wired} if config is not None else {}
        settings.update(extra or {})
        if self.dry_run and any(p and any(Path(p) == f or f in Path(p).parents for f in self._pending) for p in inputs):
            self.plan[name] = "rebuild"  # an input is rebuilt first: its checksums are not known yet
            self._pending.append(folder)
            return folder
        key = self.fingerprint(name, settings, [_input_id(p) for p in inputs])
        entry = self.ledger.get(name, {})
        if entry.get("fingerprint") == key and (folder / done_file).exists():
            self.plan[name] = "up to date"
            if not self.dry_run:
                print(f"[run] {name}: up to date, skipped", file=sys.stderr)
            return folder
        self.plan[name] = "rebuild"
        if self.dry_run:
            self._pending.append(folder)
            return folder
        resume = entry.get("fingerprint") == key and (folder / "checkpoints").is_dir()
        if entry.get("fingerprint") not in (None, key) and folder.exists():
            print(f"[run] {name}: settings or inputs changed, rebuilding", file=sys.stderr)
            shutil.rmtree(folder)
        print(f"[run] {name}: {'resuming' if resume else 'running'}", file=sys.stderr)
        self.ledger[name] = {"fingerprint": key, "status": "running", "config": settings}
        self._save_ledger()
        start = time.perf_counter()
        work(folder, resume)
        self.ledger[name].update(status="done", wall_s=round(time.perf_counter() - start, 1), built_at=time.time())
        self._save_ledger()
        return folder

    def _save_ledger(self) -> None:
        from pipeline.atomic import atomic_write_json  # a kill mid-write must not tear the ledger

        atomic_write_json(self.ledger_path, self.ledger, default=str)

    # -- the stages ----------------------------------------------------------------------------
    def run(self) -> dict[str, Path]:
        cfg = self.cfg
        if not self.dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if cfg.budget.max_drop is not None and (cfg.general.enabled or cfg.augment.enabled or cfg.distill.distilled):
            raise BertforgeError("the budget search distils its own students: turn off general, augment and "
                                 "distill.distilled")
        made: dict[str, Path] = {}
        made["teacher"] = self.teacher()
        general = self.general_distillation() if cfg.general.enabled else None
        train_file = self.augment() if cfg.augment.enabled else None
        if cfg.budget.max_drop is not None:
            final = "chosen"
            made[final] = self.budget(made["teacher"])
        else:
            made["student"] = self.task_distillation(made["teacher"], general, train_file)
            made["pruned"] = self.prune(made["student"], made["teacher"]) if cfg.prune.enabled else made["student"]
            made["onnx"] = self.export(made["pruned"])
            final = final_stage_name(cfg.quantize.mode)
            made[final] = self.quantize(made["onnx"], final)
        loadtest = self.loadtest(made[final]) if cfg.loadtest.enabled else None
        if cfg.bench.enabled:
            bench = self.bench(made, final)
            made["report"] = self.report(bench, final, loadtest)
        return made

    def teacher(self) -> Path:
        t = self.cfg.teacher
        if not t.finetune:
            return Path(t.model)
        from pipeline.finetune import finetune

        glue_dir, extra = t.glue_dir or self.glue_dir, None
        if self.cfg.budget.max_drop is not None:
            # The search measures every candidate's drop against the teacher on rows carved from train: a
            # teacher that trained on them would flatter itself there. It learns from the students' rows
            # (and is retrained when the carving changes: the folder's path stays the same).
            from pipeline.budget import selection_data, selection_wanted

            extra = {"selection": selection_wanted(self.cfg.budget, self.cfg.task, self.glue_dir, self.cfg.seed)}
            if not self.dry_run:
                selection_data(self.cfg.budget, self.cfg.task, self.glue_dir, self.cfg.seed, self.out / "budget")
            glue_dir = str(self.out / "budget" / "selection-data")
        config = _library(FinetuneConfig, t, out=WIRED, glue_dir=glue_dir)

        def work(out, resume):
            finetune(dataclasses.replace(config, out=str(out)), resume=resume, progress=self.progress)
            if extra:  # its best checkpoint was kept on carved rows: their score is "selection", dev is scored once
                from pipeline.evaluate import score_dev_once

                score_dev_once(out, self.cfg.task, self.glue_dir, self.cfg.max_length)

        return self.stage("teacher", config, [t.model], work, wired=("out", "model"), extra=extra)

    def general_distillation(self) -> Path:
        from pipeline.distill import distill

        g = self.cfg.general
        if not g.corpus:
            raise BertforgeError("general.enabled needs general.corpus (a text file, one text per line)")
        config = _library(DistillConfig, g, out=WIRED, stage="general")

        def work(out, resume):
            distill(dataclasses.replace(config, out=str(out)), resume=resume, progress=self.progress)

        return self.stage("general", config, [g.teacher, g.corpus], work, wired=("out", "teacher", "corpus"))

    def augment(self) -> Path:
        from pipeline.distill.augment import augment_dataset

        a = self.cfg.augment
        config = _library(AugmentConfig, a, out=WIRED, glue_dir=a.glue_dir or self.glue_dir)

        def work(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            augment_dataset(dataclasses.replace(config, out=str(out / "train.tsv")), progress=self.progress)

        folder = self.stage("augment", config, [a.input_file], work, done_file="train.tsv",
                            wired=("out", "input_file"))
        return folder / "train.tsv"

    def task_distillation(self, teacher: Path, general: Path | None, train_file: Path | None) -> Path:
        from pipeline.distill import distill

        d = self.cfg.distill
        if d.distilled:
            if read_manifest(d.distilled) is None:
                raise BertforgeError(f"distill.distilled {d.distilled} is not a bertforge artifact (no bertforge.json)")
            return Path(d.distilled)
        student = StudentSpec(pretrained=str(general)) if general is not None else d.student
        config = _library(DistillConfig, d, out=WIRED, stage="task", teacher=str(teacher), student=student,
                          glue_dir=d.glue_dir or self.glue_dir,
                          train_file=str(train_file) if train_file else d.train_file)

        def work(out, resume):
            distill(dataclasses.replace(config, out=str(out)), resume=resume, progress=self.progress)

        inputs = [str(teacher), str(general) if general else None, config.train_file]
        wired = ("out", "teacher", "train_file") + (("student",) if general is not None else ())
        return self.stage("student", config, inputs, work, wired=wired)

    def prune(self, student: Path, teacher: Path) -> Path:
        from pipeline.prune import prune

        p = self.cfg.prune
        config = _library(PruneConfig, p, out=WIRED, model=str(student), glue_dir=p.glue_dir or self.glue_dir)

        def work(out, resume):
            prune(dataclasses.replace(config, out=str(out)), resume=resume, progress=self.progress)

        return self.stage("pruned", config, [str(student)], work, wired=("out", "model"))

    def export(self, model: Path) -> Path:
        from pipeline.export import export

        e = self.cfg.export
        config = _library(ExportConfig, e, out=WIRED, model=str(model), glue_dir=e.glue_dir or self.glue_dir)

        def work(out, resume):
            export(dataclasses.replace(config, out=str(out)), progress=self.progress)

        return self.stage("onnx", config, [str(model)], work, wired=("out", "model"))

    def quantize(self, model: Path, name: str) -> Path:
        from pipeline.quantize import quantize

        q = self.cfg.quantize
        config = _library(QuantizeConfig, q, out=WIRED, model=str(model), glue_dir=q.glue_dir or self.glue_dir)

        def work(out, resume):
            quantize(dataclasses.replace(config, out=str(out)), progress=self.progress)

        return self.stage(name, config, [str(model)], work, wired=("out", "model"))

    def budget(self, teacher: Path) -> Path:
        """The accuracy-budget search. Not a fingerprinted stage: the search caches each candidate itself
        (RUN/budget/search.json), so a changed budget re-chooses among the candidates already built."""
        from pipeline.budget import SearchInputs, run_search

        cfg, folder = self.cfg, self.out / "budget"
        if self.dry_run:
            self.plan["budget"] = "search (built candidates reused)"
            self._pending.append(folder)
            return folder / "chosen"
        inputs = SearchInputs(
            out=folder, task=cfg.task, teacher=teacher, glue_dir=self.glue_dir, seed=cfg.seed, threads=cfg.threads,
            max_length=cfg.max_length,
            distill=_library(DistillConfig, cfg.distill, out=WIRED, teacher=str(teacher), stage="task"),
            prune=_library(PruneConfig, cfg.prune, out=WIRED, model=WIRED),
            export=_library(ExportConfig, cfg.export, out=WIRED, model=WIRED),
            quantize=_library(QuantizeConfig, cfg.quantize, out=WIRED, model=WIRED))
        print("[run] budget: searching", file=sys.stderr)
        start = time.perf_counter()
        result = run_search(cfg.budget, inputs, progress=self.progress)
        self.ledger["budget"] = {"status": "done", "chosen": result["chosen"], "max_drop": cfg.budget.max_drop,
                                 "wall_s": round(time.perf_counter() - start, 1), "built_at": time.time()}
        self._save_ledger()
        return folder / "chosen"

    def bench(self, made: dict[str, Path], final: str) -> Path:
        from pipeline.bench import ArtifactSpec, benchmark_artifacts, write_bench

        b = self.cfg.bench
        config = _library(BenchConfig, b, glue_dir=b.glue_dir or self.glue_dir)
        specs = [ArtifactSpec(name, path) for name, path in made.items() if name != "report"]

        def work(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            all_specs = list(specs)
            if b.baseline:
                from pipeline.baseline import build_baseline

                hub_id = str(made["teacher"]) if b.baseline_model == "teacher" else b.baseline_model
                built = build_baseline(self.out / "bert-base-baseline", task=self.cfg.task, hub_id=hub_id,
                                       glue_dir=config.glue_dir, max_length=config.max_length)
                all_specs += [ArtifactSpec("bert-base-torch-fp32", built["torch_fp32"]),
                              ArtifactSpec("bert-base-ort-int8", built["ort_int8"])]
            result = benchmark_artifacts(all_specs, config, progress=self.progress)
            result.update(final=final, teacher="teacher", command=shlex.join(sys.argv))
            write_bench(result, out / "bench.json")

        return self.stage("bench", config, [str(p) for p in made.values()], work, done_file="bench.json", wired=(),
                          extra={"baseline": b.baseline, "baseline_model": b.baseline_model, "final": final})

    def loadtest(self, final: Path) -> Path:
        lt = self.cfg.loadtest

        def work(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            serve_and_load(final, out, lt, self.cfg.task, self.glue_dir, lt.server_threads or self.cfg.threads)

        return self.stage("loadtest", lt, [str(final)], work, done_file="sweep.json" if lt.mode == "sweep" else
                          "summary.json", wired=(), extra={"task": self.cfg.task, "glue_dir": self.glue_dir,
                                                           "threads": lt.server_threads or self.cfg.threads})

    def report(self, bench: Path, final: str, loadtest: Path | None = None) -> Path:
        from pipeline.report import build_report

        sweeps = [str(loadtest / "sweep.json")] if loadtest is not None and self.cfg.loadtest.mode == "sweep" else []
        budget = self.out / "budget" / "budget.json"
        config = dataclasses.replace(self.cfg.report, final=self.cfg.report.final or final,
                                     teacher=self.cfg.report.teacher or "teacher",
                                     loadtest=list(self.cfg.report.loadtest) + sweeps,
                                     budget=self.cfg.report.budget or (str(budget) if final == "chosen" else None))

        def work(out, resume):
            data = json.loads((bench / "bench.json").read_text())
            build_report(data, out, dataclasses.replace(config, command=data.get("command")))

        return self.stage("report", config, [str(bench / "bench.json"), *config.loadtest, config.budget], work,
                          done_file="report.html", wired=("command", "loadtest", "budget"))


def serve_and_load(model: Path, out: Path, lt: LoadtestSection, task: str, glue_dir: str | None,
                   threads: int | None) -> None:
    """`bertforge serve` on a free loopback port, then `bertforge loadtest` against it, each its own process;
    the server is stopped as SIGTERM stops it (requests in flight answered). A load test whose labels
    disagree (exit 1) still leaves its figures, which the report shows; any other failure is an error."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "pipeline.cli"]
    serve = cli + ["serve", "--model", str(model), "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(serve + (["--threads", str(threads)] if threads else []), stdout=subprocess.DEVNULL,
                              stderr=open(out / "server.log", "w"))
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise BertforgeError(f"loadtest: the server exited ({server.returncode}); see {out / 'server.log'}")
            try:
                urllib.request.urlopen(f"{host}/readyz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BertforgeError("loadtest: the server was not ready within 180 s") from None
                time.sleep(0.5)
        args = cli + ["loadtest", "--host", host, "--mode", lt.mode, "--users", str(lt.users), "--spawn-rate",
                      str(lt.users), "--duration", lt.duration, "--task", task, "--out", str(out), "--name", model.name,
                      "--slo-ms", str(lt.slo_ms), "--steps", lt.steps, "--step-duration", lt.step_duration]
        args += (["--glue-dir", glue_dir] if glue_dir else []) + (["--check-labels", "--model", str(model)] if lt.check_labels else [])
        done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode not in (0, 1) or not (out / ("sweep.json" if lt.mode == "sweep" else "summary.json")).is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise BertforgeError(f"loadtest failed (exit {done.returncode}): {last}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict[str, Path]:
    return Run(cfg, progress).run()


def plan_pipeline(cfg: RunConfig) -> dict[str, str]:
    """Which stages a run of `cfg` would rebuild ("rebuild") and which it would skip ("up to date")."""
    run = Run(cfg, progress=False, dry_run=True)
    run.run()
    return run.plan
