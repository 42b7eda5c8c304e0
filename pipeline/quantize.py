"""Stage: quantize a classifier artifact.

ONNX Runtime backend (input: an ONNX artifact folder from `bertforge export`, output: the same layout):
- `dynamic`: int8 weights, activations quantized on the fly (the fast CPU choice for transformers). On a
  fused graph `DefaultTensorType=FLOAT` is needed (the fused contrib ops carry no type information) and
  yields int8 Attention and EmbedLayerNormalization.
- `static`: QDQ int8 calibrated on task training examples; unsigned activations (U8S8): signed ones run
  slower than fp32 on x86. It takes the unfused export (`--optimize none`): ORT's session fuses the QDQ
  pairs into int8 MatMuls itself, while QDQ over contrib-op graphs leaves most of them in float. `quant_pre_process` runs first, without symbolic shape inference (it fails
  on optimum exports).
- `fp16`: fp16 weights with fp32 inputs and outputs, for GPUs.
- accuracy-aware (`tolerance`): measure each quantizable node's sensitivity (logit error when only that
  node is quantized), then keep the most sensitive nodes in float, as few as needed for the score to stay
  within `tolerance` (relative) of the float model's. Every choice is made on `tune_examples` training rows
  carved by the seed (`pipeline.data.split`), never on the dev split the manifest reports; each trial score,
  the all-float one included, is measured, not assumed. The manifest lists the nodes kept in float.

neural-compressor backend (input: a PyTorch artifact, output: a folder with `model.pt2`, a
`torch.export` program of the PT2E int8 graph, plus config.json and the tokenizer):
- `inc-dynamic` / `inc-static`: `neural_compressor.torch.quantization` after its own `export`. The graph is
  in "qdq" form: it is fast only once compiled (`torch.compile`), so measure before you use it.
  Load it with `Pt2Classifier(folder)` or `torch.export.load(folder / "model.pt2").module()`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.data import compute_metrics, logits_to_predictions
from pipeline.data import GLUE_DIR_HELP
from pipeline.errors import BertforgeError
from pipeline.inference import OrtClassifier, is_onnx_artifact
from pipeline.models import load_config, load_tokenizer, resolve_model
from pipeline.providers import CPU_EP, disabled_optimizers
from pipeline.settings import setting
from pipeline.onnx_utils import (ONNX_FILE, batches, compare_runtimes, copy_support_files, onnx_path, op_counts,
                                 resolve_task, task_examples)

ORT_MODES = ("dynamic", "static", "fp16")
INC_MODES = ("inc-dynamic", "inc-static")
MODES = ORT_MODES + INC_MODES
PT2_FILE = "model.pt2"
DYNAMIC_OPS = ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"]
STATIC_OPS = ["MatMul", "Gemm", "Gather"]
FUSED = ("Attention", "SkipLayerNormalization", "EmbedLayerNormalization")


@dataclass
class QuantizeConfig:
    model: str = setting(help="ONNX artifact (dynamic/static/fp16) or PyTorch artifact (inc-*)")
    out: str = setting(help="the quantized artifact's folder")
    mode: str = setting("dynamic", "dynamic | static (ONNX Runtime int8), fp16, inc-dynamic | inc-static "
                                   "(neural-compressor, PyTorch)", choices=MODES)
    task: str | None = setting(None, "default: the model's config.finetuning_task")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    per_channel: bool = setting(False, "per-channel weight scales")
    calibration_examples: int = setting(256, "static: training examples that calibrate activation ranges")
    calibration_method: str = setting("minmax", "static: how activation ranges are chosen",
                                      choices=("minmax", "entropy", "percentile"))
    tolerance: float | None = setting(None, "accuracy-aware: allowed relative score drop (0.01 = 1%%) on rows carved "
                                            "from train; sensitive nodes stay float")
    tune_examples: int = setting(512, "accuracy-aware: training rows (carved by the seed) the tolerance is tuned on")
    seed: int = setting(42, "accuracy-aware: seed of the carved tuning rows")
    eval_examples: int | None = setting(None, "dev examples scored (default: all)")
    sensitivity_examples: int = setting(128, "accuracy-aware: tuning rows used to rank node sensitivity")
    max_length: int | None = setting(None, "word-pieces per example (default: the task's)")
    batch_size: int = setting(32, "examples per scoring batch")


def quantize(cfg: QuantizeConfig, progress: bool = True) -> Manifest:
    start = time.perf_counter()
    if cfg.mode not in MODES:
        raise BertforgeError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.tolerance is not None and cfg.mode not in ("dynamic", "static"):
        raise BertforgeError("tolerance (accuracy-aware) works with mode dynamic or static")
    if cfg.mode in ORT_MODES:
        return _quantize_ort(cfg, start, progress)
    return _quantize_inc(cfg, start)


# -- ONNX Runtime ---------------------------------------------------------------------------------

class _Feeds:
    """An onnxruntime CalibrationDataReader over tokenized task examples."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


class OrtQuantizer:
    """Builds quantized variants of one fp32 graph (with some nodes kept in float) and scores them."""

    def __init__(self, cfg: QuantizeConfig, src: Path, workdir: Path, task, max_length: int):
        self.cfg, self.workdir, self.task, self.max_length = cfg, workdir, task, max_length
        self.src = src
        self.builds = 0
        if cfg.mode == "static":
            from onnxruntime.quantization.shape_inference import quant_pre_process

            if any(op in FUSED for op in op_counts(src)):
                # onnx shape inference cannot type the outputs of contrib ops, so QDQ leaves most of a fused
                # graph in float and fails on the pooler's bias
                raise BertforgeError(f"static QDQ quantization needs the unfused graph: bertforge export "
                                     f"--optimize none, then quantize that (ORT fuses the QDQ MatMuls itself)")

            self.src = workdir / "preprocessed.onnx"
            try:
                quant_pre_process(str(src), str(self.src), skip_symbolic_shape=True)
            except Exception as e:
                raise BertforgeError(f"quantization pre-processing of {src} failed: {str(e).splitlines()[0][:200]}") from None
            tokenizer = load_tokenizer(src.parent)
            examples = task_examples(task, cfg.glue_dir, split="train", limit=cfg.calibration_examples)
            names = {i.name for i in _session(self.src).get_inputs()}
            self.calibration = list(batches(examples, tokenizer, max_length, 16, names))
            self.cache = workdir / "calibration.json"

    def quantizable_nodes(self) -> list[str]:
        import onnx

        ops = DYNAMIC_OPS if self.cfg.mode == "dynamic" else STATIC_OPS
        graph = onnx.load(str(self.src), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        # nodes with a weight input: the ones whose int8 version saves memory and time
        return [n.name for n in graph.node if n.op_type in ops and any(i in weights for i in n.input)]

    def build(self, dst: Path, exclude=(), only=None) -> Path:
        from onnx import TensorProto
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        self.builds += 1
        extra = {"DefaultTensorType": TensorProto.FLOAT}
        if self.cfg.mode == "dynamic":
            quantize_dynamic(self.src, dst, weight_type=QuantType.QInt8, per_channel=self.cfg.per_channel,
                             op_types_to_quantize=DYNAMIC_OPS, nodes_to_exclude=list(exclude),
                             nodes_to_quantize=only, extra_options=extra)
        else:
            methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
            if self.cfg.calibration_method not in methods:
                raise BertforgeError(f"calibration_method must be one of {', '.join(methods)}")
            quantize_static(self.src, dst, _Feeds(self.calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=STATIC_OPS, per_channel=self.cfg.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude), nodes_to_quantize=only,
                            calibrate_method=methods[self.cfg.calibration_method],
                            calibration_cache_path=self.cache, extra_options=extra)
        return dst


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=[CPU_EP], disabled_optimizers=disabled_optimizers([CPU_EP]))


def _graph_runtime(folder: Path, graph: Path) -> OrtClassifier:
    """An OrtClassifier over `graph` with the config and tokenizer of `folder`."""
    rt = OrtClassifier(str(folder), file_name=str(graph.resolve()))
    rt.tokenizer = load_tokenizer(folder)
    return rt


def _logits(runtime, examples, task, max_length, batch_size) -> np.ndarray:
    """In the examples' order (batches run sorted by length)."""
    from pipeline.evaluate import predict_logits

    return predict_logits(runtime, examples, task, max_length, batch_size, progress=False)


def _score(task, logits, examples) -> float:
    return compute_metrics(task.name, logits_to_predictions(task.name, logits), [ex.label for ex in examples])["score"]


def _within(score: float, base: float, tolerance: float) -> bool:
    return score >= base - tolerance * abs(base) - 1e-12


def _quantize_ort(cfg: QuantizeConfig, start: float, progress: bool) -> Manifest:
    src = onnx_path(cfg.model)
    src_manifest = read_manifest(cfg.model)
    if src_manifest and src_manifest.precision != "fp32":
        raise BertforgeError(f"{cfg.model} is already {src_manifest.precision}: quantize the fp32 export")
    task = resolve_task(cfg.model, cfg.task)
    if cfg.mode == "static" and task is None:
        raise BertforgeError("static quantization calibrates on task data: set the task")
    if cfg.tolerance is not None and task is None:
        raise BertforgeError("accuracy-aware quantization tunes on the task's training rows: set the task")
    max_length = cfg.max_length or (task.default_max_length if task else 128)
    out = prepare_output_dir(cfg.out)
    (out / ONNX_FILE).unlink(missing_ok=True)
    params: dict = {**asdict(cfg), "max_length": max_length, "onnx_file": ONNX_FILE}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        if cfg.mode == "fp16":
            _to_fp16(src, tmp / ONNX_FILE)
            shutil.move(tmp / ONNX_FILE, out / ONNX_FILE)
        else:
            q = OrtQuantizer(cfg, src, tmp, task, max_length)
            if cfg.tolerance is None:
                q.build(out / ONNX_FILE)
            else:
                params["accuracy_aware"] = _accuracy_aware(q, cfg, task, src, out / ONNX_FILE, max_length)
            params["quantized_builds"] = q.builds
    copy_support_files(cfg.model, out)
    params["ops"] = op_counts(out / ONNX_FILE)
    precision = "fp16" if cfg.mode == "fp16" else "int8"
    metrics = {}
    if precision == "int8":
        reference = OrtClassifier(str(cfg.model), file_name=src.name)
        reference.tokenizer = load_tokenizer(cfg.model)
        candidate = OrtClassifier(str(out), file_name=ONNX_FILE)
        examples = task_examples(task, cfg.glue_dir, limit=cfg.eval_examples)
        params["agreement_with_source"] = compare_runtimes(reference, candidate, examples, max_length, cfg.batch_size)
        if task is not None:
            from pipeline.evaluate import evaluate

            candidate.tokenizer = reference.tokenizer
            metrics["dev"] = evaluate(str(out), task.name, runtime=candidate, examples=examples, max_length=max_length,
                                      progress=progress).metrics
            if cfg.eval_examples:
                metrics["dev"]["examples"] = len(examples)
            metrics["source_dev"] = evaluate(str(cfg.model), task.name, runtime=reference, examples=examples,
                                             max_length=max_length, progress=progress).metrics
    else:
        params["validated"] = "fp16 graph for GPU: not scored on this CPU"
    return write_manifest(out, Manifest(
        stage="quantize", task=task.name if task else None, format="onnx", precision=precision, parent=str(cfg.model),
        params=params, metrics=metrics, num_parameters=src_manifest.num_parameters if src_manifest else None,
        seed=src_manifest.seed if src_manifest else None, wall_s=round(time.perf_counter() - start, 1),
    ))


def _accuracy_aware(q: OrtQuantizer, cfg: QuantizeConfig, task, src: Path, dst: Path, max_length: int) -> dict:
    """Keep the most sensitive nodes in float, as few as needed to meet the tolerance on the tuning rows."""
    from pipeline.data import load_glue
    from pipeline.data.split import carve_validation

    folder = Path(cfg.model)
    train = load_glue(task.name, "train", cfg.glue_dir)
    _, tune = carve_validation(train, min(cfg.tune_examples, len(train) - 1), cfg.seed)
    base_logits = _logits(_graph_runtime(folder, src), tune, task, max_length, cfg.batch_size)
    base = _score(task, base_logits, tune)
    work = dst.parent / (dst.name + ".try.onnx")

    def score_of(exclude) -> float:
        q.build(work, exclude=exclude)
        return _score(task, _logits(_graph_runtime(folder, work), tune, task, max_length, cfg.batch_size), tune)

    trials = []
    full = score_of([])
    trials.append({"excluded": 0, "score": full})
    report = {"tuned_on": f"{len(tune)} train rows carved with seed {cfg.seed} (not dev)", "fp32_score": base,
              "tolerance": cfg.tolerance, "full_int8_score": full, "excluded_nodes": [], "sensitivity": {}}
    if _within(full, base, cfg.tolerance):
        shutil.move(work, dst)
        report.update(score=full, met=True, trials=trials)
        return report

    # sensitivity: logit error with only that node quantized, on a subset of the tuning rows
    probe = tune[:cfg.sensitivity_examples]
    probe_ref = base_logits[:len(probe)]
    sensitivity = {}
    for node in q.quantizable_nodes():
        q.build(work, only=[node])
        logits = _logits(_graph_runtime(folder, work), probe, task, max_length, cfg.batch_size)
        sensitivity[node] = float(np.mean((logits - probe_ref) ** 2))
    ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
    report["sensitivity"] = {n: sensitivity[n] for n in ranked}

    # smallest k (doubling, then bisection) whose exclusion of the k most sensitive nodes meets the tolerance
    scores = {0: full}

    def trial(k: int) -> float:
        if k not in scores:
            scores[k] = score_of(ranked[:k])
            trials.append({"excluded": k, "score": scores[k]})
        return scores[k]

    lo, hi, k = 0, len(ranked), 1
    while k < len(ranked):
        if _within(trial(k), base, cfg.tolerance):
            hi = k
            break
        lo, k = k, k * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if not _within(trial(mid), base, cfg.tolerance) else (lo, mid)
    score = trial(hi)  # measured, also when every node stays float (the graph still differs from the source)
    excluded = ranked[:hi]
    q.build(dst, exclude=excluded)
    work.unlink(missing_ok=True)
    report.update(excluded_nodes=excluded, score=score, met=_within(score, base, cfg.tolerance), trials=trials)
    return report


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))


# -- neural-compressor (PyTorch) ------------------------------------------------------------------

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inc_inputs(tokenizer, examples, max_length, batch_size):
    """Tensors in the positional order the exported program takes (a missing type-id input is zeros)."""
    import torch

    for feed in batches(examples, tokenizer, max_length, batch_size):
        ids = torch.as_tensor(feed["input_ids"])
        yield (ids, torch.as_tensor(feed.get("attention_mask", np.ones_like(feed["input_ids"]))),
               torch.as_tensor(feed.get("token_type_ids", np.zeros_like(feed["input_ids"]))))


def _quantize_inc(cfg: QuantizeConfig, start: float) -> Manifest:
    import torch
    from torch.export import Dim

    from pipeline.models import load_model

    if is_onnx_artifact(cfg.model):
        raise BertforgeError(f"mode {cfg.mode} (neural-compressor) quantizes the PyTorch model, not the ONNX {cfg.model}")
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    from neural_compressor.torch.export import export as inc_export
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig, convert, prepare

    model_dir = resolve_model(cfg.model)
    task = resolve_task(model_dir, cfg.task)
    max_length = cfg.max_length or (task.default_max_length if task else 128)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    wrapped = _LogitsOnly(model).eval()
    calibration = task_examples(task, cfg.glue_dir, split="train" if task else None, limit=cfg.calibration_examples)
    example = next(_inc_inputs(tokenizer, calibration, max_length, 4))
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=model.config.max_position_embeddings)
    shapes = {name: {0: batch, 1: seq} for name in INPUTS}
    try:
        graph = inc_export(wrapped, example, dynamic_shapes=shapes)
        graph = prepare(graph, StaticQuantConfig() if cfg.mode == "inc-static" else DynamicQuantConfig())
        with torch.no_grad():
            for inputs in _inc_inputs(tokenizer, calibration, max_length, 16):
                graph(*inputs)
        graph = convert(graph)
        program = torch.export.export(graph, example, dynamic_shapes=shapes)
    except BertforgeError:
        raise
    except Exception as e:
        raise BertforgeError(f"neural-compressor quantization of {cfg.model} failed: {str(e).strip().splitlines()[0][:200]}") from None
    out = prepare_output_dir(cfg.out)
    torch.export.save(program, out / PT2_FILE)
    copy_support_files(model_dir, out)
    params = {**asdict(cfg), "max_length": max_length, "pt2_file": PT2_FILE, "backend": "neural-compressor PT2E",
              "load": f"torch.export.load('{PT2_FILE}').module()(input_ids, attention_mask, token_type_ids) -> logits",
              "note": "qdq graph: uncompiled it runs slower than fp32 eager; torch.compile lowers it to int8 kernels"}
    metrics = {}
    runtime = Pt2Classifier(str(out))
    examples = task_examples(task, cfg.glue_dir, limit=cfg.eval_examples)
    from pipeline.inference import TorchClassifier

    reference = TorchClassifier.from_model(model, tokenizer)
    params["agreement_with_source"] = compare_runtimes(reference, runtime, examples, max_length, cfg.batch_size)
    if task is not None:
        from pipeline.evaluate import evaluate

        metrics["dev"] = evaluate(str(out), task.name, runtime=runtime, examples=examples, max_length=max_length,
                                  progress=False).metrics
    src_manifest = read_manifest(model_dir)
    return write_manifest(out, Manifest(
        stage="quantize", task=task.name if task else None, format="pytorch", precision="int8", parent=str(cfg.model),
        params=params, metrics=metrics, num_parameters=sum(p.numel() for p in model.parameters()),
        seed=src_manifest.seed if src_manifest else None, wall_s=round(time.perf_counter() - start, 1),
    ))


class _LogitsOnly:
    """Positional (input_ids, attention_mask, token_type_ids) -> logits: the signature torch.export keeps."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

        return Wrapper(model)


class Pt2Classifier:
    """Runs a neural-compressor artifact (`model.pt2`) with the runtime interface of pipeline.inference."""

    format = "pytorch"

    def __init__(self, path: str, num_threads: int | None = None, compile: bool = False):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        file = Path(path) / PT2_FILE
        if not file.is_file():
            raise BertforgeError(f"{path} holds no {PT2_FILE}")
        try:
            self.module = torch.export.load(str(file)).module()
        except Exception as e:
            raise BertforgeError(f"cannot load {file}: {str(e).strip().splitlines()[0][:200]}") from None
        if compile:
            self.module = torch.compile(self.module)
        self.path, self.config, self.tokenizer = path, load_config(path), load_tokenizer(path)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        ids = torch.as_tensor(np.asarray(inputs["input_ids"], dtype=np.int64))
        mask = torch.as_tensor(np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64))
        types = torch.as_tensor(np.asarray(inputs.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64))
        with torch.no_grad():
            return self.module(ids, mask, types).float().numpy()

