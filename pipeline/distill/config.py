"""What one distillation run does, as a typed config every method function takes."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.data import GLUE_DIR_HELP, GLUE_TASKS
from pipeline.distill import METHODS
from pipeline.settings import setting
from pipeline.training import LoopConfig

# TinyBERT's task-distillation recipe (paper, section 4.2). Step 1 (intermediate layers) epochs by task;
# every other task gets DEFAULT_INTERMEDIATE_EPOCHS. Unlike the official script, this table is applied.
INTERMEDIATE_EPOCHS = {"mnli": 10, "qqp": 10, "qnli": 10, "cola": 50}
DEFAULT_INTERMEDIATE_EPOCHS = 20
GENERAL_MAX_LENGTH = 128


@dataclass
class StudentSpec:
    """Exactly one of the three."""

    config: str | None = setting(None, "tinybert-4l-312d | tinybert-6l-768d | CONFIG.json (random weights)",
                                 flag="--student-config")
    pretrained: str | None = setting(None, "pretrained student folder or hub id (e.g. a general TinyBERT)",
                                     flag="--student")
    init_from_teacher: str | None = setting(None, "copy teacher layers: a count (3: spread uniformly) or a list (2,4,6)",
                                            metavar="LAYERS")

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class LossWeights:
    """Weight of each loss type in the total (the paper's lambda per layer kind)."""

    embedding: float = setting(1.0, "weight of the embedding-layer loss", flag="--embedding-weight")
    hidden: float = setting(1.0, "weight of the hidden-state losses", flag="--hidden-weight")
    attention: float = setting(1.0, "weight of the attention-score losses", flag="--attention-weight")
    prediction: float = setting(1.0, "weight of the prediction-layer loss", flag="--prediction-weight")


# Settings only one method reads, typed; each method's manifest records its own section.
@dataclass
class KDOptions:
    alpha: float = setting(0.5, "kd: weight of the teacher's soft labels; 1 - alpha goes to the gold labels")


@dataclass
class TheseusOptions:
    replacing_rate: float | None = setting(None, "theseus: a constant replacing probability p; default: "
                                                 "p = min(1, base_rate + slope * step)")
    base_rate: float = setting(0.3, "theseus: p at step 0 of the linear schedule")
    slope: float = setting(0.0006, "theseus: p's growth per optimizer step")
    successor_epochs: int | None = setting(None, "theseus: epochs of successor-only fine-tuning (default: loop.epochs)")
    freeze_shared: bool = setting(False, "theseus: also freeze embeddings, pooler and classifier while replacing")


DEFAULT_THRESHOLDS = "0,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.8,1"


@dataclass
class EarlyExitOptions:
    branch_hidden: int = setting(128, "early-exit: hidden width of each exit's classifier")
    thresholds: str = setting(DEFAULT_THRESHOLDS, "early-exit: entropy thresholds measured on dev (comma-separated)")


@dataclass
class DistillConfig:
    stage: str = setting(help="general (unlabeled corpus) | task (a GLUE task)", choices=("general", "task"))
    teacher: str = setting(help="general: pretrained encoder; task: fine-tuned classifier folder")
    out: str = setting(help="the student's folder")
    method: str = setting("tinybert", "tinybert: intermediate + prediction layers; pred-only: prediction layer only; "
                                      "labels-only: the student trained on gold labels, no teacher signal; kd, theseus, "
                                      "difficulty, early-exit: the baselines", choices=tuple(METHODS))
    student: StudentSpec = setting(factory=StudentSpec)
    mapping: str = setting("uniform", "uniform | top | bottom | teacher layers like 3,6,9,12")
    weights: LossWeights = setting(factory=LossWeights)
    temperature: float = setting(1.0, "prediction-layer soft cross-entropy temperature")
    # data
    task: str | None = setting(None, f"GLUE task (task stage): {', '.join(GLUE_TASKS)}")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    train_file: str | None = setting(None, "task stage: TSV in the task's layout (e.g. augmented data)")
    corpus: str | None = setting(None, "general stage: text file, one text per line")
    max_train_examples: int | None = setting(None, "train on the first N examples only")
    max_length: int | None = setting(None, "default 64 single sentence / 128 pairs; general 128")
    # task stage schedule; None: the paper's value (intermediate epochs by task, see INTERMEDIATE_EPOCHS)
    intermediate_epochs: int | None = setting(None, "default 20; 10 mnli/qqp/qnli; 50 cola")
    intermediate_lr: float = setting(5e-5, "learning rate of intermediate-layer distillation")
    prediction_epochs: int = setting(3, "prediction-layer epochs (also the labels-only epochs)")
    prediction_lr: float = setting(3e-5, "learning rate of prediction-layer distillation")
    cache_teacher: bool = setting(True, "keep the teacher's outputs per example after their first computation "
                                        "(logits always; intermediate layers within teacher_cache_mb)",
                                  flag="--no-teacher-cache")
    teacher_cache_mb: int = setting(4096, "memory (MiB) for the teacher's layer outputs and attention scores kept "
                                          "across intermediate epochs, in fp16 (0: recompute every batch)")
    kd: KDOptions = setting(factory=KDOptions)
    theseus: TheseusOptions = setting(factory=TheseusOptions)
    early_exit: EarlyExitOptions = setting(factory=EarlyExitOptions)
    eval_batch_size: int = setting(64, "examples per dev-scoring batch")
    num_threads: int | None = setting(None, "CPU threads for torch", flag="--threads")
    # batch size, warm-up, checkpoints, seed, ...; its epochs and learning rate drive the general stage
    loop: LoopConfig = setting(factory=lambda: LoopConfig(epochs=3, batch_size=32, learning_rate=1e-4))

    def intermediate_epochs_for(self, task: str) -> int:
        if self.intermediate_epochs is not None:
            return self.intermediate_epochs
        return INTERMEDIATE_EPOCHS.get(task, DEFAULT_INTERMEDIATE_EPOCHS)
