"""Read GLUE from the classic `glue_data/` folder layout, or from the Hugging Face hub.

Files are parsed with a tab delimiter and no quoting (the originals contain bare quotes). A row that
does not fit the task's layout is an error naming the file and line, never a silent skip.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.data.tasks import Columns, TaskSpec, get_task
from pipeline.errors import BertforgeError


GLUE_DIR_HELP = ("folder holding CoLA/, SST-2/, ... (classic glue_data layout); default: $GLUE_DIR, else the "
                 "Hugging Face hub")


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float | None


def sample_data_dir() -> Path:
    """The SST-2 sample shipped with the package (a train subset and the full dev set)."""
    return Path(str(resources.files("pipeline.data") / "sample"))


def default_data_dir() -> Path | None:
    """`$GLUE_DIR` if set, else None (the caller takes the bundled sample or the hub). Never a folder guessed
    from where the package is installed."""
    env = os.environ.get("GLUE_DIR")
    return Path(env) if env else None


def _split_key(task: TaskSpec, split: str) -> Columns:
    if split not in task.splits:
        raise BertforgeError(
            f"task {task.name} has no split {split!r}; choose one of: {', '.join(task.splits)}"
        )
    base = split.split("_")[0]
    return {"train": task.train, "dev": task.dev, "test": task.test}[base]


def _parse_label(task: TaskSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise BertforgeError(f"{where}: label {raw!r} is not a number") from None
    names = task.file_labels or task.labels
    if raw not in names:
        raise BertforgeError(f"{where}: unknown label {raw!r} (expected one of {', '.join(names)})")
    return names.index(raw)


def read_tsv(task: TaskSpec, path: Path, columns: Columns) -> list[Example]:
    """Parse one split file of `task` laid out as `columns`."""
    needed = max(c for c in (columns.text_a, columns.text_b, columns.label) if c is not None)
    examples = []
    # utf-8-sig drops MRPC's byte-order mark; newline="" keeps csv in charge of line ends.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(rows, start=1):
            if columns.header and lineno == 1:
                continue
            where = f"{path}:{lineno}"
            if len(row) <= needed:
                raise BertforgeError(f"{where}: expected at least {needed + 1} tab-separated columns, got {len(row)}")
            label = None
            if columns.label is not None:
                label = _parse_label(task, row[columns.label], where)
            text_b = row[columns.text_b] if columns.text_b is not None else None
            examples.append(Example(row[columns.text_a], text_b, label))
    return examples


def _load_from_hub(task: TaskSpec, split: str) -> list[Example]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise BertforgeError("no glue_dir given and the `datasets` package is missing") from None
    hub_split = {"dev": "validation", "dev_matched": "validation_matched",
                 "dev_mismatched": "validation_mismatched"}.get(split, split)
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=hub_split)
    except Exception as e:  # offline, unknown split...: one line, not a traceback
        raise BertforgeError(
            f"no --glue-dir given and GLUE {task.name} could not be loaded from the hub ({type(e).__name__}); "
            "pass --glue-dir pointing at a glue_data folder"
        ) from None
    col_a, col_b = task.hub_columns
    examples = []
    for row in ds:
        label = row["label"]
        if label is None or label == -1:
            label = None
        elif task.is_regression:
            label = float(label)
        examples.append(Example(row[col_a], row[col_b] if col_b else None, label))
    return examples


def load_glue(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Examples of one GLUE task and split.

    `data_dir` holds the task folders (`CoLA/`, `SST-2/`, ...). Without it the hub is tried.
    """
    spec = get_task(task)
    columns = _split_key(spec, split)
    if data_dir is None:
        return _load_from_hub(spec, split)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BertforgeError(f"GLUE data folder {data_dir} does not exist")
    path = data_dir / spec.folder / f"{spec.splits[split]}.tsv"
    if not path.is_file():
        raise BertforgeError(f"{path} not found: {data_dir} has no {split} split of {spec.folder}")
    return read_tsv(spec, path, columns)


def load_train_examples(task: str, data_dir: str | os.PathLike | None = None, train_file: str | os.PathLike | None = None,
                        max_examples: int | None = None) -> list[Example]:
    """The training rows of a recipe: `train_file` (a TSV in the task's layout, e.g. augmented data) or the
    GLUE train split, cut to the first `max_examples`."""
    examples = load_examples_file(task, train_file) if train_file else load_glue(task, "train", data_dir)
    return examples[:max_examples] if max_examples else examples


def load_examples_file(task: str, path: str | os.PathLike, split: str = "train") -> list[Example]:
    """A TSV in the task's own layout (e.g. the output of `bertforge augment`)."""
    spec = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise BertforgeError(f"training file {path} not found")
    return read_tsv(spec, path, _split_key(spec, split))


def write_examples_file(task: str, examples: list[Example], path: str | os.PathLike) -> None:
    """Write examples in the task's train-file layout, so `load_examples_file` reads them back."""
    spec = get_task(task)
    cols = spec.train
    width = max(c for c in (cols.text_a, cols.text_b, cols.label) if c is not None and c >= 0) + 1
    if cols.label == -1:  # MNLI: label in the last column
        width = max(cols.text_a, cols.text_b or 0) + 2
    label_col = width - 1 if cols.label == -1 else cols.label
    with open(path, "w", encoding="utf-8", newline="") as f:
        if cols.header:
            f.write("\t".join(f"col{i}" for i in range(width)) + "\n")
        for ex in examples:
            row = [""] * width
            row[cols.text_a] = _clean(ex.text_a)
            if cols.text_b is not None:
                row[cols.text_b] = _clean(ex.text_b or "")
            if spec.is_regression:
                row[label_col] = f"{ex.label:.4f}"
            else:
                row[label_col] = (spec.file_labels or spec.labels)[ex.label]
            f.write("\t".join(row) + "\n")


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
