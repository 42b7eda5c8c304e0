"""Recipe: structured pruning of attention heads and FFN neurons, optionally followed by recovery
distillation from the unpruned model; or unstructured magnitude pruning.

Recovery (`recovery`): `prediction` matches the pruned model's logits to the unpruned model's (soft
cross-entropy); `transformer` first matches every layer's output and the kept heads' attention scores to
the same layer and heads of the unpruned model (TinyBERT's intermediate losses; a pruned head has no
counterpart, a kept one its own), then the logits; `joint` sums both losses at every step, so the logits
are trained for the whole budget. `attention_weight` scales the attention term; at 0 the layers are matched
by their hidden states alone, DynaBERT's and CoFi's layer-plus-logit distillation. Iterative
pruning (`steps` > 1) removes the same total in equal steps, re-scoring importance and recovering between
them. Every variant spends the same budget, `recover_epochs` epochs over the recovery rows, split into
phases (`recovery_plan`), so they compare at equal cost. The model after the last phase is kept: dev is scored once, never used to choose.

Importance is measured on task data with gates: each head's output and each FFN neuron's activation is
multiplied by a gate fixed at 1, and the importance of a unit is the accumulated |d loss / d gate|
(Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; for a neuron the gate gradient is
sum(activation x grad), the first-order Taylor estimate of removing it). Scores are normalised per layer
(L2) so a global ranking compares layers fairly. The chosen units are really cut out of the weight
matrices (`prune_heads`, `prune_linear_layer`), so the model is smaller and faster in every runtime.

Saving: transformers re-applies `config.pruned_heads` when it loads a model; a shared FFN width goes in
`config.intermediate_size`. When layers keep different FFN widths the artifact carries
`config.intermediate_sizes` and `modeling_pruned_bert.py`, and loads with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` for users of plain
transformers; bertforge itself loads it through its own class (`pipeline.models.load_model`) and never runs
the folder's copy.
"""
from __future__ import annotations

import copy
import gzip
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers.pytorch_utils import prune_linear_layer

from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.capture import ScoreCapture, run_with_internals
from pipeline.data import (GLUE_DIR_HELP, GLUE_TASKS, Collator, EncodedDataset, dev_split, eval_loader, get_task, load_glue,
                           load_train_examples)
from pipeline.errors import BertforgeError
from pipeline.evaluate import evaluate
from pipeline.inference import TorchClassifier
from pipeline.losses import attention_loss, hidden_loss, prediction_loss
from pipeline.models import count_parameters, load_model, load_tokenizer, resolve_model
from pipeline.settings import setting
from pipeline.training import CHECKPOINT_DIR, LoopConfig, TrainLoop

MODELING_FILE = Path(__file__).with_name("modeling_pruned_bert.py")
AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_pruned_bert.PrunedBertForSequenceClassification"}
RECOVERY = ("prediction", "transformer", "joint")
PHASES_DIR = "phases"  # OUT/checkpoints/phases/<phase>/: each recovery phase's resume state and finished model


@dataclass
class PruneConfig:
    model: str = setting(help="PyTorch classifier artifact folder")
    task: str = setting(help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    out: str = setting(help="the pruned model's folder")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    heads: float = setting(0.0, "fraction of attention heads to remove")
    ffn: float = setting(0.0, "fraction of FFN neurons to remove")
    target_params: int | None = setting(None, "parameter budget: remove the same fraction of heads and neurons until "
                                              "the model fits")
    per_layer: bool = setting(False, "the same fraction in every layer (default: one global ranking)")
    unstructured: float = setting(0.0, "magnitude sparsity of encoder weights (shrinks the gzipped file only, no speed-up)")
    importance_examples: int = setting(1024, "training examples scoring heads and neurons")
    importance_batch_size: int = setting(32, "examples per importance-scoring batch")
    max_length: int | None = setting(None, "word-pieces per example (default: the task's)")
    steps: int = setting(1, "prune in N equal steps, re-scoring importance and recovering after each (iterative)")
    recover_epochs: int = setting(0, "recovery budget: epochs of distillation from the unpruned model over the "
                                     "recovery rows, shared by all steps and phases")
    recovery: str = setting("prediction", "prediction: match the unpruned model's logits; transformer: its hidden "
                                          "states and attention scores first, then its logits; joint: both at "
                                          "every step", choices=RECOVERY)
    intermediate_share: float = setting(0.5, "transformer recovery: share of the budget spent on hidden states and "
                                             "attention (the rest on the logits)")
    attention_weight: float = setting(1.0, "transformer and joint recovery: weight of the attention-score loss; 0: "
                                           "hidden states only, as DynaBERT and CoFi recover")
    temperature: float = setting(1.0, "soft cross-entropy temperature of the recovery")
    train_file: str | None = setting(None, "TSV in the task's layout to score importance and recover on "
                                           "(default: the GLUE train split)")
    max_train_examples: int | None = setting(None, "rows of the recovery distillation (default: all training rows)")
    eval_dev: bool = setting(True, "score the dev split before and after recovery (reported, never used to choose)",
                             flag="--no-eval-dev")
    eval_batch_size: int = setting(64, "examples per dev-scoring batch")
    num_threads: int | None = setting(None, "CPU threads for torch", flag="--threads")
    loop: LoopConfig = setting(factory=lambda: LoopConfig(epochs=1, batch_size=32, learning_rate=5e-5))


def _layers(model):
    if not hasattr(model, "bert"):
        raise BertforgeError(f"structured pruning supports BERT models; got {type(model).__name__}")
    return model.bert.encoder.layer


def head_counts(model) -> list[int]:
    return [layer.attention.self.num_attention_heads for layer in _layers(model)]


def ffn_sizes(model) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in _layers(model)]


# -- importance ----------------------------------------------------------------------------------

def unit_importance(model, loader, device="cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, |d loss/d gate| accumulated over `loader` for each head and each FFN neuron."""
    layers = _layers(model)
    head_gates = [torch.ones(n, requires_grad=True, device=device) for n in head_counts(model)]
    ffn_gates = [torch.ones(n, requires_grad=True, device=device) for n in ffn_sizes(model)]
    head_scores = [torch.zeros(n) for n in head_counts(model)]
    ffn_scores = [torch.zeros(n) for n in ffn_sizes(model)]
    hooks = []
    for i, layer in enumerate(layers):
        def gate_heads(module, args, output, i=i):
            context = output[0]
            b, s, _ = context.shape
            gated = (context.view(b, s, len(head_gates[i]), -1) * head_gates[i][:, None]).view(b, s, -1)
            return (gated, *output[1:])

        def gate_ffn(module, args, output, i=i):
            return output * ffn_gates[i]

        hooks.append(layer.attention.self.register_forward_hook(gate_heads))
        hooks.append(layer.intermediate.register_forward_hook(gate_ffn))
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it will run
    try:
        for batch in loader:
            batch.pop("idx", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, head_gates + ffn_gates)
            for i, g in enumerate(grads[:len(head_gates)]):
                head_scores[i] += g.detach().abs().cpu()
            for i, g in enumerate(grads[len(head_gates):]):
                ffn_scores[i] += g.detach().abs().cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    normalise = lambda s: s / (s.norm() + 1e-12)  # noqa: E731  per-layer L2 (Michel et al.)
    return [normalise(s) for s in head_scores], [normalise(s) for s in ffn_scores]


def select_units(scores: list[torch.Tensor], fraction: float, per_layer: bool, what: str) -> list[list[int]]:
    """Positions to remove in each layer: the lowest-scoring `fraction`, per layer or globally.

    A layer always keeps one unit: a target that would empty a layer is an error, not a silent change."""
    check_fraction(fraction, what)
    count = [round(fraction * len(s)) for s in scores] if per_layer else round(fraction * sum(len(s) for s in scores))
    return lowest_units(scores, count, what)


def check_fraction(fraction: float, what: str) -> None:
    if not 0.0 <= fraction < 1.0:
        raise BertforgeError(f"--{what} must be a fraction in [0, 1): {fraction} would remove every {what[:-1] if what.endswith('s') else what} unit")


def lowest_units(scores: list[torch.Tensor], count: int | list[int], what: str) -> list[list[int]]:
    """Positions of the lowest-scoring units: `count` of them per layer (a list) or in one global ranking
    (an int). A layer always keeps one unit."""
    sizes = [len(s) for s in scores]
    if isinstance(count, list):
        remove = []
        for i, (s, n) in enumerate(zip(scores, count)):
            if n >= len(s):
                raise BertforgeError(f"pruning the {what} would remove all {len(s)} of layer {i}")
            remove.append(sorted(torch.argsort(s)[:n].tolist()))
        return remove
    n = count
    if n > sum(sizes) - len(sizes):
        raise BertforgeError(f"pruning {n} of the {sum(sizes)} {what} globally would leave a layer with none")
    ranked = sorted(((float(v), i, j) for i, s in enumerate(scores) for j, v in enumerate(s)))
    remove, left = [[] for _ in sizes], list(sizes)
    for _, i, j in ranked:
        if n == 0:
            break
        if left[i] > 1:
            remove[i].append(j)
            left[i] -= 1
            n -= 1
    return [sorted(r) for r in remove]


def step_counts(before: list[int], fraction: float, steps: int, step: int, per_layer: bool) -> int | list[int]:
    """How many units step `step` (1-based) of `steps` removes: equal shares whose sum is exactly what one
    step would remove (`before`: the units per layer at the start)."""
    def removed_by(k: int):
        if per_layer:
            return [round(round(fraction * n) * k / steps) for n in before]
        return round(round(fraction * sum(before)) * k / steps)

    done, target = removed_by(step - 1), removed_by(step)
    return [b - a for a, b in zip(done, target)] if per_layer else target - done


# -- surgery -------------------------------------------------------------------------------------

def prune_structured(model, heads_to_remove: list[list[int]], neurons_to_remove: list[list[int]]) -> None:
    """Cut heads and FFN neurons (positions in the current layers) out of the weights, in place."""
    layers = _layers(model)
    already = {int(k): set(v) for k, v in (model.config.pruned_heads or {}).items()}
    to_prune = {}
    for i, positions in enumerate(heads_to_remove):
        if not positions:
            continue
        if len(positions) >= layers[i].attention.self.num_attention_heads:
            raise BertforgeError(f"cannot remove every attention head of layer {i}")
        # prune_heads takes the original head ids: map current positions past already-pruned heads
        remaining = [h for h in range(model.config.num_attention_heads) if h not in already.get(i, set())]
        to_prune[i] = [remaining[p] for p in positions]
    if to_prune:
        model.prune_heads(to_prune)
    for i, positions in enumerate(neurons_to_remove):
        if not positions:
            continue
        layer = layers[i]
        size = layer.intermediate.dense.out_features
        if len(positions) >= size:
            raise BertforgeError(f"cannot remove every FFN neuron of layer {i}")
        keep = torch.tensor(sorted(set(range(size)) - set(positions)), dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)
    _record_ffn_sizes(model)


def _record_ffn_sizes(model) -> None:
    sizes = ffn_sizes(model)
    config = model.config
    if len(set(sizes)) == 1:  # plain BertConfig can describe it
        config.intermediate_size = sizes[0]
        for key in ("intermediate_sizes", "auto_map"):
            if hasattr(config, key):
                delattr(config, key)
    else:
        config.intermediate_sizes = sizes
        config.auto_map = dict(AUTO_MAP)


def prune_unstructured(model, sparsity: float) -> dict:
    """Zero the smallest-magnitude weights of every encoder Linear (globally ranked)."""
    from torch.nn.utils import prune as tprune

    if not 0.0 <= sparsity < 1.0:
        raise BertforgeError(f"unstructured must be a fraction in [0, 1), got {sparsity}")
    targets = [(m, "weight") for m in _layers(model).modules() if isinstance(m, torch.nn.Linear)]
    tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=sparsity)
    for m, name in targets:
        tprune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return {"encoder_linear_sparsity": round(zeros / total, 4)}


def fractions_for_budget(model, target_params: int) -> float:
    """The fraction f of heads and of FFN neurons to remove (the same f) so that the model fits in
    `target_params` parameters (bisection on the analytic count)."""
    total = count_parameters(model)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_head = 4 * cfg.hidden_size * head_dim + 3 * head_dim  # q, k, v rows + biases, output columns
    per_neuron = 2 * cfg.hidden_size + 1
    removable = sum(head_counts(model)) * per_head + sum(ffn_sizes(model)) * per_neuron
    if target_params >= total:
        return 0.0
    if total - target_params > 0.95 * removable:
        raise BertforgeError(f"a budget of {target_params:,} parameters cannot be met by pruning heads and FFN "
                             f"neurons (the model has {total:,}, of which {total - removable:,} are not prunable)")
    return (total - target_params) / removable


# -- recovery ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryPhase:
    step: int  # the pruning step (1-based) it follows
    loss: str  # transformer | prediction | joint
    optimizer_steps: int

    @property
    def name(self) -> str:
        return f"step{self.step}-{self.loss}"


def recovery_plan(cfg: PruneConfig, steps_per_epoch: int) -> list[RecoveryPhase]:
    """The recovery phases in order. Their optimizer steps add up to `recover_epochs` epochs' worth:
    prediction and joint recovery take an equal share after each pruning step; transformer recovery spends
    `intermediate_share` on the intermediate losses, split equally over the pruning steps, and the rest
    on the logits after the last step."""
    total, n = cfg.recover_epochs * steps_per_epoch, cfg.steps
    if cfg.recovery in ("prediction", "joint"):
        shares = [(k, cfg.recovery, 1 / n) for k in range(1, n + 1)]
    else:
        shares = [(k, "transformer", cfg.intermediate_share / n) for k in range(1, n + 1)]
        shares.append((n, "prediction", 1 - cfg.intermediate_share))
    phases, given, cumulative = [], 0, 0.0
    for step, loss, share in shares:
        cumulative += share
        count = round(cumulative * total) - given  # cumulative rounding: the counts sum to `total` exactly
        given += count
        if count > 0:
            phases.append(RecoveryPhase(step, loss, count))
    return phases


def kept_heads(config, layer: int, num_heads: int) -> list[int]:
    """Original ids of the heads a layer still has (transformers records the removed ones per layer)."""
    gone = {int(k): set(v) for k, v in (config.pruned_heads or {}).items()}.get(layer, set())
    return [h for h in range(num_heads) if h not in gone]


def intermediate_loss_fn(student, teacher, student_capture: ScoreCapture | None, teacher_capture: ScoreCapture | None,
                         temperature: float | None = None, attention_weight: float = 1.0):
    """loss_fn for TrainLoop: each layer's output (the embeddings' too) against the same layer of the
    unpruned teacher, and each kept head's attention scores against that same head of the teacher
    (times `attention_weight`; without captures, 0: the scores are not computed). Pruning keeps the hidden
    width, so no projection is needed. With a `temperature` (joint recovery) the logits' soft
    cross-entropy is added, from the same forward passes.

    Why a weight: summed over layers the score loss is several times the others (on the SST-2 student cut
    by three quarters, 2.7 against 0.4 hidden and 0.3 logits), and it pins each kept head to what it
    computed beside heads that are gone, where the hidden states leave it free to make up for them."""
    total_heads = teacher.config.num_attention_heads
    heads = []  # per layer: the teacher's positions of the student's heads
    for i in range(student.config.num_hidden_layers):
        teacher_ids = kept_heads(teacher.config, i, total_heads)
        heads.append(torch.tensor([teacher_ids.index(h) for h in kept_heads(student.config, i, total_heads)]))
    same = torch.nn.Identity()
    logits = temperature is not None

    def loss_fn(batch):
        batch.pop("idx", None)
        batch.pop("labels", None)
        mask = batch["attention_mask"]
        with torch.no_grad():
            t = run_with_internals(teacher, batch, teacher_capture, logits=logits)
        s = run_with_internals(student, batch, student_capture, logits=logits)
        hidden = sum(hidden_loss(hs, ht, same, mask) for hs, ht in zip(s.hidden_states, t.hidden_states))
        parts = {"loss": hidden, "hidden": hidden}
        if student_capture is not None:
            attention = sum(attention_loss(s.scores[n], t.scores[n][:, heads[n - 1].to(mask.device)], mask)
                            for n in s.scores)
            parts["loss"], parts["attention"] = hidden + attention_weight * attention, attention
        if logits:
            parts["prediction"] = prediction_loss(s.logits, t.logits, temperature)
            parts["loss"] = parts["loss"] + parts["prediction"]
        return parts

    return loss_fn


def prediction_loss_fn(student, teacher, temperature: float):
    def loss_fn(batch):
        batch.pop("idx", None)
        batch.pop("labels", None)  # recovery learns from the unpruned model alone
        with torch.no_grad():
            t = teacher(**batch).logits
        return {"loss": prediction_loss(student(**batch).logits, t, temperature)}

    return loss_fn


def recover(cfg: PruneConfig, phase: RecoveryPhase, index: int, model, teacher, dataset, collator, work: Path,
            resume: bool, progress: bool) -> TrainLoop:
    """Run one recovery phase on `model` in place; returns its loop (the caller saves the model, then
    calls `loop.finish()`). `work` holds its resume state. Each phase has its own data order (seed + index), so short phases see different rows."""
    steps_per_epoch = _steps_per_epoch(cfg, len(dataset))
    epochs = math.ceil(phase.optimizer_steps / steps_per_epoch)
    loop_cfg = replace(cfg.loop, epochs=epochs, max_steps_per_epoch=phase.optimizer_steps // epochs,
                       seed=cfg.loop.seed + index)
    layers = phase.loss in ("transformer", "joint")
    captures = [ScoreCapture(model), ScoreCapture(teacher)] if layers and cfg.attention_weight > 0 else []
    loss_fn = (intermediate_loss_fn(model, teacher, *(captures or [None, None]),
                                    temperature=cfg.temperature if phase.loss == "joint" else None,
                                    attention_weight=cfg.attention_weight) if layers
               else prediction_loss_fn(model, teacher, cfg.temperature))
    try:
        loop = TrainLoop(loop_cfg, model, dataset, collator, loss_fn, work, desc=f"prune-recover {phase.name}",
                         run_config={**_run_config(cfg), "phase": phase.name}, progress=progress)
        teacher.to(loop.device)
        loop.run(resume=resume)
    finally:
        for c in captures:  # the hooks sit on modules the next pruning step may replace
            c.remove()
    return loop


def _steps_per_epoch(cfg: PruneConfig, rows: int) -> int:
    n = math.ceil(rows / cfg.loop.batch_size)
    return min(n, cfg.loop.max_steps_per_epoch) if cfg.loop.max_steps_per_epoch else n


# -- the recipe ----------------------------------------------------------------------------------

def _eval_metrics(model, tokenizer, task, dev, max_length, batch_size) -> dict:
    model.eval()
    return evaluate("in-memory", task.name, runtime=TorchClassifier.from_model(model, tokenizer), examples=dev,
                    max_length=max_length, batch_size=batch_size, progress=False).metrics


def prune(cfg: PruneConfig, resume: bool = False, progress: bool = True, importance=None) -> Manifest:
    """`importance`: (head_scores, ffn_scores) from `rank_units` on the unpruned model, when one ranking
    serves several pruning levels (the budget search)."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = get_task(cfg.task)
    if not (cfg.heads or cfg.ffn or cfg.target_params or cfg.unstructured):
        raise BertforgeError("nothing to prune: set heads, ffn, target_params or unstructured")
    if cfg.steps < 1:
        raise BertforgeError(f"steps must be at least 1, got {cfg.steps}")
    if cfg.recovery == "transformer" and not 0.0 < cfg.intermediate_share < 1.0:
        raise BertforgeError(f"intermediate_share must be in (0, 1), got {cfg.intermediate_share}")
    if cfg.attention_weight < 0:
        raise BertforgeError(f"attention_weight must be >= 0, got {cfg.attention_weight}")
    parent = read_manifest(cfg.model)
    if parent and parent.format != "pytorch":
        raise BertforgeError(f"{cfg.model} is an ONNX artifact: prune the PyTorch model, then export")
    max_length = cfg.max_length or task.default_max_length
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if model.config.num_labels != task.num_labels:
        raise BertforgeError(f"label-count mismatch: {cfg.model} has {model.config.num_labels} labels, task {task.name} has {task.num_labels}")
    before = {"params": count_parameters(model), "heads": head_counts(model), "ffn": ffn_sizes(model)}
    out = prepare_output_dir(cfg.out)
    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir) if cfg.eval_dev else None
    recovery_rows = train[:cfg.max_train_examples] if cfg.max_train_examples else train
    plan = recovery_plan(cfg, _steps_per_epoch(cfg, len(recovery_rows)))
    phases_dir = out / CHECKPOINT_DIR / PHASES_DIR
    if plan and (out / CHECKPOINT_DIR).exists() and not resume:
        raise BertforgeError(f"{out} holds an unfinished run: pass --resume to continue it")
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if plan else None
    params: dict = {**_run_config(cfg), "max_length": max_length, "before": before,
                    "recovery_plan": [asdict(p) for p in plan], "recovery_rows": len(recovery_rows)}

    heads_frac, ffn_frac = cfg.heads, cfg.ffn
    if cfg.target_params:
        heads_frac = ffn_frac = fractions_for_budget(model, cfg.target_params)
        params["budget_fraction"] = round(heads_frac, 4)
    check_fraction(heads_frac, "heads")
    check_fraction(ffn_frac, "ffn")
    # A resumed run continues after the last finished phase, whose model (and the record of what was
    # removed up to it) it reloads; importance scoring and surgery are deterministic, so nothing differs.
    finished = [p for p in plan if (phases_dir / p.name / "model" / "config.json").is_file()]
    settings = json.loads(json.dumps(_run_config(cfg), default=str))
    record = {"settings": settings, "steps": [], "recovery_steps_taken": 0, "dev_before_recovery": None}
    if finished and resume:
        record = json.loads((phases_dir / finished[-1].name / "record.json").read_text())
        if record.get("settings") != settings:
            raise BertforgeError(f"cannot resume {out}: its finished recovery phases were made with other settings; "
                                 "remove the folder to start over")
        model = load_model(phases_dir / finished[-1].name / "model")
    done_phases = {p.name for p in finished} if resume else set()
    pruned_steps = {s["step"] for s in record["steps"]}

    dataset = EncodedDataset(recovery_rows, tokenizer, max_length) if plan else None
    collator = Collator(tokenizer, task.is_regression)
    for step in range(1, cfg.steps + 1):
        if (heads_frac or ffn_frac) and step not in pruned_steps:
            record["steps"].append(_prune_step(cfg, model, tokenizer, task, train, max_length, before, heads_frac,
                                               ffn_frac, step, importance))
        if step == cfg.steps and not record.get("pruned"):
            if cfg.unstructured:
                record["unstructured"] = prune_unstructured(model, cfg.unstructured)
            record["pruned"] = True
            if cfg.eval_dev:  # the final size before the last recovery: for one step, before any recovery
                record["dev_before_recovery"] = _eval_metrics(model, tokenizer, task, dev, max_length, cfg.eval_batch_size)
        for index, phase in enumerate(plan):
            if phase.step != step or phase.name in done_phases:
                continue
            work = phases_dir / phase.name
            loop = recover(cfg, phase, index, model, teacher, dataset, collator, work, resume, progress)
            record["recovery_steps_taken"] += loop.state["global_step"]
            _save(model, tokenizer, work / "model")
            (work / "record.json").write_text(json.dumps(record))
            loop.finish()  # only once the phase's model is safe: a kill in between redoes the phase, no worse
    params.update(record.get("unstructured", {}))
    if record["steps"]:
        params["removed_heads"] = {i: h for i, h in enumerate(_merge(s["removed_heads"] for s in record["steps"])) if h}
        params["removed_neurons_per_layer"] = [sum(n) for n in zip(*(s["removed_neurons"] for s in record["steps"]))]
        params["pruning_steps"] = record["steps"]
    params["recovery_examples"] = record["recovery_steps_taken"] * cfg.loop.batch_size  # optimizer steps x batch
    params["after"] = {"params": count_parameters(model), "heads": head_counts(model), "ffn": ffn_sizes(model)}

    _save(model, tokenizer, out)
    metrics = {}
    if cfg.eval_dev:
        dev_metrics = (_eval_metrics(model, tokenizer, task, dev, max_length, cfg.eval_batch_size) if plan
                       else record["dev_before_recovery"])
        metrics = {"dev_before_recovery": record["dev_before_recovery"], dev_split(task): dev_metrics, "dev": dev_metrics}
    if cfg.unstructured:
        params["gzip_bytes"] = _gzip_size(out / "model.safetensors")
        parent_weights = Path(resolve_model(cfg.model)) / "model.safetensors"
        if parent_weights.is_file():
            params["parent_gzip_bytes"] = _gzip_size(parent_weights)
        params["note"] = "unstructured sparsity shrinks only the compressed file; dense runtimes run no faster"
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return write_manifest(out, Manifest(
        stage="prune", task=task.name, parent=str(cfg.model), params=params, seed=cfg.loop.seed,
        metrics=metrics, num_parameters=count_parameters(model), wall_s=round(time.perf_counter() - start, 1),
    ))


def rank_units(cfg, model, tokenizer, task, train, max_length):
    """Head and FFN-neuron importance on `cfg.importance_examples` training rows picked by the seed."""
    gen = torch.Generator().manual_seed(cfg.loop.seed)
    picked = [train[i] for i in torch.randperm(len(train), generator=gen)[:cfg.importance_examples].tolist()]
    data = EncodedDataset(picked, tokenizer, max_length)
    return unit_importance(model, eval_loader(data, Collator(tokenizer, task.is_regression), cfg.importance_batch_size))


def _prune_step(cfg, model, tokenizer, task, train, max_length, before, heads_frac, ffn_frac, step,
                importance=None) -> dict:
    """Score importance on the model as it is now and cut this step's share of heads and neurons. The first
    step may take a ranking computed once for several pruning levels of the same model (`importance`)."""
    head_scores, ffn_scores = (importance if step == 1 and importance is not None
                               else rank_units(cfg, model, tokenizer, task, train, max_length))
    heads_out = lowest_units(head_scores, step_counts(before["heads"], heads_frac, cfg.steps, step, cfg.per_layer), "heads")
    ffn_out = lowest_units(ffn_scores, step_counts(before["ffn"], ffn_frac, cfg.steps, step, cfg.per_layer), "ffn")
    removed = [[kept_heads(model.config, i, model.config.num_attention_heads)[p] for p in positions]
               for i, positions in enumerate(heads_out)]  # original head ids, as config.pruned_heads has them
    prune_structured(model, heads_out, ffn_out)
    return {"step": step, "removed_heads": removed, "removed_neurons": [len(r) for r in ffn_out],
            "heads": head_counts(model), "ffn": ffn_sizes(model)}


def _merge(per_step) -> list[list[int]]:
    merged: list[list[int]] = []
    for layers in per_step:
        merged = [sorted(a + b) for a, b in zip(merged, layers)] if merged else [list(x) for x in layers]
    return merged


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if getattr(model.config, "auto_map", None):
        shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
    else:
        (out / MODELING_FILE.name).unlink(missing_ok=True)


def _gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=6))


def _run_config(cfg: PruneConfig) -> dict:
    d = asdict(cfg)
    for volatile in ("eval_dev", "eval_batch_size", "num_threads"):  # no effect on the weights
        d.pop(volatile)
    return d
