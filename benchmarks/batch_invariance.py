"""Does an artifact's answer depend on what it is batched with? Each dev text alone, then in batches.

A server that batches dynamically (serving/batcher.py) runs a request with whatever else arrived in the
same few milliseconds, padded to the batch's longest text (serving/predictor.py). fp32 graphs give the same
answer either way, up to float rounding. Dynamic int8 does not: ONNX Runtime's DynamicQuantizeLinear takes
one activation scale over the whole input tensor, so a neighbour with larger activations coarsens every
other row's int8 grid. Static int8 calibrates its scales once, offline, so no row can move another.

For each artifact the same Predictor the server uses answers every dev text on its own, then the same texts
shuffled (fixed seed) into batches of each `--batch-sizes`; a row counts as changed when its label differs,
and the largest logit difference is recorded. What invariance costs: every artifact is then timed side by side
(`bertforge bench`'s interleaved rotation, batch 1, sequence 128, the same threads), and scored on dev.
Writes benchmarks/results/batch_invariance.json.

    python benchmarks/batch_invariance.py --artifact onnx=runs/sst2-report/onnx \\
        --artifact dynamic-int8=runs/sst2-report/int8 --artifact static-int8=runs/sst2-static --task sst2
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, git_commit, input_checksums, write_results

ROOT = Path(__file__).resolve().parent.parent


def answers(predictor, texts: list, batch_size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Labels and logits of `texts`, in their order, computed in shuffled batches of `batch_size`."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    labels, logits = [None] * len(texts), [None] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, a in zip(chunk, predictor([texts[i] for i in chunk])):
            labels[i], logits[i] = a.get("label", a.get("value")), a.logits
    return labels, np.asarray(logits, dtype=np.float64)


def measure(path: str, texts: list, batch_sizes: list[int], seed: int, threads: int, max_tokens: int) -> dict:
    from pipeline.artifacts import read_manifest
    from pipeline.inference import load_runtime
    from serving.predictor import Predictor

    predictor = Predictor(load_runtime(path, num_threads=threads), max_tokens=max_tokens)
    alone_labels, alone_logits = answers(predictor, texts, 1, seed)
    manifest = read_manifest(path)
    out = {"format": manifest.format if manifest else None, "precision": manifest.precision if manifest else None,
           "quantization": (manifest.params or {}).get("mode") if manifest else None,
           "dev_score": (manifest.metrics.get("dev") or {}).get("score") if manifest else None, "batches": []}
    for b in batch_sizes:
        t0 = time.perf_counter()
        labels, logits = answers(predictor, texts, b, seed)
        changed = sum(x != y for x, y in zip(labels, alone_labels))
        out["batches"].append({"batch_size": b, "changed": changed, "changed_share": round(changed / len(texts), 5),
                               "max_abs_logit_diff": float(np.abs(logits - alone_logits).max()),
                               "seconds": round(time.perf_counter() - t0, 2)})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", action="append", required=True, metavar="NAME=PATH",
                   help="an artifact folder (ONNX or PyTorch), repeatable")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue_data"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--seed", type=int, default=0, help="the shuffle that picks each text's neighbours")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--bench-seconds", type=float, default=10.0, help="timed seconds per artifact, at least")
    p.add_argument("--machine-note", default=None, help="what else ran on the machine (recorded)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_invariance.json"))
    args = p.parse_args(argv)
    artifacts = {}
    for item in args.artifact:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            p.error(f"--artifact {item}: expected NAME=FOLDER with an existing folder")
        artifacts[name] = path

    from pipeline.bench import ArtifactSpec, BenchConfig, benchmark_artifacts
    from pipeline.data import get_task, load_glue
    from pipeline.data.tasks import dev_split

    spec = get_task(args.task)
    dev = load_glue(spec.name, dev_split(spec), args.glue_dir)
    texts = [ex.text_a if ex.text_b is None else (ex.text_a, ex.text_b) for ex in dev]
    rows = []
    for name, path in artifacts.items():
        print(f"{name}: {len(texts)} texts alone, then in batches of {args.batch_sizes}", flush=True)
        rows.append({"artifact": name, "path": path, **measure(path, texts, args.batch_sizes, args.seed, args.threads,
                                                                args.max_tokens),
                     "weights_sha256": input_checksums(weights=path)["weights"]})
    result = {
        "benchmark": "batch_invariance", "task": spec.name, "texts": len(texts), "seed": args.seed,
        "threads": args.threads, "max_tokens": args.max_tokens, "command": command_line(), "git_commit": git_commit(),
        "inputs": input_checksums(dev=Path(args.glue_dir) / spec.folder / f"{spec.splits.get(dev_split(spec), dev_split(spec))}.tsv"),
        "rows": rows}
    bench = benchmark_artifacts([ArtifactSpec(name, Path(path)) for name, path in artifacts.items()],
                                BenchConfig(batch_sizes=[1], seq_lens=[128], threads=args.threads, device="cpu",
                                            cold_start="inprocess", min_seconds=args.bench_seconds,
                                            max_seconds=4 * args.bench_seconds), progress=False)
    p50 = {b["artifact"]: b["p50_ms"] for b in bench["results"]}
    for r in rows:
        r["p50_ms_b1_s128"] = round(p50[r["artifact"]], 3)
    write_results(Path(args.out), {**result, "cpu": bench["hardware"].get("cpu_model"),
                                   "machine_note": args.machine_note})
    for r in rows:
        print(r["artifact"], r["dev_score"], r["p50_ms_b1_s128"],
              [(b["batch_size"], b["changed"], f"{b['max_abs_logit_diff']:.2e}") for b in r["batches"]])


if __name__ == "__main__":
    main()
