"""ONNX Runtime's SkipLayerNormalization on the CPU: the graphs bertforge builds against ORT's defaults.

ORT fuses every residual Add + LayerNormalization into one SkipLayerNormalization, in the BERT optimizer (the
fused export) and, for dynamic-int8 graphs, again when a session loads. On the CPU that kernel was measured
slower than the two ops it replaces, so bertforge's CPU sessions turn the fusion off
(`pipeline.providers.CPU_DISABLED_OPTIMIZERS`) and its fused CPU export leaves it out. This script measures
that choice side by side in one process, with one thread for every runtime:

- `kernel`: one SkipLayerNormalization node against Add + LayerNormalization on the same input;
- `model`: all-MiniLM-L6-v2's shape (the packaged weights, a fresh classifier head: speed does not depend on
  it), whole and with half its heads and FFN neurons removed in every layer, as plain and fused graphs in fp32
  and dynamic int8; each graph timed with ORT's defaults (and, for the fused one, the optimizer's default
  fusions) and as bertforge builds and loads it. Batch 1 and 8, sequence 128; the median call.

Writes benchmarks/results/ort_fusions.json.

    python benchmarks/ort_fusions.py
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, git_commit, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def median_ms(session, feed: dict, seconds: float) -> float:
    for _ in range(10):
        session.run(None, feed)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 4)


def session(model, threads: int, disabled: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def kernel_rows(threads: int, seconds: float) -> list[dict]:
    """One SkipLayerNormalization against Add + LayerNormalization, BERT-style: 128 x 384 and 128 x 768."""
    from onnx import TensorProto, helper

    rows = []
    for hidden in (384, 768):
        shape = [1, 128, hidden]
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
        weights = [helper.make_tensor("gamma", TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)),
                   helper.make_tensor("beta", TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32))]
        graphs = {
            "SkipLayerNormalization": [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                                        domain="com.microsoft", epsilon=1e-12)],
            "Add + LayerNormalization": [helper.make_node("Add", ["x", "skip"], ["sum"]),
                                         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"],
                                                          axis=-1, epsilon=1e-12)],
        }
        feed = {"x": np.random.default_rng(0).standard_normal(shape, np.float32),
                "skip": np.random.default_rng(1).standard_normal(shape, np.float32)}
        row = {"what": "kernel", "shape": shape}
        for name, nodes in graphs.items():
            model = helper.make_model(helper.make_graph(nodes, "g", inputs, [output], weights), ir_version=9,
                                      opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
            # the unfused pair is timed with the fusion off, or ORT would fuse it back at load
            row[f"{name}_ms"] = median_ms(session(model.SerializeToString(), threads, ["SkipLayerNormFusion"]), feed, seconds)
        row["ratio"] = round(row["SkipLayerNormalization_ms"] / row["Add + LayerNormalization_ms"], 2)
        rows.append(row)
    return rows


def build_models(work: Path, glue_dir: str) -> dict[str, Path]:
    """MiniLM-L6's shape, whole and half-pruned: plain and fused graphs (default and bertforge fusions), fp32
    and dynamic int8. Returns {name: model.onnx}."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeline.export import ExportConfig, export
    from pipeline.models import packaged_minilm_dir
    from pipeline.prune import _save, prune_structured
    from pipeline.quantize import QuantizeConfig, quantize

    logging.getLogger("onnxruntime.transformers.fusion_attention").setLevel(logging.ERROR)
    graphs = {}
    for shape, (heads, neurons) in {"L6": (0, 0), "L6-heads50-ffn50": (6, 768)}.items():
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(packaged_minilm_dir(), num_labels=2)
        model.config.finetuning_task = "sst2"
        layers = model.config.num_hidden_layers
        prune_structured(model, [list(range(heads))] * layers, [list(range(neurons))] * layers)
        _save(model, AutoTokenizer.from_pretrained(packaged_minilm_dir()), work / shape / "pt")
        for graph, optimize in (("plain", "none"), ("fused", "O2")):
            folder = work / shape / graph
            export(ExportConfig(model=str(work / shape / "pt"), out=str(folder), task="sst2", glue_dir=glue_dir,
                                optimize=optimize, validation_examples=16, evaluate_dev=False), progress=False)
            graphs[f"{shape}/{graph}/fp32"] = folder / "model.onnx"
            quantize(QuantizeConfig(model=str(folder), out=str(folder) + "-int8", task="sst2", glue_dir=glue_dir,
                                    eval_examples=16), progress=False)
            graphs[f"{shape}/{graph}/int8"] = Path(str(folder) + "-int8") / "model.onnx"
        # ORT's default BERT fusions (SkipLayerNormalization included), as the fused export was before
        default = work / shape / "fused-ort-default"
        default.mkdir()
        optimize_model(str(work / shape / "plain" / "model.onnx"), "bert", num_heads=0, hidden_size=0) \
            .save_model_to_file(str(default / "model.onnx"))
        graphs[f"{shape}/fused-ort-default/fp32"] = default / "model.onnx"
        for f in (work / shape / "plain").iterdir():  # quantize() wants a whole artifact folder
            if not (default / f.name).exists() and f.name != "bertforge.json":
                (default / f.name).symlink_to(f)
        quantize(QuantizeConfig(model=str(default), out=str(default) + "-int8", task="sst2", glue_dir=glue_dir,
                                eval_examples=16), progress=False)
        graphs[f"{shape}/fused-ort-default/int8"] = Path(str(default) + "-int8") / "model.onnx"
    return graphs


def model_rows(graphs: dict[str, Path], threads: int, seconds: float, batches: list[int]) -> list[dict]:
    from pipeline.providers import CPU_DISABLED_OPTIMIZERS

    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        feed = {"input_ids": rng.integers(1000, 20000, (batch, 128)), "attention_mask": np.ones((batch, 128), np.int64),
                "token_type_ids": np.zeros((batch, 128), np.int64)}
        for name, path in graphs.items():
            shape, graph, precision = name.split("/")
            row = {"what": "model", "shape": shape, "graph": graph, "precision": precision, "batch": batch, "seq": 128}
            row["ort_defaults_ms"] = median_ms(session(str(path), threads, []), feed, seconds)
            row["bertforge_session_ms"] = median_ms(session(str(path), threads, list(CPU_DISABLED_OPTIMIZERS)), feed, seconds)
            row["speedup"] = round(row["ort_defaults_ms"] / row["bertforge_session_ms"], 3)
            rows.append(row)
            print(f"batch {batch} {name:36s} ORT defaults {row['ort_defaults_ms']:8.2f} ms   "
                  f"bertforge {row['bertforge_session_ms']:8.2f} ms", flush=True)
    return rows


def main(argv=None) -> None:
    from pipeline.bench import hardware_info, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue_data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per graph and setting")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--machine-note", default="nothing else ran on the 2-core machine")
    p.add_argument("--out", default=str(RESULTS / "ort_fusions.json"))
    args = p.parse_args(argv)

    commit = git_commit()
    rows = kernel_rows(args.threads, args.seconds)
    for r in rows:
        print(f"kernel {r['shape']}: SkipLayerNormalization {r['SkipLayerNormalization_ms']} ms, "
              f"Add + LayerNormalization {r['Add + LayerNormalization_ms']} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows += model_rows(build_models(Path(tmp), args.glue_dir), args.threads, args.seconds, args.batch_sizes)
    write_results(args.out, {
        "benchmark": __doc__.split("\n")[0], "command": command_line(), "git_commit": commit,
        "threads": args.threads, "machine_note": args.machine_note, "hardware": hardware_info(),
        "versions": versions(),
        "note": "ort_defaults: the graph loaded with ONNX Runtime's default session optimizations; "
                "bertforge_session: loaded as bertforge loads it on the CPU (SkipLayerNormFusion off). Graphs: "
                "plain = the unfused export; fused = bertforge's fused CPU export (no SkipLayerNormalization); "
                "fused-ort-default = onnxruntime's BERT optimizer with its default fusions (the fused export "
                "before this change). int8 = dynamic int8 of each. Ratios within one row are side by side in "
                "one process; rows are timed one after another.",
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
