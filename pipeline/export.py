"""Stage: export a PyTorch classifier to ONNX, validate it on real task inputs, fuse it for ONNX Runtime.

1. optimum-onnx's exporter writes `model.onnx` with dynamic batch and sequence axes, plus config.json and
   the tokenizer: a folder `ORTModelForSequenceClassification.from_pretrained` opens.
2. Validation: PyTorch and ONNX Runtime run the same task examples (dynamic padding, so batch and
   sequence sizes vary); the largest logit difference must stay under `atol` and every predicted label
   must agree. The figures go into the manifest.
3. Fusion (`optimize="O2"`): onnxruntime's BERT optimizer rewrites the graph into Attention, BiasGelu
   and EmbedLayerNormalization (and, for the GPU, SkipLayerNormalization: its CPU kernel is slower than the
   Add and LayerNormalization it replaces, `pipeline.providers.CPU_DISABLED_OPTIMIZERS`); ORT's own session
   optimizer does not fuse attention in optimum's exports. `num_heads=0, hidden_size=0` lets it read the sizes from each
   layer, which pruned models (heads and FFN widths differing by layer) need. The fused graph is
   validated again. `device="gpu"` builds the GPU variant: GPU fusions and fp16 weights with fp32 inputs
   and outputs (validated only where CUDA is present).
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.data import GLUE_DIR_HELP
from pipeline.errors import BertforgeError
from pipeline.inference import OrtClassifier, TorchClassifier, is_onnx_artifact
from pipeline.models import count_parameters, load_tokenizer, resolve_model
from pipeline.settings import setting
from pipeline.onnx_utils import ONNX_FILE, compare_runtimes, copy_support_files, op_counts, resolve_task, task_examples

FUSED_OPS = ("Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu")
OPTIMIZE_LEVELS = ("none", "O2")


@dataclass
class ExportConfig:
    model: str = setting(help="PyTorch artifact folder (teacher, student, pruned)")
    out: str = setting(help="the ONNX artifact's folder")
    task: str | None = setting(None, "task whose dev examples validate the graph (default: the model's)")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    optimize: str = setting("O2", "O2: onnxruntime BERT fusions; none: the plain export", choices=OPTIMIZE_LEVELS)
    device: str = setting("cpu", "gpu: GPU fusions and fp16 weights", choices=("cpu", "gpu"))
    opset: int | None = setting(None, "ONNX opset (default: optimum's choice for BERT)")
    atol: float = setting(1e-4, "largest |logit difference| allowed against PyTorch (fp32)")
    fp16_atol: float = setting(5e-2, "the same for the fp16 GPU graph")
    validation_examples: int = setting(256, "dev examples the graph is validated on")
    max_length: int | None = setting(None, "word-pieces per example (default: the task's)")
    evaluate_dev: bool = setting(True, "score the final graph on the task's dev split (needs a task)", flag="--no-eval")


def export(cfg: ExportConfig, progress: bool = True) -> Manifest:
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import BertForSequenceClassification

    from pipeline.modeling_pruned_bert import PrunedBertForSequenceClassification
    from pipeline.models import load_model

    start = time.perf_counter()
    if cfg.optimize not in OPTIMIZE_LEVELS:
        raise BertforgeError(f"optimize must be one of {', '.join(OPTIMIZE_LEVELS)}, got {cfg.optimize!r}")
    if cfg.device not in ("cpu", "gpu"):
        raise BertforgeError(f"device must be cpu or gpu, got {cfg.device!r}")
    if cfg.device == "gpu" and cfg.optimize == "none":
        raise BertforgeError("the GPU variant is the fused fp16 graph: set optimize O2 with device gpu")
    if is_onnx_artifact(cfg.model):
        raise BertforgeError(f"{cfg.model} is already an ONNX artifact")
    model_dir = resolve_model(cfg.model)
    task = resolve_task(model_dir, cfg.task)
    max_length = cfg.max_length or (task.default_max_length if task else 128)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    if isinstance(model, PrunedBertForSequenceClassification):
        # optimum infers the model's library from its class's module; once built, the pruned class is a plain
        # BertForSequenceClassification with narrower layers (only its constructor differs)
        model.__class__ = BertForSequenceClassification
    examples = task_examples(task, cfg.glue_dir, limit=cfg.validation_examples)
    reference = TorchClassifier.from_model(model, tokenizer)
    out = prepare_output_dir(cfg.out)
    (out / ONNX_FILE).unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        try:
            onnx_export_from_model(model, tmp, opset=cfg.opset, task="text-classification", do_validation=False,
                                   preprocessors=[tokenizer])
        except Exception as e:
            raise BertforgeError(f"ONNX export of {cfg.model} failed: {str(e).strip().splitlines()[0][:200]}") from None
        copy_support_files(model_dir, Path(tmp))
        raw = Path(tmp) / ONNX_FILE
        validation = {"export": _validate(reference, tmp, examples, max_length, cfg.atol)}
        params = {**asdict(cfg), "max_length": max_length, "onnx_file": ONNX_FILE, "validation_task": task.name if task else "sst2-sample"}
        if cfg.optimize == "none":
            raw.replace(out / ONNX_FILE)
        else:
            optimized = optimize_graph(raw, out / ONNX_FILE, gpu=cfg.device == "gpu")
            params["fused_ops"] = {k: v for k, v in op_counts(out / ONNX_FILE).items() if k in FUSED_OPS}
            params["optimizer"] = optimized
        copy_support_files(tmp, out)
    precision = "fp16" if cfg.device == "gpu" else "fp32"
    if cfg.optimize != "none":
        validation["optimized"] = _validate(reference, out, examples, max_length,
                                            cfg.fp16_atol if precision == "fp16" else cfg.atol, fp16=precision == "fp16")
    params["validation"] = validation
    metrics = {}
    if cfg.evaluate_dev and task is not None and precision == "fp32":
        from pipeline.evaluate import evaluate

        metrics["dev"] = evaluate(str(out), task.name, cfg.glue_dir, max_length=max_length, progress=progress).metrics
    parent_manifest = read_manifest(model_dir)
    return write_manifest(out, Manifest(
        stage="export", task=task.name if task else None, format="onnx", precision=precision, parent=str(cfg.model),
        params=params, metrics=metrics, num_parameters=count_parameters(model),
        seed=parent_manifest.seed if parent_manifest else None, wall_s=round(time.perf_counter() - start, 1),
    ))


def optimize_graph(src: Path, dst: Path, gpu: bool = False) -> dict:
    """onnxruntime's BERT fusions (sizes read from the graph); fp16 weights for the GPU variant."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = gpu  # slow on the CPU: see pipeline.providers.CPU_DISABLED_OPTIMIZERS
    # with num_heads=0 it warns for every pruned layer that the sizes differ from the config: expected
    logging.getLogger("onnxruntime.transformers.fusion_attention").setLevel(logging.ERROR)
    try:
        opt = optimize_model(str(src), "bert", num_heads=0, hidden_size=0, optimization_options=options, use_gpu=gpu)
    except Exception as e:
        raise BertforgeError(f"graph fusion of {src} failed: {str(e).strip().splitlines()[0][:200]}") from None
    if gpu:
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(dst))
    return {"tool": "onnxruntime.transformers.optimizer", "model_type": "bert", "use_gpu": gpu, "float16": gpu,
            "skip_layer_norm": gpu,
            "fusion_stats": {k: int(v) for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}}


def _validate(reference, folder, examples, max_length: int, atol: float, fp16: bool = False) -> dict:
    import onnxruntime as ort

    folder = str(folder)
    if fp16 and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"validated": False, "reason": "fp16 GPU graph: no CUDA execution provider on this machine"}
    candidate = OrtClassifier(folder, device="cuda" if fp16 else "cpu", file_name=ONNX_FILE)
    result = compare_runtimes(reference, candidate, examples, max_length)
    result["atol"] = atol
    agreement_needed = 0.99 if fp16 else 1.0  # fp16 may flip a near-tie; fp32 must not
    ok = result["max_abs_diff"] <= atol and (result["label_agreement"] is None or result["label_agreement"] >= agreement_needed)
    result["validated"] = ok
    if not ok:
        raise BertforgeError(
            f"ONNX graph in {folder} disagrees with PyTorch on {result['examples']} task examples: max |diff| "
            f"{result['max_abs_diff']:.2e} (atol {atol:g}), label agreement {result['label_agreement']}")
    return result
