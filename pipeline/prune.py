"""Recipe: structured pruning of attention heads and FFN neurons, optionally followed by recovery
distillation from the unpruned model; or unstructured magnitude pruning.

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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.pytorch_utils import prune_linear_layer

from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.data import GLUE_DIR_HELP, GLUE_TASKS, Collator, EncodedDataset, dev_split, eval_loader, get_task, load_glue
from pipeline.errors import BertforgeError
from pipeline.evaluate import BestDev, evaluate
from pipeline.inference import TorchClassifier
from pipeline.losses import prediction_loss
from pipeline.models import count_parameters, load_model, load_tokenizer, resolve_model
from pipeline.settings import setting
from pipeline.training import LoopConfig, TrainLoop

MODELING_FILE = Path(__file__).with_name("modeling_pruned_bert.py")
AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_pruned_bert.PrunedBertForSequenceClassification"}


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
    recover_epochs: int = setting(0, "epochs of prediction-layer distillation from the unpruned model afterwards")
    temperature: float = setting(1.0, "soft cross-entropy temperature of the recovery")
    max_train_examples: int | None = setting(None, "rows of the recovery distillation (default: the whole train split)")
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
    if not 0.0 <= fraction < 1.0:
        raise BertforgeError(f"--{what} must be a fraction in [0, 1): {fraction} would remove every {what[:-1] if what.endswith('s') else what} unit")
    sizes = [len(s) for s in scores]
    if per_layer:
        remove = []
        for i, s in enumerate(scores):
            n = round(fraction * len(s))
            if n >= len(s):
                raise BertforgeError(f"pruning {fraction:.0%} of the {what} would remove all {len(s)} of layer {i}")
            remove.append(sorted(torch.argsort(s)[:n].tolist()))
        return remove
    n = round(fraction * sum(sizes))
    if n > sum(sizes) - len(sizes):
        raise BertforgeError(f"pruning {fraction:.0%} of the {what} globally would leave a layer with none")
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


# -- the recipe ----------------------------------------------------------------------------------

def _eval_metrics(model, tokenizer, task, dev, max_length, batch_size) -> dict:
    model.eval()
    return evaluate("in-memory", task.name, runtime=TorchClassifier.from_model(model, tokenizer), examples=dev,
                    max_length=max_length, batch_size=batch_size, progress=False).metrics


def rank_units(cfg: PruneConfig, model, tokenizer, task, train, max_length: int):
    """Head and FFN-neuron importance on `cfg.importance_examples` training rows picked by the seed."""
    gen = torch.Generator().manual_seed(cfg.loop.seed)
    picked = [train[i] for i in torch.randperm(len(train), generator=gen)[:cfg.importance_examples].tolist()]
    data = EncodedDataset(picked, tokenizer, max_length)
    return unit_importance(model, eval_loader(data, Collator(tokenizer, task.is_regression), cfg.importance_batch_size))


def prune(cfg: PruneConfig, resume: bool = False, progress: bool = True, importance=None) -> Manifest:
    """`importance`: (head_scores, ffn_scores) from `rank_units`, when one ranking serves several levels."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = get_task(cfg.task)
    if not (cfg.heads or cfg.ffn or cfg.target_params or cfg.unstructured):
        raise BertforgeError("nothing to prune: set heads, ffn, target_params or unstructured")
    parent = read_manifest(cfg.model)
    if parent and parent.format != "pytorch":
        raise BertforgeError(f"{cfg.model} is an ONNX artifact: prune the PyTorch model, then export")
    max_length = cfg.max_length or task.default_max_length
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if model.config.num_labels != task.num_labels:
        raise BertforgeError(f"label-count mismatch: {cfg.model} has {model.config.num_labels} labels, task {task.name} has {task.num_labels}")
    before = {"params": count_parameters(model), "heads": head_counts(model), "ffn": ffn_sizes(model)}
    teacher = copy.deepcopy(model).eval() if cfg.recover_epochs else None
    out = prepare_output_dir(cfg.out)
    train = load_glue(task.name, "train", cfg.glue_dir)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    params: dict = {**_run_config(cfg), "max_length": max_length, "before": before}

    heads_frac, ffn_frac = cfg.heads, cfg.ffn
    if cfg.target_params:
        heads_frac = ffn_frac = fractions_for_budget(model, cfg.target_params)
        params["budget_fraction"] = round(heads_frac, 4)
    if heads_frac or ffn_frac:
        head_scores, ffn_scores = importance or rank_units(cfg, model, tokenizer, task, train, max_length)
        heads_out = select_units(head_scores, heads_frac, cfg.per_layer, "heads")
        ffn_out = select_units(ffn_scores, ffn_frac, cfg.per_layer, "ffn")
        prune_structured(model, heads_out, ffn_out)
        params["removed_heads"] = {i: h for i, h in enumerate(heads_out) if h}
        params["removed_neurons_per_layer"] = [len(r) for r in ffn_out]
    if cfg.unstructured:
        params.update(prune_unstructured(model, cfg.unstructured))
    params["after"] = {"params": count_parameters(model), "heads": head_counts(model), "ffn": ffn_sizes(model)}

    metrics = {"dev_before_recovery": _eval_metrics(model, tokenizer, task, dev, max_length, cfg.eval_batch_size)}
    if cfg.recover_epochs:
        metrics.update(_recover(cfg, model, teacher, tokenizer, task, train, dev, max_length, out, resume, progress))
    else:
        metrics["dev"] = metrics["dev_before_recovery"]
        _save(model, tokenizer, out)
    if cfg.unstructured:
        params["gzip_bytes"] = _gzip_size(out / "model.safetensors")
        parent_weights = Path(resolve_model(cfg.model)) / "model.safetensors"
        if parent_weights.is_file():
            params["parent_gzip_bytes"] = _gzip_size(parent_weights)
        params["note"] = "unstructured sparsity shrinks only the compressed file; dense runtimes run no faster"
    manifest = write_manifest(out, Manifest(
        stage="prune", task=task.name, parent=str(cfg.model), params=params, seed=cfg.loop.seed,
        metrics=metrics, num_parameters=count_parameters(model), wall_s=round(time.perf_counter() - start, 1),
    ))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return manifest


def _recover(cfg, model, teacher, tokenizer, task, train, dev, max_length, out, resume, progress) -> dict:
    """Prediction-layer distillation from the unpruned model (soft cross-entropy to its logits)."""
    train = train[:cfg.max_train_examples] if cfg.max_train_examples else train
    dataset = EncodedDataset(train, tokenizer, max_length)
    loop_cfg = LoopConfig(**{**asdict(cfg.loop), "epochs": cfg.recover_epochs})

    def loss_fn(batch):
        batch.pop("idx")
        batch.pop("labels", None)
        with torch.no_grad():
            t = teacher(**batch).logits
        return {"loss": prediction_loss(model(**batch).logits, t, cfg.temperature)}

    best_dev = BestDev(model, tokenizer, task, dev, max_length, cfg.eval_batch_size, out,
                       write=lambda: _save(model, tokenizer, out))
    loop = TrainLoop(loop_cfg, model, dataset, Collator(tokenizer, task.is_regression), loss_fn, out, best_dev.evaluate,
                     best_dev.save, desc=f"prune-recover {task.name}", run_config=_run_config(cfg), progress=progress)
    teacher.to(loop.device)
    loop.run(resume=resume)
    return best_dev.metrics_for_manifest()


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
    d.pop("eval_batch_size")
    d.pop("num_threads")
    return d
