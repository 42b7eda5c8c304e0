"""Pruning that keeps accuracy, and vocabulary trimming, on SST-2 from one distilled student.

Part `prune`: the same heads and FFN ratios, the same recovery budget (optimizer steps x batch size over
the same training rows), three ways:
  one-shot, prediction-only recovery (bertforge's previous behaviour);
  one-shot, transformer-distillation recovery (hidden states and attention, then the logits);
  iterative (`--steps` steps), transformer-distillation recovery between them;
  one-shot, joint recovery (hidden states, attention and logits summed at every step);
  the transformer and joint recoveries without the attention term (`-hidden`: hidden states only, as
  DynaBERT and CoFi match layers).
Each variant runs once per seed (`--seeds`: data order, importance rows, dropout). Each row: dev score
before any recovery (one-shot) and after, and the drop in points against the unpruned student; the summary
gives each variant's mean drop and its ratio to one-shot prediction-only recovery's. Nothing is chosen on dev: every setting is fixed beforehand and the model after the last recovery
step is kept, so dev is scored once per variant.

Part `vocab`: the student's vocabulary trimmed to the word pieces of the SST-2 training rows plus a reserve;
sizes before/after, the share of dev word pieces lost to [UNK], dev score before/after.

Artifacts go under benchmarks/results/prune_recovery/<student's weights sha256, 12 digits>/ (git-ignored); a
variant whose folder already has its bertforge.json is not rebuilt. Rows go to
benchmarks/results/prune_recovery.json (`--out`); parts not run keep their rows from an existing file made
from the same student and data, and a file made from another student is started afresh, never mixed.

    python benchmarks/prune_recovery.py --student runs/quickstart/student --glue-dir ../shared/glue_data
    python benchmarks/prune_recovery.py --student runs/quickstart/student --parts vocab   # one part again
    python benchmarks/prune_recovery.py --student S --parts prune --variants prediction,transformer --seeds 0,1,2

A student that kept rows apart from its training (the accuracy budget's, under `budget/selection-data/`) can
recover on its own training rows (`--train-file`) and be scored there as well as on dev (`--validation-dir`, a
GLUE-layout folder whose SST-2/dev.tsv holds the carved rows): the row's `validation_drop_points`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import command_line, git_commit, input_checksums, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# (reserve, characters) of the vocabulary rows: the bare training pieces, plus the ASCII fallback, plus a reserve
VOCAB_SETTINGS = ((0, False), (0, True), (1000, True))
DEFAULT_TRAIN_ROWS = 1600


def variants(args) -> dict[str, dict]:
    """The variants asked for (`--variants`), one-shot prediction-only recovery first: it is the baseline the
    summary divides by."""
    every = {
        "one-shot-prediction": {"recovery": "prediction", "steps": 1},
        "one-shot-transformer": {"recovery": "transformer", "steps": 1},
        f"iterative-{args.steps}-transformer": {"recovery": "transformer", "steps": args.steps},
        "one-shot-joint": {"recovery": "joint", "steps": 1},
        "one-shot-transformer-hidden": {"recovery": "transformer", "steps": 1, "attention_weight": 0.0},
        "one-shot-joint-hidden": {"recovery": "joint", "steps": 1, "attention_weight": 0.0},
    }
    kinds = {"one-shot-prediction": "prediction", "one-shot-transformer": "transformer",
             f"iterative-{args.steps}-transformer": "iterative", "one-shot-joint": "joint",
             "one-shot-transformer-hidden": "transformer-hidden", "one-shot-joint-hidden": "joint-hidden"}
    return {name: opts for name, opts in every.items() if kinds[name] in args.variants}


def section_tag(args) -> str:
    """What sets a prune section (and its folders) apart from the default one: the recovery rows and the ratios."""
    rows = "" if args.train_rows == DEFAULT_TRAIN_ROWS else f"-rows{args.train_rows or 'all'}"
    ratios = "" if (args.heads, args.ffn) == (0.5, 0.5) else f"-h{args.heads:g}-f{args.ffn:g}"
    return rows + ratios


def prune_part(args, work: Path, base: dict) -> dict:
    from pipeline.artifacts import read_manifest
    from pipeline.evaluate import evaluate
    from pipeline.prune import PruneConfig, prune
    from pipeline.training import LoopConfig

    rows = []
    for seed in args.seeds:
        for name, opts in variants(args).items():
            folder = work / f"{name}{section_tag(args)}-seed{seed}"
            if read_manifest(folder) is None:
                t0 = time.perf_counter()
                loop = LoopConfig(epochs=1, batch_size=args.batch_size, learning_rate=args.lr, checkpoint_every=50,
                                  seed=seed)
                prune(PruneConfig(model=args.student, task="sst2", out=str(folder), glue_dir=args.glue_dir,
                                  heads=args.heads, ffn=args.ffn, importance_examples=args.importance_examples,
                                  recover_epochs=1, max_train_examples=args.train_rows, num_threads=args.threads,
                                  train_file=args.train_file,
                                  loop=loop, **opts), resume=True, progress=False)
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            m = read_manifest(folder)
            dev, before = m.metrics["dev"]["score"], m.metrics["dev_before_recovery"]["score"]
            carved = {}
            if args.validation_dir:
                score = evaluate(str(folder), "sst2", args.validation_dir, progress=False).metrics["score"]
                carved = {"validation_unpruned": round(base["validation"], 4), "validation": round(score, 4),
                          "validation_drop_points": round(100 * (base["validation"] - score), 2)}
            rows.append({
                "variant": name, "seed": seed, **opts, "heads": args.heads, "ffn": args.ffn,
                "heads_after": m.params["after"]["heads"], "ffn_after": m.params["after"]["ffn"],
                "params_before": m.params["before"]["params"], "params_after": m.num_parameters,
                "recovery_rows": m.params["recovery_rows"], "recovery_examples": m.params["recovery_examples"],
                "recovery_plan": m.params["recovery_plan"],
                "dev_unpruned": round(base["dev"], 4),
                "dev_before_recovery": round(before, 4), "dev": round(dev, 4),
                "dev_drop_points": round(100 * (base["dev"] - dev), 2),
                "dev_drop_before_recovery_points": round(100 * (base["dev"] - before), 2),
                **carved, "wall_s": m.wall_s,
            })
    return {"rows": rows, "summary": summarize(rows, list(variants(args)))}


def summarize(rows: list[dict], names: list[str]) -> list[dict]:
    """Per variant (`names`, the baseline first), the mean drop over the seeds, and its ratio to one-shot
    prediction-only recovery's; on the carved rows too where the rows were scored there. Seeds run as
    separate processes are merged by calling it on all their rows."""
    summary = []
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        drops = [r["dev_drop_points"] for r in mine]
        summary.append({"variant": name, "seeds": len(drops), "mean_dev_drop_points": round(sum(drops) / len(drops), 2),
                        "sd_dev_drop_points": round(statistics.stdev(drops), 2) if len(drops) > 1 else None,
                        "dev_drop_points_per_seed": drops})
        if all("validation_drop_points" in r for r in mine):
            carved = [r["validation_drop_points"] for r in mine]
            summary[-1].update({"mean_validation_drop_points": round(sum(carved) / len(carved), 2),
                                "validation_drop_points_per_seed": carved})
    baseline = summary[0]
    for s in summary:
        for split in ("dev", "validation"):
            if f"mean_{split}_drop_points" in s:
                ratio = s[f"mean_{split}_drop_points"] / baseline[f"mean_{split}_drop_points"]
                s["drop_vs_one_shot_prediction" + ("" if split == "dev" else "_on_validation")] = (
                    round(ratio, 3) if baseline[f"mean_{split}_drop_points"] > 0 else None)
    return summary


def vocab_part(args, work: Path, base: dict) -> list[dict]:
    from pipeline.artifacts import read_manifest
    from pipeline.data import load_glue, load_train_examples
    from pipeline.evaluate import evaluate
    from pipeline.vocab import trim_vocab

    base_score, rows = base["dev"], []
    train = load_train_examples("sst2", args.glue_dir, args.train_file)  # the rows the student was trained on
    dev_rows = load_glue("sst2", "dev", args.glue_dir)
    for reserve, characters in VOCAB_SETTINGS:
        folder = work / f"vocab-reserve-{reserve}{'' if characters else '-no-characters'}"
        if read_manifest(folder) is None:
            trim_vocab(args.student, folder, train, reserve=reserve, characters=characters, dev=dev_rows, task="sst2")
        m = read_manifest(folder)
        dev = evaluate(str(folder), "sst2", args.glue_dir, progress=False).metrics["score"]
        v = m.params
        rows.append({
            "reserve": reserve, "characters": characters, "train_rows": v["train_rows"], "kept": v["kept"],
            "vocab_before": v["vocab_before"], "vocab_after": v["vocab_after"],
            "params_before": v["params_before"], "params_after": m.num_parameters,
            "weights_bytes_before": v["weights_bytes_before"], "weights_bytes_after": v["weights_bytes_after"],
            "size_ratio": round(v["weights_bytes_after"] / v["weights_bytes_before"], 3),
            "dev_pieces": m.metrics["dev_tokens"]["pieces"],
            "dev_changed_word_share": m.metrics["dev_tokens"]["changed_share"],
            "dev_lost_to_unk": m.metrics["dev_tokens"]["lost_to_unk"],
            "dev_unk_share_before": m.metrics["dev_tokens"]["unk_share_before"],
            "dev_unk_share_after": m.metrics["dev_tokens"]["unk_share_after"],
            "dev_lost_share": m.metrics["dev_tokens"]["lost_share"],
            "dev_untrimmed": round(base_score, 4), "dev": round(dev, 4),
            "dev_drop_points": round(100 * (base_score - dev), 2),
        })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="a PyTorch SST-2 classifier folder (e.g. make demo's student)")
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue_data"))
    p.add_argument("--parts", default="prune,vocab", help="comma-separated: prune, vocab")
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--ffn", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3, help="steps of the iterative variant")
    p.add_argument("--train-rows", type=lambda t: None if t == "all" else int(t), default=DEFAULT_TRAIN_ROWS,
                   help="recovery rows: the first N of the training rows, or `all` (another N: its own `prune-rowsN` "
                        "section)")
    p.add_argument("--train-file", default=None,
                   help="the recovery rows (SST-2 train.tsv layout; default: --glue-dir's), e.g. the training rows a "
                        "budget search kept apart from its carved ones")
    p.add_argument("--validation-dir", default=None,
                   help="GLUE-layout folder whose SST-2/dev.tsv holds rows carved from train: each variant is scored "
                        "there as well as on dev")
    p.add_argument("--importance-examples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[42, 43],
                   help="comma-separated: each variant is run once per seed (data order, importance rows, dropout)")
    p.add_argument("--variants", type=lambda t: t.split(","), default=["prediction", "transformer", "iterative"],
                   help="comma-separated: prediction (one-shot, the baseline: always run), transformer (one-shot), "
                        "iterative, joint (one-shot), transformer-hidden, joint-hidden (no attention term)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(RESULTS / "prune_recovery"),
                   help="artifact folders (git-ignored), one subfolder per student")
    p.add_argument("--out", default=str(RESULTS / "prune_recovery.json"))
    args = p.parse_args(argv)
    known = ("prediction", "transformer", "iterative", "joint", "transformer-hidden", "joint-hidden")
    unknown = set(args.variants) - set(known)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}: choose from {', '.join(known)}")
    if "prediction" not in args.variants:
        args.variants.insert(0, "prediction")  # the baseline every ratio is taken against

    import torch

    from pipeline.artifacts import read_manifest
    from pipeline.evaluate import evaluate

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    checksums = input_checksums(student=args.student, train=args.train_file or Path(args.glue_dir) / "SST-2" / "train.tsv",
                                dev=Path(args.glue_dir) / "SST-2" / "dev.tsv",
                                **({"validation": Path(args.validation_dir) / "SST-2" / "dev.tsv"}
                                   if args.validation_dir else {}))
    for name, value in checksums.items():
        if value is None and name != "student":
            p.error(f"no {name} rows where they were looked for (--glue-dir, --train-file, --validation-dir)")
    if checksums["student"] is None:
        p.error(f"--student {args.student}: no model weights there")
    if result.get("inputs_sha256") != checksums:
        result = {}  # rows made from another student (or data) are never kept beside this one's
    # one folder per student: a variant folder is reused only for the student it was pruned from
    work = Path(args.work) / checksums["student"][:12]
    parent = read_manifest(args.student)
    base = {"dev": evaluate(args.student, "sst2", args.glue_dir, progress=False).metrics["score"]}
    if args.validation_dir:
        base["validation"] = evaluate(args.student, "sst2", args.validation_dir, progress=False).metrics["score"]
    result.pop("seed", None)  # written by an earlier version
    result.update({
        "task": "sst2", "seeds": args.seeds,
        "student": {"path": args.student, "num_parameters": parent.num_parameters if parent else None,
                    **{k: round(v, 4) for k, v in base.items()}},
        "inputs_sha256": checksums,
        "selection": "no choice made on dev: settings fixed beforehand, the model after the last recovery step kept, "
                     "dev scored once per variant",
        "note": "2-core machine shared with other jobs; wall times are indicative only. One seed: on SST-2 dev "
                "(872 sentences) one sentence is 0.11 points.",
    })
    for part, build in (("prune", prune_part), ("vocab", vocab_part)):
        if part not in parts:
            continue  # an earlier run's rows stay, with their own command and commit
        start = time.perf_counter()
        built = build(args, work, base)
        if part == "prune":
            part += section_tag(args)
        result[part] = {"command": command_line(), "git_commit": git_commit(),
                        "wall_s": round(time.perf_counter() - start, 1),
                        **(built if isinstance(built, dict) else {"rows": built})}
        if part.startswith("prune"):
            result[part]["settings"] = {"heads": args.heads, "ffn": args.ffn, "train_rows": args.train_rows,
                                        "train_file": args.train_file, "validation_dir": args.validation_dir,
                                        "recover_epochs": 1, "batch_size": args.batch_size, "learning_rate": args.lr,
                                        "importance_examples": args.importance_examples, "threads": args.threads}
        write_results(out, result)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("prune", "vocab"))}, indent=1))


if __name__ == "__main__":
    main()
