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

BERT_BASE = "bert-base-uncased"


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
    """The students' own export and quantize stages, so the baseline's int8 recipe is theirs."""
    from pipeline.export import ExportConfig, export
    from pipeline.quantize import QuantizeConfig, quantize

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


def _weights_sha(manifest: Manifest) -> str:
    return ",".join(f["sha256"][:16] for f in manifest.files if f["path"].endswith((".safetensors", ".bin")))


def _mkparent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
