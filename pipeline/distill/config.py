"""What one distillation run does, as a typed config every method function takes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.distill.students import StudentSpec
from pipeline.training import LoopConfig

# TinyBERT's task-distillation recipe (paper, section 4.2). Step 1 (intermediate layers) epochs by task;
# every other task gets DEFAULT_INTERMEDIATE_EPOCHS. Unlike the official script, this table is applied.
INTERMEDIATE_EPOCHS = {"mnli": 10, "qqp": 10, "qnli": 10, "cola": 50}
DEFAULT_INTERMEDIATE_EPOCHS = 20
GENERAL_MAX_LENGTH = 128


@dataclass
class LossWeights:
    """Weight of each loss type in the total (the paper's lambda per layer kind)."""

    embedding: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    prediction: float = 1.0


@dataclass
class DistillConfig:
    stage: str  # "general" (unlabeled corpus) | "task" (a GLUE task)
    teacher: str  # general: a pretrained encoder; task: a fine-tuned classifier
    out: str
    method: str = "tinybert"  # a key of pipeline.distill.METHODS
    student: StudentSpec = field(default_factory=StudentSpec)
    mapping: str = "uniform"  # uniform | top | bottom | "3,6,9,12"
    weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 1.0
    # data
    task: str | None = None
    glue_dir: str | None = None
    train_file: str | None = None  # task stage: e.g. an augmented TSV in the task's layout
    corpus: str | None = None  # general stage: one text per line
    max_train_examples: int | None = None
    max_length: int | None = None  # default: 64 single sentence / 128 pairs (task), 128 (general)
    # task stage schedule; None: the paper's value (intermediate epochs by task, see INTERMEDIATE_EPOCHS)
    intermediate_epochs: int | None = None
    intermediate_lr: float = 5e-5
    prediction_epochs: int = 3
    prediction_lr: float = 3e-5
    cache_teacher: bool = True  # keep the teacher's logits per example after their first computation
    method_options: dict[str, Any] = field(default_factory=dict)  # settings only one method reads
    eval_batch_size: int = 64
    num_threads: int | None = None
    # batch size, warm-up, checkpoints, seed, ...; its epochs and learning rate drive the general stage
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=3, batch_size=32, learning_rate=1e-4))

    def intermediate_epochs_for(self, task: str) -> int:
        if self.intermediate_epochs is not None:
            return self.intermediate_epochs
        return INTERMEDIATE_EPOCHS.get(task, DEFAULT_INTERMEDIATE_EPOCHS)
