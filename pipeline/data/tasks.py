"""GLUE task definitions: file columns, label order, metrics.

Label order follows the Hugging Face `nyu-mll/glue` dataset, so models fine-tuned with Hugging Face
tools and with bertforge mean the same thing by label 0. MNLI is the classic trap: the original
TinyBERT/BERT scripts use [contradiction, entailment, neutral]; the hub uses the order below.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Columns:
    """Column indices of one split's TSV file (classic glue_data layout)."""

    text_a: int
    text_b: int | None = None
    label: int | None = None  # None on test splits; -1 means "last column"
    header: bool = True


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str
    labels: tuple[str, ...]  # label names by id; ("score",) for the regression task
    metrics: tuple[str, ...]
    train: Columns
    dev: Columns
    test: Columns
    # How the label is written in the files, by id (None: the names themselves).
    file_labels: tuple[str, ...] | None = ("0", "1")
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "dev", "test": "test"})
    hub_config: str = ""
    hub_columns: tuple[str, str | None] = ("sentence", None)
    official_rows: dict[str, int] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.labels == ("score",)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.train.text_b is not None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def default_max_length(self) -> int:
        # TinyBERT's task-distillation table: 64 for single sentences, 128 for pairs.
        return 128 if self.is_pair else 64


_MNLI_SPLITS = {
    "train": "train",
    "dev_matched": "dev_matched",
    "dev_mismatched": "dev_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}

TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "CoLA", ("unacceptable", "acceptable"), ("matthews_correlation",),
        train=Columns(3, None, 1, header=False), dev=Columns(3, None, 1, header=False), test=Columns(1),
        hub_config="cola", official_rows={"train": 8551, "dev": 1043, "test": 1063},
    ),
    "sst2": TaskSpec(
        "sst2", "SST-2", ("negative", "positive"), ("accuracy",),
        train=Columns(0, None, 1), dev=Columns(0, None, 1), test=Columns(1),
        hub_config="sst2", official_rows={"train": 67349, "dev": 872, "test": 1821},
    ),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ("not_equivalent", "equivalent"), ("accuracy", "f1"),
        train=Columns(3, 4, 0), dev=Columns(3, 4, 0), test=Columns(3, 4),
        hub_config="mrpc", hub_columns=("sentence1", "sentence2"),
        official_rows={"train": 3668, "dev": 408, "test": 1725},
    ),
    "stsb": TaskSpec(
        "stsb", "STS-B", ("score",), ("pearson", "spearmanr"),
        train=Columns(7, 8, 9), dev=Columns(7, 8, 9), test=Columns(7, 8), file_labels=None,
        hub_config="stsb", hub_columns=("sentence1", "sentence2"),
        official_rows={"train": 5749, "dev": 1500, "test": 1379},
    ),
    "qqp": TaskSpec(
        "qqp", "QQP", ("not_duplicate", "duplicate"), ("accuracy", "f1"),
        train=Columns(3, 4, 5), dev=Columns(3, 4, 5), test=Columns(1, 2),
        hub_config="qqp", hub_columns=("question1", "question2"),
        official_rows={"train": 363846, "dev": 40430, "test": 390965},
    ),
    "mnli": TaskSpec(
        "mnli", "MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",),
        train=Columns(8, 9, -1), dev=Columns(8, 9, -1), test=Columns(8, 9), file_labels=None,
        splits=_MNLI_SPLITS, hub_config="mnli", hub_columns=("premise", "hypothesis"),
        official_rows={"train": 392702, "dev_matched": 9815, "dev_mismatched": 9832,
                       "test_matched": 9796, "test_mismatched": 9847},
    ),
    "qnli": TaskSpec(
        "qnli", "QNLI", ("entailment", "not_entailment"), ("accuracy",),
        train=Columns(1, 2, 3), dev=Columns(1, 2, 3), test=Columns(1, 2), file_labels=None,
        hub_config="qnli", hub_columns=("question", "sentence"),
        official_rows={"train": 104743, "dev": 5463, "test": 5463},
    ),
    "rte": TaskSpec(
        "rte", "RTE", ("entailment", "not_entailment"), ("accuracy",),
        train=Columns(1, 2, 3), dev=Columns(1, 2, 3), test=Columns(1, 2), file_labels=None,
        hub_config="rte", hub_columns=("sentence1", "sentence2"),
        official_rows={"train": 2490, "dev": 277, "test": 3000},
    ),
    "wnli": TaskSpec(
        "wnli", "WNLI", ("not_entailment", "entailment"), ("accuracy",),
        train=Columns(1, 2, 3), dev=Columns(1, 2, 3), test=Columns(1, 2),
        hub_config="wnli", hub_columns=("sentence1", "sentence2"),
        official_rows={"train": 635, "dev": 71, "test": 146},
    ),
}

GLUE_TASKS: tuple[str, ...] = tuple(TASKS)

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def get_task(name: str) -> TaskSpec:
    from pipeline.errors import BertforgeError

    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise BertforgeError(f"unknown task {name!r}; choose one of: {', '.join(GLUE_TASKS)}")
    return TASKS[key]


def dev_split(task: TaskSpec) -> str:
    """The split a task is scored on (MNLI: matched)."""
    return "dev_matched" if task.name == "mnli" else "dev"
