"""GLUE data layer: tasks, loaders, metrics and batching."""
from pipeline.data.glue import (GLUE_DIR_HELP, Example, default_data_dir, load_examples_file, load_glue, load_train_examples,
                                sample_data_dir, write_examples_file)
from pipeline.data.metrics import compute_metrics, logits_to_predictions
from pipeline.data.tasks import GLUE_TASKS, TASKS, TaskSpec, dev_split, get_task

__all__ = [
    "GLUE_DIR_HELP", "GLUE_TASKS", "TASKS", "TaskSpec", "Example", "compute_metrics", "logits_to_predictions",
    "default_data_dir", "dev_split", "get_task", "load_examples_file", "load_glue", "load_train_examples", "sample_data_dir",
    "write_examples_file",
]
from pipeline.data.encode import Collator, EncodedDataset, eval_loader, train_loader  # noqa: E402

__all__ += ["Collator", "EncodedDataset", "eval_loader", "train_loader"]
