"""The accuracy-budget search on tiny models: it keeps the fastest candidate inside the budget, resumes after
an interruption without redoing finished candidates, and never scores a choice on the dev split it reports."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from pipeline import budget as budget_mod
from pipeline.cli import main
from pipeline.budget import STEPS, BudgetConfig, Search, SearchInputs, run_search
from pipeline.data import load_glue
from pipeline.data.glue import Example
from pipeline.data.split import carve_validation
from pipeline.distill.config import DistillConfig
from pipeline.errors import BertforgeError
from pipeline.evaluate import evaluate
from pipeline.export import ExportConfig
from pipeline.prune import PruneConfig
from pipeline.quantize import QuantizeConfig
from pipeline.run import load_run_config, run_pipeline

TINY = ["teacher.finetune=false", "distill.intermediate_epochs=1", "distill.prediction_epochs=1",
        "distill.max_train_examples=96", "prune.max_train_examples=96", "prune.importance_examples=32",
        "export.validation_examples=16", "budget.validation_examples=48", "budget.max_train_examples=96",
        "budget.latency_seconds=0.2", "budget.vocab=[full]"]


def _inputs(out, teacher, glue_dir, **kw) -> SearchInputs:
    w = "(set by the run)"
    return SearchInputs(out=out, task="sst2", teacher=teacher, glue_dir=str(glue_dir), seed=42,
                        distill=DistillConfig(stage="task", teacher=w, out=w, intermediate_epochs=1, prediction_epochs=1,
                                              max_train_examples=96),
                        prune=PruneConfig(model=w, task="sst2", out=w, max_train_examples=96, importance_examples=32,
                                          recover_epochs=1),
                        export=ExportConfig(model=w, out=w, validation_examples=16),
                        quantize=QuantizeConfig(model=w, out=w), **kw)


def _small(**kw) -> BudgetConfig:
    return BudgetConfig(**{"max_drop": 100.0, "depths": [1], "heads": [0.0], "ffn": [0.0], "vocab": ["full"], "graphs": ["fused"],
                           "quantize": ["fp32", "dynamic"], "validation_examples": 48, "max_train_examples": 96,
                           "latency_seconds": 0.2, **kw})


@pytest.fixture(scope="module")
def searched(tmp_path_factory, sst2_dir):
    """One run with the search: two depths, two pruning levels, both graphs, three quantizations."""
    root = tmp_path_factory.mktemp("budget")
    teacher = make_tiny_bert(root / "teacher", layers=4)
    cfg = load_run_config("configs/quickstart.yaml", [
        f"out={root / 'run'}", f"teacher.model={teacher}", f"glue_dir={sst2_dir}", *TINY, "budget.max_drop=100",
        "budget.depths=[1,2]", "budget.heads=[0,0.5]", "budget.ffn=[0.5]", "budget.graphs=[fused,plain]",
        "budget.quantize=[fp32,dynamic,static]", "bench.baseline=false", "bench.min_iters=2", "bench.min_seconds=0.05",
        "bench.cold_start=inprocess"])
    made = run_pipeline(cfg, progress=False)
    return root, cfg, made


def fastest_first(row):
    """The latency objective's order: the lowest latency, then the smaller file (pipeline.budget's choose)."""
    return row["latency_ms"], row["size_bytes"]


def _result(root):
    return json.loads((root / "run" / "budget" / "budget.json").read_text())


@pytest.mark.slow
def test_the_fastest_candidate_inside_the_budget_is_kept(searched):
    root, cfg, made = searched
    result = _result(root)
    rows = result["candidates"]
    # 2 depths x 2 pruning levels x (fused: fp32, dynamic; plain: fp32, dynamic, static); static never on fused
    assert len(rows) == 20 and not any(r["settings"]["graph"] == "fused" and r["settings"]["quantize"] == "static"
                                       for r in rows)
    assert {r["settings"]["depth"] for r in rows} == {1, 2}
    # budget 100: every row fits. Tiny models can time alike to 0.1 us; equal latencies go to the smaller file
    assert result["chosen"] == min(rows, key=fastest_first)["name"]
    # answers changed against the teacher's: an accuracy can move by no more than that share of the rows
    search = json.loads((root / "run" / "budget" / "search.json").read_text())
    answers = search["validation_predictions"]
    teacher = answers[search["teacher"]["id"]]
    for r in rows:
        mine = answers[budget_mod._input_id(Path(r["folder"]))]
        assert r["validation_answers_changed"] == round(sum(a != b for a, b in zip(mine, teacher)) / len(teacher), 4)
        assert abs(r["validation_drop_points"]) <= 100 * r["validation_answers_changed"] + 1e-6
    # the published artifact is that candidate, with both scores and the split it was chosen on
    chosen = json.loads((made["chosen"] / "bertforge.json").read_text())
    assert chosen["stage"] == "budget" and chosen["params"]["selection_split"]["validation_examples"] == 48
    assert set(chosen["metrics"]) == {"dev", "validation"}
    # a distilled student kept its best checkpoint on the carved rows: its manifest names that score "selection"
    student = json.loads((root / "run" / "budget" / "candidates" / "L1" / "bertforge.json").read_text())
    assert set(student["metrics"]) == {"selection"} and "best_selection_score" in student["params"]
    assert result["dev"]["dev_drop_points"] == pytest.approx(
        100 * (result["dev"]["teacher"]["score"] - result["dev"]["chosen"]["score"]), abs=1e-3)
    low, high = result["dev"]["dev_drop_interval_90"]  # the paired bootstrap of that one dev drop
    assert low <= high


@pytest.mark.slow
def test_a_tighter_budget_rechooses_without_rebuilding(searched):
    root, cfg, _ = searched
    state = json.loads((root / "run" / "budget" / "search.json").read_text())
    before = {k: n.get("built_at") for k, n in state["nodes"].items()}
    rows = _result(root)["candidates"]
    # a budget between the scores found, and a size ceiling: the answer must be the fastest row meeting both
    drops = sorted({r["validation_drop_points"] for r in rows})
    max_drop = drops[len(drops) // 2]
    ceiling = sorted(r["size_bytes"] for r in rows)[len(rows) // 2] / 1e6
    inside = [r for r in rows if r["validation_drop_points"] <= max_drop and r["size_bytes"] / 1e6 <= ceiling]
    for objective, key in (("latency", fastest_first), ("size", lambda r: (r["size_bytes"], r["latency_ms"]))):
        again = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_drop=max_drop, max_size_mb=ceiling,
                                                                    objective=objective))
        run_pipeline(again, progress=False)
        assert inside and _result(root)["chosen"] == min(inside, key=key)["name"]
    after = json.loads((root / "run" / "budget" / "search.json").read_text())
    assert {k: n.get("built_at") for k, n in after["nodes"].items()} == before  # nothing built again


@pytest.mark.slow
def test_a_confidence_bound_holds_the_budget_against_the_drops_upper_bound(searched):
    root, cfg, _ = searched
    state = json.loads((root / "run" / "budget" / "search.json").read_text())
    before = {k: n.get("built_at") for k, n in state["nodes"].items()}

    def rechoose(max_drop):
        run_pipeline(dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_drop=max_drop,
                                                                         confidence=0.9)), progress=False)
        return _result(root)

    rows = rechoose(100.0)["candidates"]
    assert all(r["validation_drop_bound_points"] is not None for r in rows)
    max_drop = sorted(r["validation_drop_bound_points"] for r in rows)[len(rows) // 2]
    result = rechoose(max_drop)
    inside = [r for r in result["candidates"] if r["validation_drop_bound_points"] <= max_drop]
    assert result["chosen"] == min(inside, key=fastest_first)["name"]
    assert all(r["feasible"] == (r in inside) for r in result["candidates"])
    after = json.loads((root / "run" / "budget" / "search.json").read_text())
    assert {k: n.get("built_at") for k, n in after["nodes"].items()} == before  # only the choice changed


@pytest.mark.slow
def test_report_draws_the_pareto_front(searched):
    root, _, made = searched
    html = (made["report"] / "report.html").read_text()
    md = (made["report"] / "report.md").read_text()
    result = _result(root)
    assert 'id="budget"' in html and "<svg" in html.split('id="budget"')[1]
    front = [r["name"] for r in result["candidates"] if r["on_front"]]
    assert front and all(name in md for name in front)
    assert "Pareto" in md and result["chosen"] in md
    assert "90% interval [{:.2f}, {:.2f}]".format(*result["dev"]["dev_drop_interval_90"]) in md


@pytest.mark.slow
def test_the_dev_interval_benchmark_rescores_the_rows_choice_and_refuses_another_model(searched, sst2_dir, tmp_path):
    from benchmarks import budget_dev_intervals

    root, _, _ = searched
    result = _result(root)
    row = {"task": "sst2", "budget": 100.0, "objective": "latency", "chosen": result["chosen"],
           "command": f"bertforge run --set out={root / 'run'}", "dev_drop_points": result["dev"]["dev_drop_points"]}
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"rows": [row]}))
    out = tmp_path / "intervals.json"
    budget_dev_intervals.main(["--glue-dir", str(sst2_dir), "--budget", str(budget), "--out", str(out)])
    got = json.loads(out.read_text())["rows"][0]
    # the same interval the run recorded: same answers, same resamples (the run's seed, 42)
    assert got["dev_drop_interval_90"] == result["dev"]["dev_drop_interval_90"]
    budget.write_text(json.dumps({"rows": [{**row, "dev_drop_points": row["dev_drop_points"] + 5}]}))
    with pytest.raises(SystemExit, match="in its row"):  # a row made from another model is never mixed in
        budget_dev_intervals.main(["--glue-dir", str(sst2_dir), "--budget", str(budget), "--out", str(out)])


@pytest.mark.slow
def test_resume_after_an_interruption_redoes_nothing_finished(tmp_path, sst2_dir, monkeypatch):
    teacher = make_tiny_bert(tmp_path / "teacher", layers=2)
    cfg = _small(quantize=["fp32", "dynamic", "dynamic-per-channel"])
    inputs = _inputs(tmp_path / "budget", teacher, sst2_dir)
    real = budget_mod._build_quant

    def killed_at_per_channel(s, parent, option, out):
        if option == "dynamic-per-channel":
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: this node half done, the others finished
        return real(s, parent, option, out)

    step = next(s for s in budget_mod.STEPS if s.name == "quantize")
    monkeypatch.setattr(step, "build", killed_at_per_channel)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, inputs, progress=False)
    monkeypatch.setattr(step, "build", real)
    state = json.loads((tmp_path / "budget" / "search.json").read_text())
    done = {k: n["built_at"] for k, n in state["nodes"].items() if n["status"] == "done"}
    assert {n["name"] for n in state["nodes"].values() if n["status"] == "done"} >= {"L1", "L1__h0-f0__v-full__fused__dynamic"}
    result = run_search(cfg, inputs, progress=False)
    state = json.loads((tmp_path / "budget" / "search.json").read_text())
    assert {k: state["nodes"][k]["built_at"] for k in done} == done  # the student and the finished variants kept
    assert len(result["candidates"]) == 3 and all(n["status"] == "done" for n in state["nodes"].values())


@pytest.mark.slow
def test_selection_never_reads_the_dev_split(tmp_path, sst2_dir):
    """The dev file is made unreadable: the whole search must still run (selection never opens it); only the
    final scoring, after the choice, needs it."""
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    shutil.copy(sst2_dir / "SST-2" / "train.tsv", glue / "train.tsv")
    (glue / "dev.tsv").write_text("sentence\tlabel\nthe dev split must not be read\tNOT-A-LABEL\n")
    teacher = make_tiny_bert(tmp_path / "teacher", layers=2)
    # trimming and the accuracy-aware fallback's tuning read training rows only, too
    cfg = _small(vocab=["full", "trimmed"], quantize=["dynamic", "fallback"], fallback_tolerance=1.0)
    search = Search(cfg, _inputs(tmp_path / "budget", teacher, tmp_path / "glue"), progress=False)
    result = search.run()
    assert result["chosen"] is not None and len(result["candidates"]) == 4
    fallback = json.loads((tmp_path / "budget" / "candidates" / "L1__h0-f0__v-full__fused__fallback" /
                           "bertforge.json").read_text())
    assert "not dev" in fallback["params"]["accuracy_aware"]["tuned_on"]
    trimmed = next(r for r in result["candidates"] if r["settings"]["vocab"] == "trimmed")
    full = next(r for r in result["candidates"] if r["settings"]["vocab"] == "full")
    assert trimmed["size_bytes"] < full["size_bytes"] / 2  # the embeddings are most of a tiny model
    train = load_glue("sst2", "train", tmp_path / "glue")
    assert search.validation == carve_validation(train, 48, 42, disjoint=True)[1]  # the rows scored: carved by the seed
    seen = {ex.text_a for split in ("train", "dev") for ex in load_glue("sst2", split, search.data_dir)}
    assert not seen & {ex.text_a for ex in search.validation}  # no training stage read the rows scored
    with pytest.raises(BertforgeError, match="NOT-A-LABEL"):  # the reported score reads dev, once, afterwards
        run_search(cfg, _inputs(tmp_path / "budget", teacher, tmp_path / "glue"), progress=False)


def test_the_validation_split_is_fixed_by_the_seed_and_can_skip_short_phrases(sst2_dir):
    train = load_glue("sst2", "train", sst2_dir)
    rest, val = carve_validation(train, 200, seed=7, min_words=10)
    assert (rest, val) == carve_validation(train, 200, seed=7, min_words=10)  # the seed fixes it
    assert val != carve_validation(train, 200, seed=8, min_words=10)[1]
    assert len(rest) + len(val) == len(train)
    assert all(len(ex.text_a.split()) >= 10 for ex in val)
    with pytest.raises(BertforgeError, match="of at least 500 words"):
        carve_validation(train, 10, seed=7, min_words=500)


def test_a_disjoint_split_carves_whole_sentences_and_leaves_none_of_their_phrases_in_training():
    """SST-2's train holds each sentence with its phrases: carved rows must not be pieces of training rows,
    and training rows that are only pieces of carved sentences must go; a phrase of a kept sentence stays."""
    def ex(text, label=1):
        return Example(text, None, label)

    sentences = [f"sentence {i} is a rather long line of words about film number {i}" for i in range(30)]
    train = [ex(s) for s in sentences]
    train += [ex(f"film number {i}") for i in range(30)]           # a phrase of sentence i only
    train += [ex("about film")] * 3                                # in every sentence: stays unless all are carved
    plain_rest, plain_val = carve_validation(train, 10, seed=1, min_words=10)
    rest, val = carve_validation(train, 10, seed=1, min_words=10, disjoint=True)
    assert (rest, val) == carve_validation(train, 10, seed=1, min_words=10, disjoint=True)  # the seed fixes it
    assert len(val) == 10 and all(v.text_a in sentences for v in val)  # whole sentences only
    everything = " | ".join(r.text_a for r in rest)
    assert not any(v.text_a in everything for v in val)  # no carved row sits inside a training row
    carved_numbers = {v.text_a.split()[1] for v in val}
    assert not any(r.text_a == f"film number {n}" for r in rest for n in carved_numbers)  # their phrases dropped
    assert sum(r.text_a.startswith("film number") for r in rest) == 20  # the kept sentences' phrases stay
    assert sum(r.text_a == "about film" for r in rest) == 3  # a phrase of kept sentences too
    assert len(rest) + len(val) == len(train) - 10
    assert len(plain_rest) + len(plain_val) == len(train)  # without it nothing is dropped
    with pytest.raises(BertforgeError, match="not part of another row"):
        carve_validation(train, 31, seed=1, min_words=2, disjoint=True)


def test_the_rows_that_score_candidates_are_not_the_rows_checkpoints_are_chosen_by(tmp_path, sst2_dir):
    """A model kept as the best of many checkpoints on some rows is flattered there: the selection folder keeps
    the rows the search scores on (validation/) apart from the rows its training stages choose by (dev)."""
    from pipeline.data.split import write_selection_dir

    info = write_selection_dir("sst2", sst2_dir, tmp_path / "apart", 60, 3, disjoint=True, checkpoint_size=40)
    train, checkpoint = (load_glue("sst2", split, tmp_path / "apart") for split in ("train", "dev"))
    scored = load_glue("sst2", "dev", tmp_path / "apart" / "validation")
    assert (len(scored), len(checkpoint)) == (60, 40) == (info["validation_examples"], info["checkpoint_examples"])
    texts = [{ex.text_a for ex in rows} for rows in (train, checkpoint, scored)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])  # three disjoint sets of rows
    info = write_selection_dir("sst2", sst2_dir, tmp_path / "shared", 60, 3, disjoint=True, checkpoint_size=0)
    assert load_glue("sst2", "dev", tmp_path / "shared") == scored  # 0: the old way, one carve for both
    assert info["checkpoint_rows"] == "the validation rows"
    with pytest.raises(BertforgeError, match="checkpoint_examples"):
        BudgetConfig(max_drop=1, checkpoint_examples=-1).check()


def test_bad_budget_is_one_clear_error(tmp_path, capsys):
    assert main(["run", "--max-drop", "-1", "--dry-run"]) == 2  # the CLI flag lands in the budget section
    assert "max_drop must be >= 0" in capsys.readouterr().err
    with pytest.raises(BertforgeError, match="budget.quantize"):
        load_run_config(None, ["budget.max_drop=1", "budget.quantize=[int4]"])
    with pytest.raises(BertforgeError, match="max_drop"):
        BudgetConfig(max_drop=-1).check()
    with pytest.raises(BertforgeError, match="budget search distils its own students"):
        run_pipeline(load_run_config(None, [f"out={tmp_path}", "budget.max_drop=1", "augment.enabled=true",
                                            "teacher.finetune=false", "teacher.model=all-MiniLM-L6-v2"]), progress=False)


def test_a_teacher_finetuned_by_the_run_never_sees_the_carved_rows(tmp_path, sst2_dir):
    """The search measures drops against the teacher on the carved rows: the run's own teacher learns from the
    rows outside them (a teacher trained on them would flatter itself there)."""
    from pipeline.run import Run

    teacher = make_tiny_bert(tmp_path / "base", layers=1)
    cfg = load_run_config("configs/quickstart.yaml", [
        f"out={tmp_path / 'run'}", f"teacher.model={teacher}", f"glue_dir={sst2_dir}", "teacher.finetune=true",
        "teacher.loop.epochs=1", "teacher.max_train_examples=64", "budget.max_drop=1",
        "budget.validation_examples=48"])
    folder = Run(cfg, progress=False).teacher()
    manifest = json.loads((folder / "bertforge.json").read_text())
    params = manifest["params"]
    assert set(manifest["metrics"]) >= {"selection", "dev"}  # chosen on the carved rows, then scored once on dev
    assert manifest["metrics"]["dev"] == evaluate(folder, "sst2", sst2_dir, progress=False).metrics
    assert "best_selection_score" in params and "best_dev_score" not in params  # nothing calls the carved rows dev
    assert params["glue_dir"] == str(tmp_path / "run" / "budget" / "selection-data")
    rest, carved = carve_validation(load_glue("sst2", "train", sst2_dir), 48, 42, disjoint=True)
    rest, checkpoint = carve_validation(rest, 48, 42, disjoint=True)  # its checkpoints: chosen on other carved rows
    seen = load_glue("sst2", "train", params["glue_dir"])
    assert seen == rest and not set(seen) & set(carved)
    assert load_glue("sst2", "dev", params["glue_dir"]) == checkpoint and not set(checkpoint) & set(carved)
    split = budget_mod.selection_data(cfg.budget, "sst2", str(sst2_dir), 42, tmp_path / "run" / "budget")
    assert split["validation_sha256"] and split["wanted"]["validation_examples"] == 48  # the search finds it made
    for rows, plan in ((48, "up to date"), (40, "rebuild")):  # other carved rows, same folder: the teacher retrains
        again = Run(dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, validation_examples=rows)),
                    progress=False, dry_run=True)
        again.teacher()
        assert again.plan["teacher"] == plan


def test_the_drop_bound_is_a_paired_bootstrap_of_the_tasks_own_metric():
    import numpy as np

    from pipeline.budget import drop_interval, drop_upper_bound, resampled_scores
    from pipeline.data import compute_metrics

    rng = np.random.default_rng(0)
    for task in ("sst2", "mrpc", "cola"):  # accuracy; accuracy and F1; Matthews, each from counts
        preds, gold = rng.integers(0, 2, (20, 30)), rng.integers(0, 2, (20, 30))
        preds[0] = 1  # a constant prediction: Matthews undefined, 0 as sklearn gives
        assert np.allclose(resampled_scores(task, preds, gold), [compute_metrics(task, p, g)["score"]
                                                                 for p, g in zip(preds, gold)])
    gold = rng.integers(0, 2, 1000)
    teacher = np.where(np.arange(1000) < 80, 1 - gold, gold)  # 92% right
    worse = np.where((np.arange(1000) >= 100) & (np.arange(1000) < 110), 1 - teacher, teacher)  # 10 rows more wrong
    bounds = [drop_upper_bound("sst2", teacher, worse, gold, c) for c in (0.5, 0.9, 0.99)]
    assert bounds[0] == pytest.approx(1.0, abs=0.2)  # the median resample: the measured 1.0 point
    assert bounds[0] < bounds[1] < bounds[2]  # more confidence, a wider margin
    assert bounds[1] == drop_upper_bound("sst2", teacher, worse, gold, 0.9)  # the seed fixes the resamples
    assert drop_upper_bound("sst2", teacher, teacher, gold, 0.9) == 0.0
    low, high = drop_interval("sst2", teacher, worse, gold, 0.9)  # the same resamples, both tails
    assert low < 1.0 < high and high == drop_upper_bound("sst2", teacher, worse, gold, 0.95)
    assert drop_interval("sst2", teacher, worse, gold, 0.98)[1] > high  # a wider level, a wider interval
    scores = rng.random(200) * 5  # STS-B: a collapsed model (one constant score) has no correlation, scored 0
    assert drop_upper_bound("stsb", scores + rng.normal(0, 0.3, 200), np.full(200, 2.5), scores, 0.9,
                            resamples=100) > 80
    with pytest.raises(BertforgeError, match="confidence"):
        BudgetConfig(max_drop=1, confidence=1.5).check()


def test_a_setting_added_later_keeps_cached_nodes_until_it_is_moved(tmp_path):
    """Prune's `attention_weight` came after searches were cached: at its default it is left out of the
    fingerprint, so those searches keep their nodes; set away from it, the pruned nodes are rebuilt."""
    step = next(s for s in STEPS if s.name == "prune")
    default = Search(_small(), _inputs(tmp_path / "a", tmp_path / "teacher", tmp_path), progress=False)
    assert "attention_weight" not in default.stage_settings(step)
    moved = _inputs(tmp_path / "b", tmp_path / "teacher", tmp_path)
    moved.prune.attention_weight = 0.0
    assert Search(_small(), moved, progress=False).stage_settings(step)["attention_weight"] == 0.0
