"""Fault injection: `bertforge run` on a tiny config, killed with SIGKILL at seeded random moments and
resumed each time; the final artifacts must carry the same checksums as an uninterrupted run's.

    python -m benchmarks.reliability_kills --kills 20 --seed 0

A tiny random BERT (6 layers, hidden 32, the real uncased vocabulary) is the teacher; every stage runs
(fine-tuning, task distillation, pruning, ONNX export, int8 quantization) except bench and report. Two
uninterrupted runs come first: files that differ between them are not deterministic, and the script
says so instead of blaming the kills. Then rounds: a fresh run folder, `bertforge run` started again
and again and killed after a random delay (uniform between 0 and a fifth of the uninterrupted run's wall time,
counted from the moment the attempt starts its first stage, so no kill is wasted on the imports)
until an attempt finishes; its artifacts' checksums are compared with the reference. A kill "survived"
when its round ended with identical checksums and no attempt failed with an error.

Writes the `kills` key of benchmarks/results/reliability.json (the other keys are left as they are).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
STAGES = ("teacher", "student", "pruned", "onnx", "int8")


def make_teacher(out: Path) -> Path:
    """A random 6-layer BERT classifier for SST-2 with the real uncased tokenizer (as tests/conftest.py)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.models import label_config, packaged_minilm_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, **label_config(get_task("sst2")))
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_args(teacher: Path, out: Path, rows: int) -> list[str]:
    return ["run", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"out={out}",
            f"teacher.model={teacher}", "teacher.loop.epochs=1", f"teacher.max_train_examples={rows}",
            f"distill.max_train_examples={rows}", "distill.intermediate_epochs=1", "distill.prediction_epochs=1",
            f"prune.max_train_examples={rows}", "bench.enabled=false", "threads=1"]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def env() -> dict[str, str]:
    # One thread everywhere: bit-exact arithmetic from run to run (and fair on a shared machine).
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def checksums(run: Path) -> dict[str, dict[str, str]]:
    """{stage: {file: sha256}} from each stage's manifest (wall time, dates and dev history, which
    legitimately vary, are not part of it), checked against the files on disk."""
    from pipeline.artifacts import read_manifest, verify_files

    out = {}
    for stage in STAGES:
        manifest = read_manifest(run / stage)
        if manifest is None:
            out[stage] = {"<no manifest>": ""}
            continue
        damaged = verify_files(run / stage)
        out[stage] = {f["path"]: f["sha256"] for f in manifest.files}
        for path in damaged:
            out[stage][path] = "<differs from its manifest>"
    return out


def differences(a: dict, b: dict) -> list[str]:
    diff = []
    for stage in STAGES:
        for path in sorted(set(a.get(stage, {})) | set(b.get(stage, {}))):
            if a.get(stage, {}).get(path) != b.get(stage, {}).get(path):
                diff.append(f"{stage}/{path}")
    return diff


def uninterrupted(teacher: Path, out: Path, rows: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command(run_args(teacher, out, rows)), env=env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"uninterrupted run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def killed_round(teacher: Path, out: Path, rows: int, rng: random.Random, max_delay: float, kills_left: int,
                 log) -> dict:
    """Start, kill, restart ... until an attempt finishes (or the kill budget is spent, then one last
    attempt runs to the end)."""
    attempts, kills, errors = [], 0, []
    while True:
        delay = rng.uniform(0, max_delay) if kills < kills_left else None
        start = time.perf_counter()
        log_file = out.with_name(out.name + f".attempt{len(attempts)}.log")  # a file: a full pipe would stall it
        with open(log_file, "w") as err:
            proc = subprocess.Popen(command(run_args(teacher, out, rows)), env=env(), stdout=subprocess.DEVNULL,
                                    stderr=err)
            try:
                if delay is not None:  # the clock starts once the imports are done and a stage has begun
                    _wait_for_first_stage(proc, log_file)
                proc.wait(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                finished = False
        stderr = log_file.read_text(errors="replace")
        stage = _last_stage(stderr)
        if finished:
            attempts.append({"delay_s": None if delay is None else round(delay, 2), "killed": False,
                             "returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)})
            if proc.returncode:
                errors.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}")
                log(f"  attempt ended with exit {proc.returncode}: {errors[-1]}")
                if len(errors) > 3:
                    break
                continue
            log(f"  finished (after {kills} kill(s) in this round)")
            break
        kills += 1
        attempts.append({"delay_s": round(delay, 2), "killed": True, "stage": stage})
        log(f"  kill {kills} after {delay:.1f} s, in stage {stage}")
    return {"kills": kills, "attempts": attempts, "errors": errors}


def _wait_for_first_stage(proc, log_file: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and "[run] " not in log_file.read_text(errors="replace"):
        time.sleep(0.05)


def _last_stage(stderr: str) -> str | None:
    lines = [line for line in stderr.splitlines() if line.startswith("[run] ")]
    return lines[-1][len("[run] "):].split(":")[0] if lines else "startup"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=96, help="training rows of each stage")
    p.add_argument("--delay-fraction", type=float, default=0.2,
                   help="kill delays are uniform(0, this x the uninterrupted wall time): small enough that a "
                        "round takes several kills before it finishes")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/reliability.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        teacher = make_teacher(tmp / "teacher-init")
        log("uninterrupted run 1")
        wall = uninterrupted(teacher, tmp / "ref", args.rows)
        log(f"  {wall:.0f} s; uninterrupted run 2")
        uninterrupted(teacher, tmp / "ref2", args.rows)
        ref = checksums(tmp / "ref")
        unstable = differences(ref, checksums(tmp / "ref2"))
        log(f"  files that differ between two uninterrupted runs: {unstable or 'none'}")

        rng = random.Random(args.seed)
        rounds, injected = [], 0
        while injected < args.kills:
            out = tmp / f"round{len(rounds)}"
            log(f"round {len(rounds)}")
            r = killed_round(teacher, out, args.rows, rng, wall * args.delay_fraction, args.kills - injected, log)
            injected += r["kills"]
            diff = differences(ref, checksums(out))
            r.update(differs=diff, differs_beyond_unstable=sorted(set(diff) - set(unstable)))
            r["survived"] = not r["errors"] and not r["differs_beyond_unstable"]
            log(f"  {'identical' if not diff else 'differs: ' + ', '.join(diff)}")
            rounds.append(r)
            shutil.rmtree(out, ignore_errors=True)
            if r["kills"] == 0 and not r["errors"]:
                continue  # finished before its first kill: try again (the delays are random)

    survived = sum(r["kills"] for r in rounds if r["survived"])
    result = {
        "injected": injected,
        "survived": survived,
        "rounds": len(rounds),
        "errors": [e for r in rounds for e in r["errors"]],
        "kills_by_stage": _by_stage(rounds),
        "unstable_between_uninterrupted_runs": unstable,
        "compared": "sha256 of every file listed in each stage's bertforge.json (teacher, student, pruned, onnx, "
                    "int8), verified against the files on disk; wall time, dates and dev history are manifest "
                    "fields outside that list",
        "uninterrupted_wall_s": round(wall, 1),
        "kill_delay": f"uniform(0, {args.delay_fraction} x uninterrupted wall time), counted from the first "
                      "'[run] STAGE' line of each attempt (after the imports), seeded",
        "seed": args.seed,
        "rows": args.rows,
        "command": "python -m benchmarks.reliability_kills " + shlex.join(_public_args(argv if argv is not None else sys.argv[1:])),
        "run_command": "bertforge " + shlex.join(run_args(Path("TEACHER"), Path("OUT"), args.rows)).replace(str(ROOT) + "/", ""),
        "git_commit": _git_commit(),
        "note": "2-core machine shared with other jobs: wall times are indicative only",
        "rounds_detail": [{k: r[k] for k in ("kills", "survived", "differs", "attempts")} for r in rounds],
    }
    print(json.dumps({k: result[k] for k in ("injected", "survived", "rounds", "errors", "kills_by_stage",
                                             "unstable_between_uninterrupted_runs")}, indent=1))
    if not args.no_write:
        write_kills(result)
    return 0 if survived == injected else 1


def _public_args(argv: list[str]) -> list[str]:
    """The command line without --workdir (a machine path, kept out of results)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            out.append(a)
    return out


def _by_stage(rounds) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rounds:
        for a in r["attempts"]:
            if a.get("killed"):
                counts[a["stage"]] = counts.get(a["stage"], 0) + 1
    return counts


def write_kills(result: dict) -> None:
    """Read-modify-write of the `kills` key only (other benchmarks own `fuzz` and `soak`)."""
    from pipeline.atomic import atomic_write_json

    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data["kills"] = result
    atomic_write_json(RESULTS, data)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
