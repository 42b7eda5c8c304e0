"""Recipe: the accuracy-budget search. The fastest (or smallest) artifact whose score stays within
`max_drop` points of the teacher's.

The compression settings form a tree, one level per step, cheap steps last:

    student depth -> head/FFN pruning -> vocabulary -> ONNX graph (fused or plain) -> quantization

Each node is a folder built from its parent's, so candidates that share a prefix share its work: one
student per depth, every pruning level of a student from one importance ranking, every quantization
variant from one exported graph. A leaf (an ONNX graph) is a candidate: it is scored on the validation
split and its batch-1 latency and size are measured. A step is a small `Step` (its options, a folder label,
a build function), so a new searched setting is one more entry in STEPS.

Selection never sees the dev set it reports. `validation_examples` training rows, carved by the seed,
are the selection split every candidate (and the teacher) is scored on; `checkpoint_examples` more, carved
apart, are the rows on which the training stages keep their best checkpoints. Both live in the selection
folder (`pipeline.data.split`): its `train` is what the students and the pruning recovery train on, its
`dev` the checkpoint rows, and `validation/` the selection split, which no training stage reads. (Scored
on the rows its checkpoints were chosen by, a model picked from many epochs looks better than it is.) The
chosen artifact is scored once on the real dev split afterwards; both scores are reported.

Everything is cached in `RUN/budget/search.json` by fingerprint (the step's settings and its parent's), so
an interrupted search resumes where it stopped (a half-trained student from its checkpoint) and another
budget over the same settings reuses every candidate: only the choice changes. A PyTorch node that already
misses the budget by more than `slack` points is not compressed further (its variants are recorded as
skipped); a larger budget later builds them.

The carved rows are a sample: with 1,000 of them one row is 0.1 point, and the fastest of forty candidates
measured "inside" the budget is often the one the sample flattered most. With `confidence` set, a candidate
counts as inside only if the one-sided upper bound of its drop is: a paired bootstrap over the carved rows
(teacher and candidate scored on the same resampled rows), so the chosen artifact's
budget holds on unseen rows at that confidence rather than on average.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import MANIFEST, Manifest, read_manifest, write_manifest
from pipeline.artifacts import sha256 as _sha256
from pipeline.errors import BertforgeError
from pipeline.settings import setting

QUANT_OPTIONS = ("fp32", "dynamic", "dynamic-per-channel", "static", "static-per-channel", "fallback")
GRAPH_OPTIONS = ("fused", "plain")
VOCAB_OPTIONS = ("full", "trimmed")


@dataclass
class BudgetConfig:
    max_drop: float | None = setting(None, "largest allowed loss against the teacher, in points of the task score "
                                           "(x100); null: no search, the fixed stages run")
    objective: str = setting("latency", "keep the lowest batch-1 latency or the smallest size on disk",
                             choices=("latency", "size"))
    max_latency_ms: float | None = setting(None, "optional ceiling on batch-1 latency (ms)")
    max_size_mb: float | None = setting(None, "optional ceiling on the model file size (MB)")
    depths: list[int] = setting(help="student depths: layers copied from the teacher, each distilled (the teacher's "
                                     "own depth: the teacher itself, not distilled)",
                                factory=lambda: [2, 3, 4])
    heads: list[float] = setting(help="fractions of attention heads to prune (0: none)", factory=lambda: [0.0, 0.5])
    ffn: list[float] = setting(help="fractions of FFN neurons to prune (0: none)", factory=lambda: [0.0, 0.5])
    prune_grid: bool = setting(True, "every heads x ffn pair; false: pair them in order (heads[i], ffn[i])")
    vocab: list[str] = setting(help="full | trimmed (the word pieces of the training rows, pipeline/vocab.py)",
                               factory=lambda: ["full", "trimmed"])
    vocab_reserve: int = setting(1000, "trimmed: pieces kept beyond those the training rows use")
    graphs: list[str] = setting(help="fused (onnxruntime BERT fusions) | plain", factory=lambda: list(GRAPH_OPTIONS))
    quantize: list[str] = setting(help=f"{' | '.join(QUANT_OPTIONS)} (fallback: dynamic int8 with the most "
                                       "sensitive nodes kept float)",
                                  factory=lambda: ["fp32", "dynamic", "static", "static-per-channel", "fallback"])
    fallback_tolerance: float = setting(0.005, "fallback: allowed relative score drop of the int8 graph")
    validation_examples: int = setting(1000, "training rows carved (by the seed) as the selection split")
    validation_min_words: int = setting(0, "carve only training rows of at least this many words (SST-2's train "
                                           "is mostly short phrases, its dev whole sentences: 10 makes them alike)")
    validation_disjoint: bool = setting(True, "carve whole sentences only and drop their phrases from training "
                                              "(SST-2's train holds sentences with their sub-phrases: without "
                                              "this most carved rows are inside a training row)")
    checkpoint_examples: int | None = setting(None, "training rows carved apart from the selection split, on which "
                                                    "every training stage (teacher, students, pruning recovery) "
                                                    "keeps its best checkpoint; null: as many as validation_examples; "
                                                    "0: the selection rows themselves (flatters the candidates with "
                                                    "the most checkpoints)")
    max_train_examples: int | None = setting(None, "training rows left for the students and pruning (default: all)")
    slack: float = setting(1.0, "a PyTorch node missing the budget by more points than this is not compressed further")
    confidence: float | None = setting(None, "inside the budget only if the drop's one-sided upper bound at this "
                                             "confidence is (paired bootstrap over the carved rows, e.g. 0.9); "
                                             "null: the measured drop")
    bootstrap_resamples: int = setting(1000, "resamples of the confidence bound")
    latency_seq_len: int = setting(128, "sequence length of the batch-1 latency")
    latency_seconds: float = setting(1.0, "measured seconds per candidate (round robin with the others)")

    def check(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise BertforgeError(f"budget.max_drop must be >= 0 points, got {self.max_drop}")
        for name, allowed in (("quantize", QUANT_OPTIONS), ("graphs", GRAPH_OPTIONS), ("vocab", VOCAB_OPTIONS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise BertforgeError(f"budget.{name}: choose from {', '.join(allowed)} (got {bad or 'nothing'})")
        if self.confidence is not None and not 0.5 <= self.confidence < 1:
            raise BertforgeError(f"budget.confidence: a probability in [0.5, 1), got {self.confidence}")
        if self.checkpoint_examples is not None and self.checkpoint_examples < 0:
            raise BertforgeError(f"budget.checkpoint_examples: 0 or more rows, got {self.checkpoint_examples}")
        if self.bootstrap_resamples < 100:
            raise BertforgeError(f"budget.bootstrap_resamples: at least 100, got {self.bootstrap_resamples}")
        if not self.depths or min(self.depths) < 1:
            raise BertforgeError("budget.depths: one or more layer counts >= 1")
        if not self.prune_grid and len(self.heads) != len(self.ffn):
            raise BertforgeError("budget.prune_grid false pairs heads[i] with ffn[i]: give lists of one length")
        for name in ("heads", "ffn"):
            if not getattr(self, name) or not all(0 <= f < 1 for f in getattr(self, name)):
                raise BertforgeError(f"budget.{name}: fractions in [0, 1)")


@dataclass
class SearchInputs:
    """What the run hands the search: the teacher, the data, and each stage's library config (its
    `out`, `model`, `teacher` and `glue_dir` are set per node)."""
    out: Path
    task: str
    teacher: Path
    glue_dir: str
    seed: int
    distill: Any
    prune: Any
    export: Any
    quantize: Any
    threads: int | None = None
    max_length: int | None = None


@dataclass
class Step:
    """One searched setting: its options, the folder label of an option, and how a node is built from its
    parent folder (returning the parent itself when the option changes nothing)."""
    name: str
    options: Callable[[BudgetConfig], list]
    label: Callable[[Any], str]
    build: Callable[["Search", Path, Any, Path], Path]
    applies: Callable[[dict], bool] = lambda chosen: True  # on the settings chosen so far
    torch_output: bool = True  # the node is a PyTorch model (scored before its subtree is built)


# -- the steps ------------------------------------------------------------------------------------

def _build_student(s: "Search", parent: Path, depth: int, out: Path) -> Path:
    from pipeline.distill import distill
    from pipeline.distill.config import StudentSpec
    from pipeline.models import load_config

    if depth >= load_config(s.inputs.teacher).num_hidden_layers:
        return s.inputs.teacher  # as deep as the teacher: the teacher itself, compressed by the later steps
    cfg = dataclasses.replace(s.inputs.distill, out=str(out), teacher=str(s.inputs.teacher), stage="task",
                              glue_dir=str(s.data_dir), task=s.inputs.task, train_file=None,
                              student=StudentSpec(init_from_teacher=str(depth)))
    distill(cfg, resume=(out / "checkpoints").is_dir(), progress=s.progress)
    if "selection" not in read_manifest(out).metrics:  # its "dev" was the checkpoint rows: name them so (no dev score)
        from pipeline.evaluate import name_selection

        name_selection(out)
    return out


def _build_pruned(s: "Search", parent: Path, ratios: tuple[float, float], out: Path) -> Path:
    from pipeline.prune import prune

    heads, ffn = ratios
    if not heads and not ffn:
        return parent
    cfg = dataclasses.replace(s.inputs.prune, model=str(parent), out=str(out), glue_dir=str(s.data_dir),
                              task=s.inputs.task, heads=heads, ffn=ffn, target_params=None,
                              eval_dev=False)  # the search scores every node on the validation rows itself
    prune(cfg, resume=(out / "checkpoints").is_dir(), progress=s.progress, importance=s.importance(parent, cfg))
    return out


def _build_vocab(s: "Search", parent: Path, option: str, out: Path) -> Path:
    from pipeline.vocab import trim_vocab

    if option == "full":
        return parent
    # the pieces of every training row outside the validation split (not only the rows the students train
    # on: trimming costs no training); [UNK] losses are reported on the validation rows
    trim_vocab(parent, out, s.rows_outside_validation, reserve=s.cfg.vocab_reserve, dev=s.validation,
               task=s.task.name)
    return out


def _build_graph(s: "Search", parent: Path, option: str, out: Path) -> Path:
    from pipeline.export import export

    export(dataclasses.replace(s.inputs.export, model=str(parent), out=str(out), glue_dir=str(s.data_dir),
                               task=s.inputs.task, optimize="O2" if option == "fused" else "none", device="cpu",
                               evaluate_dev=False), progress=False)
    return out


def _build_quant(s: "Search", parent: Path, option: str, out: Path) -> Path:
    from pipeline.quantize import quantize

    if option == "fp32":
        return parent
    mode = "static" if option.startswith("static") else "dynamic"
    cfg = dataclasses.replace(s.inputs.quantize, model=str(parent), out=str(out), glue_dir=str(s.data_dir),
                              task=s.inputs.task, mode=mode, per_channel=option.endswith("per-channel"),
                              tolerance=s.cfg.fallback_tolerance if option == "fallback" else None,
                              eval_examples=64, seed=s.inputs.seed)
    quantize(cfg, progress=False)
    return out


def _ratio_label(r: tuple[float, float]) -> str:
    return f"h{round(100 * r[0])}-f{round(100 * r[1])}"


STEPS: list[Step] = [
    Step("depth", lambda c: list(c.depths), lambda d: f"L{d}", _build_student),
    Step("prune", lambda c: [(h, f) for h in c.heads for f in c.ffn] if c.prune_grid else list(zip(c.heads, c.ffn)),
         _ratio_label, _build_pruned),
    Step("vocab", lambda c: list(c.vocab), lambda v: f"v-{v}", _build_vocab),
    Step("graph", lambda c: list(c.graphs), str, _build_graph, torch_output=False),
    # static QDQ needs the plain graph; ORT fuses its QDQ pairs itself
    Step("quantize", lambda c: list(c.quantize), str, _build_quant,
         applies=lambda chosen: not (chosen["quantize"].startswith("static") and chosen["graph"] == "fused"),
         torch_output=False),
]


# -- the search -----------------------------------------------------------------------------------

def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _points(score: float | None) -> float | None:
    return None if score is None else round(100 * score, 3)


class Search:
    def __init__(self, cfg: BudgetConfig, inputs: SearchInputs, progress: bool = True):
        from pipeline.data import get_task

        cfg.check()
        if cfg.max_drop is None:
            raise BertforgeError("the budget search needs budget.max_drop (points)")
        self.cfg, self.inputs, self.progress = cfg, inputs, progress
        self.task = get_task(inputs.task)
        self.max_length = inputs.max_length or self.task.default_max_length
        self.root = Path(inputs.out)
        self.data_dir = self.root / "selection-data"
        self.nodes_dir = self.root / "candidates"
        self.state_path = self.root / "search.json"
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.state.setdefault("nodes", {})
        self._importance: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[budget] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        from pipeline.atomic import atomic_write_json

        atomic_write_json(self.state_path, self.state, indent=1, default=str)

    # -- the selection split and the teacher --------------------------------------------------
    def prepare(self) -> None:
        from pipeline.data import load_glue

        split = selection_data(self.cfg, self.task.name, self.inputs.glue_dir, self.inputs.seed, self.root)
        if self.state.get("split") != split:
            self.state = {"nodes": {}, "split": split}  # other data: every node is stale
            self.save()
        self.validation = load_glue(self.task.name, "dev", self.data_dir / "validation")  # no training stage reads it
        teacher_id = _input_id(self.inputs.teacher)
        if self.state.get("teacher", {}).get("id") != teacher_id:
            self.log("scoring the teacher on the validation split")
            self.state["teacher"] = {"id": teacher_id, "path": str(self.inputs.teacher),
                                     "validation": self.score(self.inputs.teacher)}
            self.save()

    @functools.cached_property
    def rows_outside_validation(self) -> list:
        """Every training row outside the carved split; carved once per search (the disjoint carve of SST-2
        takes about 14 s, and every trimmed vocabulary asks)."""
        from pipeline.data import load_glue
        from pipeline.data.split import carve_validation

        train = load_glue(self.task.name, "train", self.inputs.glue_dir)
        return carve_validation(train, self.cfg.validation_examples, self.inputs.seed, self.cfg.validation_min_words,
                                self.cfg.validation_disjoint)[0]

    def score(self, folder: Path, need_predictions: bool = False) -> dict:
        """Metrics on the carved validation rows (never dev), once per artifact; its predictions are kept
        beside them for the confidence bound (a search saved before they were is rescored when one is asked)."""
        from pipeline.evaluate import evaluate

        scores = self.state.setdefault("validation_scores", {})
        predictions = self.state.setdefault("validation_predictions", {})
        key = _input_id(folder)
        if key not in scores or (need_predictions and key not in predictions):
            result = evaluate(str(folder), self.task.name, examples=self.validation, max_length=self.max_length,
                              progress=False)
            scores[key], predictions[key] = result.metrics, result.predictions.tolist()
        return scores[key]

    def predictions(self, folder: Path) -> list:
        self.score(folder, need_predictions=True)
        return self.state["validation_predictions"][_input_id(folder)]

    def importance(self, student: Path, cfg) -> tuple:
        """One head/FFN ranking per student, every pruning level cut from it (kept on disk for a resume)."""
        import torch

        from pipeline.data import load_glue
        from pipeline.models import load_model, load_tokenizer
        from pipeline.prune import rank_units

        # named for the student's content and the scoring settings: a rebuilt student is never cut by a stale ranking
        tag = _key(_input_id(student), cfg.importance_examples, cfg.importance_batch_size, cfg.loop.seed, self.max_length)
        path = self.nodes_dir / f"{student.name}.{tag}.importance.pt"
        if str(path) not in self._importance:
            if path.is_file():
                saved = torch.load(path, weights_only=True)
                self._importance[str(path)] = (saved["heads"], saved["ffn"])
            else:
                train = load_glue(self.task.name, "train", self.data_dir)
                heads, ffn = rank_units(cfg, load_model(student), load_tokenizer(student), self.task, train,
                                        self.max_length)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"heads": heads, "ffn": ffn}, path)
                self._importance[str(path)] = (heads, ffn)
        return self._importance[str(path)]

    # -- building -------------------------------------------------------------------------------
    def teacher_points(self) -> float:
        return _points(self.state["teacher"]["validation"]["score"])

    def drop_of(self, metrics: dict) -> float:
        return round(self.teacher_points() - _points(metrics["score"]), 3)

    def stage_settings(self, step: Step) -> dict:
        """The library settings a step's nodes depend on (besides the option): a change rebuilds them."""
        def plain(c, *drop):
            return {k: v for k, v in asdict(c).items() if k not in ("out", "model", "teacher", "glue_dir", *drop)}

        def later(settings: dict, **defaults) -> dict:
            # settings added after searches were cached count only once moved off their default, so a
            # cached search keeps its nodes (their fingerprints are what they were built under)
            return {k: v for k, v in settings.items() if k not in defaults or v != defaults[k]}

        return {"depth": lambda: plain(self.inputs.distill, "num_threads", "eval_batch_size"),
                "prune": lambda: later(plain(self.inputs.prune, "num_threads", "eval_batch_size", "eval_dev"),
                                       attention_weight=1.0),
                "vocab": lambda: {"reserve": self.cfg.vocab_reserve},
                "graph": lambda: plain(self.inputs.export),
                "quantize": lambda: {**plain(self.inputs.quantize), "fallback_tolerance": self.cfg.fallback_tolerance},
                }[step.name]()

    def run(self) -> dict:
        start = time.perf_counter()
        self.prepare()
        leaves: list[dict] = []
        skipped: list[dict] = []
        self._expand(0, self.inputs.teacher, self.state["teacher"]["id"], {}, [], leaves, skipped)
        self.measure_latency(leaves)
        result = self.choose(leaves)
        result["skipped"] = skipped
        result["wall_s_this_run"] = round(time.perf_counter() - start, 1)
        self.state.setdefault("wall_s_total", 0.0)
        self.state["wall_s_total"] = round(self.state["wall_s_total"] + result["wall_s_this_run"], 1)
        result["wall_s_total"] = self.state["wall_s_total"]
        self.save()
        return result

    def _expand(self, level: int, parent: Path, parent_key: str, chosen: dict, labels: list[str],
                leaves: list[dict], skipped: list[dict], hopeless: str | None = None) -> None:
        """Build (or take from the cache) every node below `parent`. Under a `hopeless` node (a PyTorch model
        already out of the budget by more than `slack`) nothing new is built; what earlier runs built still counts."""
        if level == len(STEPS):
            leaves.append(self.state["nodes"][parent_key])
            return
        step = STEPS[level]
        settings = self.stage_settings(step)
        for option in step.options(self.cfg):
            here = {**chosen, step.name: option}
            if not step.applies(here):
                continue
            names = labels + [step.label(option)]
            key = _key(parent_key, step.name, option, settings)
            if hopeless and not self._is_built(key):
                skipped.append({"node": "__".join(names), "why": hopeless})
                continue
            node = self.build(step, parent, option, key, names, here)
            why = hopeless
            if why is None and step.torch_output:
                miss = self.drop_of(node["validation"]) - self.cfg.max_drop
                if miss > self.cfg.slack:
                    why = (f"{'__'.join(names)} is {miss:.2f} points over the budget as a PyTorch model "
                           f"(slack {self.cfg.slack:g}): not compressed further")
            self._expand(level + 1, Path(node["folder"]), key, here, names, leaves, skipped, why)

    def _is_built(self, key: str) -> bool:
        node = self.state["nodes"].get(key)
        return bool(node and node.get("status") == "done" and (Path(node["folder"]) / "config.json").is_file())

    def build(self, step: Step, parent: Path, option, key: str, names: list[str], chosen: dict) -> dict:
        node = self.state["nodes"].get(key)
        if self._is_built(key):
            return node
        out = self.nodes_dir / "__".join(names)
        if out.exists() and (node is None or not (out / "checkpoints").is_dir()):
            shutil.rmtree(out)  # a node of other settings, or a killed one with nothing to resume from
        self.log(f"building {out.name}")
        self.state["nodes"][key] = node = {"name": out.name, "status": "running", "settings": dict(chosen)}
        self.save()
        t0 = time.perf_counter()
        folder = step.build(self, parent, option, out)
        node.update(folder=str(folder), build_s=round(time.perf_counter() - t0, 1),
                    same_as_parent=folder == parent, built_at=time.time())
        node["validation"] = self.score(folder)
        if not step.torch_output:
            node["size_bytes"] = _model_bytes(folder)
        node["status"] = "done"
        self.save()
        return node

    # -- measuring and choosing -----------------------------------------------------------------
    def measure_latency(self, leaves: list[dict]) -> None:
        """Batch-1 latency of every candidate not yet measured, side by side (round robin)."""
        from pipeline.bench import BenchConfig, make_inputs, run_grid_point, usable_cores
        from pipeline.inference import load_runtime

        todo = [n for n in leaves if n.get("latency_ms") is None]
        if not todo:
            return
        self.log(f"measuring batch-1 latency of {len(todo)} candidates")
        threads = self.inputs.threads or usable_cores()
        runners, inputs = [], {}
        for n in todo:
            runtime = load_runtime(n["folder"], "cpu", threads)
            runners.append((n["name"], runtime))
            seq = min(self.cfg.latency_seq_len, runtime.config.max_position_embeddings)
            inputs[n["name"]] = make_inputs(runtime.config.vocab_size, 1, seq, self.inputs.seed)
        bench = BenchConfig(warmup=3, min_iters=10, min_seconds=self.cfg.latency_seconds, max_seconds=30,
                            slice_seconds=0.05, threads=threads, device="cpu")
        samples = run_grid_point(runners, inputs, "cpu", bench)
        import numpy as np

        for n in todo:
            n["latency_ms"] = round(float(np.median(samples[n["name"]])) * 1000, 4)
            n["latency_threads"] = threads
        self.save()

    def drop_bound(self, folder: Path) -> float:
        """The candidate's drop against the teacher, upper bound at `confidence` (points)."""
        labels = [ex.label for ex in self.validation]
        return drop_upper_bound(self.task.name, self.predictions(self.inputs.teacher), self.predictions(folder),
                                labels, self.cfg.confidence, self.cfg.bootstrap_resamples, self.inputs.seed)

    def choose(self, leaves: list[dict]) -> dict:
        cfg = self.cfg
        rows = []
        if cfg.confidence is not None:
            self.log(f"bounding the drops at confidence {cfg.confidence:g}")
        # the share of carved rows whose answer differs from the teacher's: an accuracy can move by no more, so
        # it shows how far a small split's drop can be trusted (regression tasks have no answers to compare)
        teacher_answers = None if self.task.is_regression else self.predictions(self.inputs.teacher)
        for n in leaves:
            drop = self.drop_of(n["validation"])
            changed = None if teacher_answers is None else round(sum(
                a != b for a, b in zip(self.predictions(Path(n["folder"])), teacher_answers)) / len(teacher_answers), 4)
            bound = self.drop_bound(Path(n["folder"])) if cfg.confidence is not None else None
            misses = []
            if (drop if bound is None else bound) > cfg.max_drop:
                misses.append(f"drop {drop:.2f} > {cfg.max_drop:g} points" if bound is None else
                              f"drop bound {bound:.2f} > {cfg.max_drop:g} points (measured {drop:.2f})")
            if cfg.max_latency_ms is not None and n["latency_ms"] > cfg.max_latency_ms:
                misses.append(f"latency {n['latency_ms']:.2f} > {cfg.max_latency_ms:g} ms")
            if cfg.max_size_mb is not None and n["size_bytes"] / 1e6 > cfg.max_size_mb:
                misses.append(f"size {n['size_bytes'] / 1e6:.2f} > {cfg.max_size_mb:g} MB")
            rows.append({"name": n["name"], "folder": n["folder"], "settings": n["settings"],
                         "validation_score": n["validation"]["score"], "validation_metrics": n["validation"],
                         "validation_drop_points": drop, "validation_drop_bound_points": bound,
                         "validation_answers_changed": changed,
                         "latency_ms": n["latency_ms"], "size_bytes": n["size_bytes"],
                         "build_s": n.get("build_s"), "feasible": not misses, "misses": misses})
        order = (lambda r: (r["latency_ms"], r["size_bytes"])) if cfg.objective == "latency" else \
            (lambda r: (r["size_bytes"], r["latency_ms"]))
        feasible = sorted((r for r in rows if r["feasible"]), key=order)
        front = pareto_front(rows)
        for r in rows:
            r["on_front"] = r["name"] in front
        result = {"budget": asdict(cfg), "task": self.task.name, "split": self.state["split"],
                  "teacher": {"path": self.state["teacher"]["path"],
                              "validation_score": self.state["teacher"]["validation"]["score"]},
                  "budget_line_validation": round((self.teacher_points() - cfg.max_drop) / 100, 6),
                  "latency": {"batch_size": 1, "seq_len": cfg.latency_seq_len,
                              "threads": leaves[0].get("latency_threads") if leaves else None,
                              "note": "median of calls taken in turns with the other candidates measured in the same "
                                      "run; candidates measured in earlier runs keep their figures"},
                  "candidates": rows, "chosen": feasible[0]["name"] if feasible else None}
        if not feasible:
            key = "validation_drop_points" if cfg.confidence is None else "validation_drop_bound_points"
            best = min(rows, key=lambda r: r[key], default=None)
            what = "drop" if cfg.confidence is None else f"drop bound at confidence {cfg.confidence:g}"
            result["why_none"] = (f"no candidate within {cfg.max_drop:g} points" +
                                  (f" (the closest, {best['name']}: {what} {best[key]:.2f})"
                                   if best else " (every node was skipped)"))
        return result


def drop_upper_bound(task: str, teacher: list, candidate: list, labels: list, confidence: float,
                     resamples: int = 1000, seed: int = 0) -> float:
    """One-sided upper bound (points) of teacher score minus candidate score at `confidence`: a paired
    percentile bootstrap over the rows, the task's metric recomputed on each resample. The resamples are
    fixed by `seed` (and the row count), so every candidate of a search is bounded on the same ones."""
    return drop_quantiles(task, teacher, candidate, labels, [confidence], resamples, seed)[0]


def drop_interval(task: str, teacher: list, candidate: list, labels: list, level: float = 0.9,
                  resamples: int = 1000, seed: int = 0) -> list[float]:
    """Two-sided `level` interval (points) of teacher score minus candidate score, by the same paired
    bootstrap: how far the one dev figure could be from the drop on more rows like them."""
    tail = (1 - level) / 2
    return drop_quantiles(task, teacher, candidate, labels, [tail, 1 - tail], resamples, seed)


def drop_quantiles(task: str, teacher: list, candidate: list, labels: list, qs: list[float],
                   resamples: int = 1000, seed: int = 0) -> list[float]:
    import numpy as np

    t, c, y = np.asarray(teacher), np.asarray(candidate), np.asarray(labels)
    if np.array_equal(t, c):
        return [0.0] * len(qs)  # the same answers on every row: no resample can tell them apart
    idx = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    drops = 100 * (resampled_scores(task, t[idx], y[idx]) - resampled_scores(task, c[idx], y[idx]))
    return [round(float(q), 3) for q in np.quantile(drops, qs)]


def resampled_scores(task: str, preds, gold):
    """The task's score (pipeline.data.compute_metrics) of each row of [resamples, rows] arrays at once:
    sklearn's per-call cost, a thousand times per candidate, would dominate a search's choice. Accuracy,
    binary F1 and Matthews are computed from counts (0 where undefined, as sklearn returns);
    correlations go through compute_metrics row by row (0 where undefined too: a NaN would compare as
    "inside" any budget)."""
    import warnings

    import numpy as np

    from pipeline.data import compute_metrics, get_task

    spec = get_task(task)
    if spec.is_regression:
        with np.errstate(all="ignore"), warnings.catch_warnings():  # constant predictions: no correlation
            warnings.simplefilter("ignore")
            scores = np.array([compute_metrics(task, p, g)["score"] for p, g in zip(preds, gold)])
        return np.nan_to_num(scores, nan=0.0)
    tp = ((preds == 1) & (gold == 1)).sum(1).astype(float)
    tn = ((preds == 0) & (gold == 0)).sum(1).astype(float)
    fp = ((preds == 1) & (gold == 0)).sum(1).astype(float)
    fn = ((preds == 0) & (gold == 1)).sum(1).astype(float)
    values = []
    for name in spec.metrics:
        if name == "accuracy":
            values.append((preds == gold).mean(1))
        elif name == "f1":
            values.append(np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0))
        elif name == "matthews_correlation":
            denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            values.append(np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(tp), where=denom > 0))
        else:
            raise ValueError(f"no resampled form of {name}")
    return np.mean(values, axis=0)


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the candidates no other one beats on both validation score and latency."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r["latency_ms"], -r["validation_score"])):
        if r["validation_score"] > best:
            front.append(r["name"])
            best = r["validation_score"]
    return front


def _model_bytes(folder: Path) -> int:
    from pipeline.bench import ArtifactSpec, artifact_info

    return artifact_info(ArtifactSpec(folder.name, folder))["model_bytes"]


def _input_id(path: Path) -> str:
    p = Path(path)
    if (p / MANIFEST).is_file():
        return _sha256(p / MANIFEST)
    if p.is_dir():
        return _key({str(f.relative_to(p)): _sha256(f) for f in sorted(p.rglob("*")) if f.is_file()})
    return str(path)


def selection_wanted(cfg: BudgetConfig, task: str, glue_dir: str | None, seed: int) -> dict:
    """What fixes the selection split: the training file's checksum and the carving settings."""
    from pipeline.data import get_task, sample_data_dir

    spec = get_task(task)
    train_file = Path(glue_dir or sample_data_dir()) / spec.folder / f"{spec.splits['train']}.tsv"
    return {"task": spec.name, "glue_train_sha256": _sha256(train_file), "validation_examples": cfg.validation_examples,
            "seed": seed, "max_train": cfg.max_train_examples, "min_words": cfg.validation_min_words,
            "disjoint": cfg.validation_disjoint, "checkpoint_examples": _checkpoint_rows(cfg)}


def _checkpoint_rows(cfg: BudgetConfig) -> int:
    return cfg.validation_examples if cfg.checkpoint_examples is None else cfg.checkpoint_examples


def selection_data(cfg: BudgetConfig, task: str, glue_dir: str | None, seed: int, root: Path) -> dict:
    """Carve the selection split into `root/selection-data` (once per settings; the run's teacher stage
    calls this too, so that a teacher fine-tuned by the run never sees the carved rows). Returns what
    was carved: the settings asked for ("wanted"), sizes and checksums."""
    from pipeline.data import get_task
    from pipeline.data.split import write_selection_dir

    spec = get_task(task)
    wanted = selection_wanted(cfg, task, glue_dir, seed)
    folder, record = Path(root) / "selection-data", Path(root) / "selection-data" / "split.json"
    if record.is_file() and (folder / "validation" / spec.folder / "dev.tsv").is_file():
        split = json.loads(record.read_text())
        if split.get("wanted") == wanted:
            return split
    info = write_selection_dir(spec.name, glue_dir, folder, cfg.validation_examples, seed, cfg.max_train_examples,
                               cfg.validation_min_words, cfg.validation_disjoint, _checkpoint_rows(cfg))
    split = {"wanted": wanted, **info}
    _write(record, split)
    return split


def run_search(cfg: BudgetConfig, inputs: SearchInputs, progress: bool = True) -> dict:
    """Search, choose, publish the chosen artifact as `out/chosen` (scored once on dev), and write
    `out/budget.json`. Raises when no candidate fits the budget (budget.json says why)."""
    from pipeline.evaluate import evaluate

    search = Search(cfg, inputs, progress)
    result = search.run()
    out = Path(inputs.out)
    if result["chosen"] is None:
        _write(out / "budget.json", result)
        raise BertforgeError(f"budget search: {result['why_none']}; see {out / 'budget.json'}")
    row = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    dev, answers = {}, {}
    for name, folder in (("chosen", Path(row["folder"])), ("teacher", Path(inputs.teacher))):
        # cached with its answers, so that another budget over the same candidates neither re-scores dev nor
        # loses the paired interval below
        cached = search.state.setdefault("dev_scores", {}).get(_input_id(folder))
        if not cached or "predictions" not in cached:
            scored = evaluate(str(folder), search.task.name, inputs.glue_dir, max_length=search.max_length,
                              progress=False)
            cached = {"metrics": scored.metrics, "predictions": scored.predictions.tolist()}
            search.state["dev_scores"][_input_id(folder)] = cached
        dev[name], answers[name] = cached["metrics"], cached["predictions"]
    search.save()
    from pipeline.data import dev_split, load_glue

    labels = [ex.label for ex in load_glue(search.task.name, dev_split(search.task), inputs.glue_dir)]
    result["dev"] = {"chosen": dev["chosen"], "teacher": dev["teacher"],
                     "dev_drop_points": round(_points(dev["teacher"]["score"]) - _points(dev["chosen"]["score"]), 3),
                     # dev is small (MRPC: 408 rows), so the one drop comes with its paired 90% interval
                     "dev_drop_interval_90": drop_interval(search.task.name, answers["teacher"], answers["chosen"],
                                                           labels, 0.9, cfg.bootstrap_resamples, inputs.seed),
                     "note": "scored once, after the choice; the choice used the validation split only"}
    if row["settings"].get("vocab") == "trimmed":  # how much of dev the trimmed tokenizer spells as [UNK]
        from pipeline.models import load_tokenizer
        from pipeline.vocab import lost_to_unk

        result["dev"]["unk"] = lost_to_unk(load_tokenizer(inputs.teacher), load_tokenizer(row["folder"]),
                                           load_glue(search.task.name, dev_split(search.task), inputs.glue_dir))
    chosen = _publish_chosen(Path(row["folder"]), out / "chosen", row, result)
    result["chosen_folder"] = str(chosen)
    _write(out / "budget.json", result)
    return result


def _publish_chosen(src: Path, dst: Path, row: dict, result: dict) -> Path:
    """A copy of the chosen candidate whose manifest says how it was chosen (and on which rows)."""
    parent = read_manifest(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MANIFEST, "checkpoints", "importance.pt"))
    write_manifest(tmp, Manifest(
        stage="budget", task=result["task"], format=parent.format if parent else "onnx",
        precision=parent.precision if parent else "fp32", parent=str(src),
        params={"settings": row["settings"], "max_drop_points": result["budget"]["max_drop"],
                "objective": result["budget"]["objective"], "selection_split": result["split"],
                "validation_drop_points": row["validation_drop_points"], "latency_ms_b1": row["latency_ms"]},
        metrics={"dev": result["dev"]["chosen"], "validation": row["validation_metrics"]},
        num_parameters=parent.num_parameters if parent else None, seed=result["split"]["seed"]))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.replace(dst)
    return dst


def _write(path: Path, obj: dict) -> None:
    from pipeline.atomic import atomic_write_json

    atomic_write_json(path, obj, indent=1, default=str)
