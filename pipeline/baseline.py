"""The BERT-base baseline every benchmark compares against, in PyTorch fp32 and ONNX Runtime int8.

The real bert-base-uncased when the hub can be reached; otherwise a randomly initialised model of the
same shape (BertConfig defaults: 12 layers, hidden 768, 12 heads, FFN 3072, the uncased vocabulary),
which costs the same to run and to store. Either way the classification head is untrained, so a
baseline is for speed and size only: its manifest carries no score, and a shape-only one says so.

The int8 variant is what "just quantize BERT-base" gives: ONNX export, ONNX Runtime's BERT fusions and
dynamic int8 — the same recipe (`bertforge export` then `bertforge quantize --mode dynamic`) as the
compressed students, so the ratio against it is fair. The model carries the task's label count but no
`finetuning_task`: the export and quantize stages then validate on the bundled SST-2 sample, offline.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.artifacts import Manifest, read_manifest, write_manifest
from pipeline.errors import BertforgeError

BERT_BASE = "bert-base-uncased"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_baseline(out_dir: str | Path, task: str = "sst2", hub_id: str | None = BERT_BASE,
                   shape: dict[str, Any] | None = None, int8: bool = True, seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/torch-fp32` (and `out_dir/ort-int8`); folders already built with the same
    settings are reused. `shape` overrides BertConfig fields (tests use a tiny one; it forces shape-only)."""
    out_dir = Path(out_dir)
    out = {"torch_fp32": _torch_fp32(out_dir / "torch-fp32", task, None if shape else hub_id, shape or {}, seed)}
    if int8:
        out["ort_int8"] = _ort_int8(out["torch_fp32"], out_dir / "ort-int8")
    return out


def _matches(folder: Path, **params) -> bool:
    manifest = read_manifest(folder)
    return (manifest is not None and manifest.stage == "baseline"
            and all(manifest.params.get(k) == v for k, v in params.items()))


def _torch_fp32(out: Path, task: str, hub_id: str | None, shape: dict[str, Any], seed: int) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.models import count_parameters, label_config, packaged_minilm_dir

    spec = get_task(task)
    wanted = {"requested": hub_id or "shape-only", "shape": shape, "task": spec.name}
    if _matches(out, **wanted):
        return out
    labels = label_config(spec)
    labels.pop("finetuning_task")  # no task: the stages validate on the bundled sample, never the hub
    model = tokenizer = None
    if hub_id:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(hub_id, **labels)
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
        except (OSError, ValueError) as e:  # offline, or the hub refused: fall back to the same shape
            print(f"[baseline] {hub_id} not loadable ({str(e).splitlines()[0][:120]}); using a BERT-base-shaped random model")
            model = None
    shape_only = model is None
    if shape_only:
        tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())  # the same uncased BERT vocabulary
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=tokenizer.vocab_size, **shape)
        config.update(labels)
        model = BertForSequenceClassification(config)
    tmp = Path(tempfile.mkdtemp(prefix=".baseline-", dir=_mkparent(out)))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    c = model.config
    write_manifest(tmp, Manifest(
        stage="baseline", task=spec.name, format="pytorch", precision="fp32",
        parent=None if shape_only else hub_id,
        params={**wanted, "baseline_role": "torch_fp32", "shape_only": shape_only,
                "source": "random init, BertConfig shape" if shape_only else hub_id,
                "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                "intermediate": c.intermediate_size,
                "note": "speed and size only: untrained classification head, no score"},
        seed=seed if shape_only else None, num_parameters=count_parameters(model)))
    _publish(tmp, out)
    return out


def _ort_int8(source: Path, out: Path) -> Path:
    src = read_manifest(source)
    wanted = {"source_sha256": _weights_sha(src)}
    if _matches(out, **wanted):
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".baseline-", dir=_mkparent(out)))
    recipe = _export_and_quantize(source, tmp)
    write_manifest(tmp, Manifest(
        stage="baseline", task=src.task, format="onnx", precision="int8", parent=str(source),
        params={**wanted, "baseline_role": "ort_int8", "shape_only": src.params.get("shape_only", False),
                "source": src.params.get("source"), "onnx_file": "model.onnx", "recipe": recipe,
                "note": "speed and size only: untrained classification head, no score"},
        num_parameters=src.num_parameters))
    _publish(tmp, out)
    return out


def _export_and_quantize(source: Path, out: Path) -> dict:
    """The students' own stages when this checkout has them; else the same three steps done here."""
    try:
        from pipeline.export import ExportConfig, export
        from pipeline.quantize import QuantizeConfig, quantize
    except ImportError:
        export_fused_int8(source, out / "model.onnx")
        for name in ("config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return {"steps": "torch.onnx export, onnxruntime BERT fusions, quantize_dynamic QInt8"}
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    exported = export(ExportConfig(model=str(source), out=str(work / "export"), evaluate_dev=False,
                                   validation_examples=16), progress=False)
    quantized = quantize(QuantizeConfig(model=str(work / "export"), out=str(work / "int8"), mode="dynamic",
                                        eval_examples=16), progress=False)
    for f in (work / "int8").iterdir():
        if f.is_file() and f.name != "bertforge.json":
            shutil.move(str(f), out / f.name)
    shutil.rmtree(work)
    return {"steps": "bertforge export (O2 fusions) then bertforge quantize --mode dynamic",
            "export_validation": exported.params.get("validation"),
            "agreement_with_fp32": quantized.params.get("agreement_with_source")}


def export_fused_int8(model_dir: Path, onnx_path: Path) -> Path:
    """ONNX export (dynamic batch and sequence), BERT fusions, dynamic int8 quantization."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    model.config.return_dict = False
    work = onnx_path.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(1, 16, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(
            model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(work / "fp32.onnx"),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "logits": {0: "batch"}},
            opset_version=17, dynamo=False)  # the TorchScript exporter: no onnxscript needed (see NOTES)
    c = model.config
    fused = optimize_model(str(work / "fp32.onnx"), model_type="bert", num_heads=c.num_attention_heads,
                           hidden_size=c.hidden_size)
    fused.save_model_to_file(str(work / "fused.onnx"))
    # DefaultTensorType: without it quantize_dynamic cannot type some fused-graph weights (see NOTES)
    quantize_dynamic(str(work / "fused.onnx"), str(onnx_path), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    shutil.rmtree(work)
    if not onnx_path.is_file():
        raise BertforgeError(f"int8 export of {model_dir} wrote no model")
    return onnx_path


def _weights_sha(manifest: Manifest) -> str:
    return ",".join(f["sha256"][:16] for f in manifest.files if f["path"].endswith((".safetensors", ".bin")))


def _mkparent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
