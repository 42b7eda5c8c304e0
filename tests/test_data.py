"""GLUE loaders on the shared data, file quirks, label order and metrics against hand-computed values."""
import math

import pytest

from conftest import needs_glue  # noqa: F401
from pipeline.data import GLUE_TASKS, compute_metrics, get_task, load_examples_file, load_glue, sample_data_dir, write_examples_file
from pipeline.data.glue import Example
from pipeline.errors import BertforgeError

COUNTS = [("cola", "train", 8551), ("cola", "dev", 1043), ("cola", "test", 1063),
          ("sst2", "train", 67349), ("sst2", "dev", 872), ("sst2", "test", 1821),
          ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("mrpc", "test", 1725),
          ("stsb", "train", 5749), ("stsb", "dev", 1500), ("stsb", "test", 1379),
          ("qnli", "dev", 5463), ("qnli", "test", 5463),
          ("rte", "train", 2490), ("rte", "dev", 277), ("rte", "test", 3000),
          ("wnli", "train", 635), ("wnli", "dev", 71), ("wnli", "test", 146)]


def test_task_names():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


@needs_glue
@pytest.mark.parametrize("task,split,count", COUNTS)
def test_row_counts_match_official(glue_dir, task, split, count):
    examples = load_glue(task, split, glue_dir)
    assert len(examples) == count == get_task(task).official_rows[split]
    if split == "test":
        assert all(ex.label is None for ex in examples)
    else:
        assert all(ex.label is not None for ex in examples)
    assert all((ex.text_b is None) != get_task(task).is_pair for ex in examples)


@needs_glue
def test_cola_has_no_header_and_keeps_first_row(glue_dir):
    first = load_glue("cola", "train", glue_dir)[0]
    assert first.text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    assert first.label == 1
    last_dev = load_glue("cola", "dev", glue_dir)[-1]  # dev has no trailing newline
    assert last_dev.text_a and last_dev.label in (0, 1)


@needs_glue
def test_mrpc_byte_order_mark_and_pairs(glue_dir):
    first = load_glue("mrpc", "train", glue_dir)[0]
    assert first.text_a.startswith("Amrozi accused his brother")
    assert first.text_b.startswith("Referring to him as only")
    assert first.label == 1


@needs_glue
def test_label_types_and_names(glue_dir):
    stsb = load_glue("stsb", "dev", glue_dir)
    assert all(isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0 for ex in stsb)
    rte = load_glue("rte", "train", glue_dir)
    assert rte[0].label == get_task("rte").label2id["not_entailment"]
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")  # the hub's order


def test_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nno label column\n")
    with pytest.raises(BertforgeError, match=r"dev.tsv:3: expected at least 2"):
        load_glue("sst2", "dev", tmp_path)
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film\tpositive\n")
    with pytest.raises(BertforgeError, match=r"dev.tsv:2: unknown label 'positive'"):
        load_glue("sst2", "dev", tmp_path)


def test_bad_task_split_and_folder(tmp_path):
    with pytest.raises(BertforgeError, match="unknown task"):
        load_glue("imdb", "train", tmp_path)
    with pytest.raises(BertforgeError, match="has no split"):
        load_glue("sst2", "validation", tmp_path)
    with pytest.raises(BertforgeError, match="does not exist"):
        load_glue("sst2", "train", tmp_path / "nowhere")


def test_packaged_sample():
    train = load_glue("sst2", "train", sample_data_dir())
    dev = load_glue("sst2", "dev", sample_data_dir())
    assert len(train) == 4000 and len(dev) == 872


@pytest.mark.parametrize("task", ["sst2", "mrpc", "stsb", "mnli", "rte", "cola"])
def test_examples_file_round_trip(tmp_path, task):
    spec = get_task(task)
    label = 2.5 if spec.is_regression else spec.num_labels - 1
    examples = [Example("a \"quoted\" text", "second one" if spec.is_pair else None, label)] * 3
    write_examples_file(task, examples, tmp_path / "aug.tsv")
    assert load_examples_file(task, tmp_path / "aug.tsv") == examples


def test_metrics_against_hand_computed_values():
    preds, gold = [1, 1, 0, 0], [1, 0, 0, 0]
    # tp=1 fp=1 fn=0 tn=2: MCC = (1*2 - 1*0) / sqrt(2*1*3*2)
    assert compute_metrics("cola", preds, gold)["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    mrpc = compute_metrics("mrpc", preds, gold)
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["score"] == pytest.approx((0.75 + 2 / 3) / 2)
    stsb = compute_metrics("stsb", [1.0, 2.0, 4.0], [1.0, 2.0, 3.0])
    assert stsb["pearson"] == pytest.approx(3 / (math.sqrt(2) * math.sqrt(42 / 9)))
    assert stsb["spearmanr"] == pytest.approx(1.0)
    assert compute_metrics("sst2", [0, 1], [1, 1]) == {"accuracy": 0.5, "score": 0.5}
