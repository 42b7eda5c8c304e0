"""Where a student comes from: a named TinyBERT shape or a CONFIG.json (random weights), a pretrained
student folder or hub id (e.g. a general-distilled TinyBERT), or a subset of the teacher's own layers
(`init_from_teacher`, as DistilBERT initialises from every other teacher layer).

Students are plain BERT models: `BertModel` for general distillation, `BertForSequenceClassification`
with the task's labels for task distillation. They must share the teacher's vocabulary, because the
losses compare the two models token by token on the same input ids.
"""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedModel

from pipeline.data.tasks import TaskSpec
from pipeline.distill.config import StudentSpec
from pipeline.distill.mapping import layer_mapping, parse_layers
from pipeline.errors import BertforgeError
from pipeline.models import label_config, load_classifier, load_config, load_encoder, load_tokenizer

# The published TinyBERT shapes (Jiao et al., 2020): TinyBERT-4 and TinyBERT-6.
STUDENT_CONFIGS: dict[str, dict] = {
    "tinybert-4l-312d": {"num_hidden_layers": 4, "hidden_size": 312, "intermediate_size": 1200, "num_attention_heads": 12},
    "tinybert-6l-768d": {"num_hidden_layers": 6, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
}


def build_student(spec: StudentSpec, teacher: PreTrainedModel, teacher_tokenizer, task: TaskSpec | None) -> PreTrainedModel:
    """A student model, a classifier with `task`'s labels when a task is given, else a bare encoder."""
    chosen = [k for k, v in vars(spec).items() if v is not None]
    if len(chosen) != 1:
        raise BertforgeError("choose one student: student.config (NAME|CONFIG.json), student.pretrained (FOLDER|HUB_ID) "
                             f"or student.init_from_teacher (LAYERS) (got {', '.join(chosen) or 'none'})")
    if spec.init_from_teacher is not None:
        return student_from_teacher_layers(teacher, spec.init_from_teacher, task)
    if spec.pretrained is not None:
        return pretrained_student(spec.pretrained, teacher, teacher_tokenizer, task)
    return random_student(student_config(spec.config, teacher.config), teacher, task)


def student_config(name: str, teacher_config) -> BertConfig:
    """A named shape on the teacher's vocabulary and position range, or a CONFIG.json as written."""
    if name in STUDENT_CONFIGS:
        return BertConfig(vocab_size=teacher_config.vocab_size,
                          max_position_embeddings=teacher_config.max_position_embeddings,
                          type_vocab_size=getattr(teacher_config, "type_vocab_size", 2),
                          pad_token_id=getattr(teacher_config, "pad_token_id", 0), **STUDENT_CONFIGS[name])
    path = Path(name)
    if not path.is_file():
        raise BertforgeError(f"unknown student config {name!r}: name one of {', '.join(STUDENT_CONFIGS)} or a CONFIG.json file")
    try:
        return BertConfig.from_json_file(path)
    except (OSError, ValueError) as e:
        raise BertforgeError(f"cannot read student config {path}: {str(e).splitlines()[0]}") from None


def check_vocabulary(student_vocab_size: int, teacher_config, source: str, student_tokenizer=None, teacher_tokenizer=None) -> None:
    if student_vocab_size != teacher_config.vocab_size:
        raise BertforgeError(f"student and teacher vocabularies differ: {source} has {student_vocab_size} tokens, the "
                             f"teacher {teacher_config.vocab_size}; distillation needs the teacher's tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None and \
            student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise BertforgeError(f"student and teacher vocabularies differ: {source} has a tokenizer with other tokens "
                             "than the teacher's; distillation needs the teacher's tokenizer")


def _with_head(config: BertConfig, task: TaskSpec | None) -> BertConfig:
    config = copy.deepcopy(config)
    config.architectures = None
    if task is not None:
        config.update(label_config(task))
    return config


def random_student(config: BertConfig, teacher: PreTrainedModel, task: TaskSpec | None) -> PreTrainedModel:
    check_vocabulary(config.vocab_size, teacher.config, "the student config")
    config = _with_head(config, task)
    return BertForSequenceClassification(config) if task else BertModel(config)


def pretrained_student(name: str, teacher: PreTrainedModel, teacher_tokenizer, task: TaskSpec | None) -> PreTrainedModel:
    config = load_config(name)
    try:
        tok = load_tokenizer(name)
    except BertforgeError:
        tok = None  # a folder without tokenizer files: the vocabulary size check still applies
    check_vocabulary(config.vocab_size, teacher.config, name, tok, teacher_tokenizer)
    if task is not None:
        return load_classifier(name, task)
    return load_encoder(name)


def teacher_layer_subset(teacher_layers: int, spec: str) -> list[int]:
    """"3" -> three layers spread uniformly (6 -> [2, 4, 6]); "1,3,5" -> those layers."""
    spec = str(spec).strip()
    if spec.isdigit():
        return layer_mapping(teacher_layers, int(spec), "uniform")
    layers = parse_layers(spec, what="--init-from-teacher layer list")
    return layer_mapping(teacher_layers, len(layers), layers)


def student_from_teacher_layers(teacher: PreTrainedModel, spec: str, task: TaskSpec | None) -> PreTrainedModel:
    """The teacher's embeddings, the chosen layers (and pooler and, for a task, classifier) copied."""
    layers = teacher_layer_subset(teacher.config.num_hidden_layers, spec)
    config = _with_head(teacher.config, task)
    config.num_hidden_layers = len(layers)
    student = BertForSequenceClassification(config) if task else BertModel(config)
    source = teacher.base_model.state_dict()
    state = {}
    for key, value in source.items():
        if key.startswith("encoder.layer."):
            n = int(key.split(".")[2])
            if n + 1 not in layers:
                continue
            key = key.replace(f"encoder.layer.{n}.", f"encoder.layer.{layers.index(n + 1)}.", 1)
        state[key] = value
    missing, unexpected = student.base_model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise BertforgeError(f"cannot copy teacher layers into the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    head = getattr(teacher, "classifier", None)
    if task is not None and isinstance(head, nn.Linear) and head.out_features == task.num_labels:
        from pipeline.evaluate import label_permutation

        # The teacher's head reads the same features; its rows are put in the task's label order.
        perm = label_permutation(teacher.config, task) or list(range(task.num_labels))
        student.classifier.load_state_dict({k: v[perm] for k, v in head.state_dict().items()})
    return student
