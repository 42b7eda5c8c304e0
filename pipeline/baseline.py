"""The BERT-base baseline every benchmark compares against, in PyTorch fp32 and ONNX Runtime int8.

The real bert-base-uncased when the hub can be reached; otherwise a randomly initialised model of the
same shape (BertConfig defaults: 12 layers, hidden 768, 12 heads, FFN 3072, the uncased vocabulary),
which costs the same to run and to store. Either way the classification head is untrained, so that
baseline is for speed and size only: its manifest carries no score, and a shape-only one says so.

A fine-tuned classifier instead (a hub id such as `textattack/bert-base-uncased-SST-2`, or a folder, e.g.
the run's own teacher as in the TinyBERT paper) is the accurate baseline: both variants are scored on
the task's dev split and carry that score beside their speed and size.

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
                   shape: dict[str, Any] | None = None, int8: bool = True, seed: int = 0,
                   glue_dir: str | Path | None = None, max_length: int | None = None) -> dict[str, Path]:
    """Write `out_dir/torch-fp32` (and `out_dir/ort-int8`); folders already built with the same
    settings are reused. `shape` overrides BertConfig fields (tests use a tiny one; it forces shape-only).
    A fine-tuned `hub_id` (a classifier) is scored on `glue_dir`'s dev split (SST-2: the bundled sample)."""
    out_dir = Path(out_dir)
    scoring = {"glue_dir": str(glue_dir) if glue_dir else None, "max_length": max_length}
    out = {"torch_fp32": _torch_fp32(out_dir / "torch-fp32", task, None if shape else hub_id, shape or {}, seed, scoring)}
    if int8:
        out["ort_int8"] = _ort_int8(out["torch_fp32"], out_dir / "ort-int8", scoring)
    return out


def _dev_metrics(folder: Path, task: str, scoring: dict) -> dict:
    """The dev metrics of a baseline folder (as bertforge eval computes them)."""
    from pipeline.data import sample_data_dir
    from pipeline.evaluate import evaluate

    data = scoring["glue_dir"] or (sample_data_dir() if task == "sst2" else None)
    result = evaluate(str(folder), task, data, max_length=scoring["max_length"], progress=False)
    return {"dev": result.metrics, result.split: result.metrics}


def _matches(folder: Path, **params) -> bool:
    manifest = read_manifest(folder)
    return (manifest is not None and manifest.stage == "baseline"
            and all(manifest.params.get(k) == v for k, v in params.items()))


def _torch_fp32(out: Path, task: str, hub_id: str | None, shape: dict[str, Any], seed: int, scoring: dict) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.errors import BertforgeError
    from pipeline.models import count_parameters, is_classifier, label_config, load_classifier, load_config, packaged_minilm_dir

    spec = get_task(task)
    local = bool(hub_id) and Path(hub_id).exists()
    # a folder's content, not only its name, decides whether the built baseline is still the same
    wanted = {"requested": hub_id or "shape-only", "shape": shape, "task": spec.name, "scoring": scoring,
              "source_sha256": _folder_sha(Path(hub_id)) if local else None}
    if _matches(out, **wanted):
        return out
    labels = label_config(spec)
    labels.pop("finetuning_task")  # no task: the stages validate on the bundled sample, never the hub
    model = tokenizer = None
    fine_tuned = False
    if hub_id:
        try:
            fine_tuned = is_classifier(load_config(hub_id))
            model = load_classifier(hub_id, spec)  # a fine-tuned head is kept; a base model gets a fresh one
            model.config.finetuning_task = None
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
        except (BertforgeError, OSError, ValueError) as e:
            if local or "label-count mismatch" in str(e):
                raise BertforgeError(f"baseline model {hub_id}: {str(e).splitlines()[0][:200]}") from None
            # offline, or the hub refused: fall back to the same shape
            print(f"[baseline] {hub_id} not loadable ({str(e).splitlines()[0][:120]}); using a BERT-base-shaped random model")
            model, fine_tuned = None, False
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
        params={**wanted, "baseline_role": "torch_fp32", "shape_only": shape_only, "fine_tuned": fine_tuned,
                "source": "random init, BertConfig shape" if shape_only else hub_id,
                "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                "intermediate": c.intermediate_size, "note": FINE_TUNED_NOTE if fine_tuned else UNTRAINED_NOTE},
        metrics=_dev_metrics(tmp, spec.name, scoring) if fine_tuned else {},
        seed=seed if shape_only else None, num_parameters=count_parameters(model)))
    _publish(tmp, out)
    return out


UNTRAINED_NOTE = "speed and size only: untrained classification head, no score"
FINE_TUNED_NOTE = "fine-tuned classifier: the accurate baseline, scored on the task's dev split"


def _ort_int8(source: Path, out: Path, scoring: dict) -> Path:
    src = read_manifest(source)
    fine_tuned = bool(src.params.get("fine_tuned"))
    wanted = {"source_sha256": _weights_sha(src), "scoring": scoring if fine_tuned else None}
    if _matches(out, **wanted):
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".baseline-", dir=_mkparent(out)))
    recipe = _export_and_quantize(source, tmp)
    write_manifest(tmp, Manifest(
        stage="baseline", task=src.task, format="onnx", precision="int8", parent=str(source),
        params={**wanted, "baseline_role": "ort_int8", "shape_only": src.params.get("shape_only", False),
                "fine_tuned": fine_tuned, "source": src.params.get("source"), "onnx_file": "model.onnx", "recipe": recipe,
                "note": FINE_TUNED_NOTE if fine_tuned else UNTRAINED_NOTE},
        metrics=_dev_metrics(tmp, src.task, scoring) if fine_tuned else {},
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


def _folder_sha(folder: Path) -> str:
    from pipeline.artifacts import sha256

    return ",".join(sha256(f)[:16] for f in sorted(folder.iterdir()) if f.name.endswith((".safetensors", ".bin", "config.json")))


def _weights_sha(manifest: Manifest) -> str:
    return ",".join(f["sha256"][:16] for f in manifest.files if f["path"].endswith((".safetensors", ".bin")))


def _mkparent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
