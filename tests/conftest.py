"""Shared fixtures: tiny random BERT models built in-process (tests never touch the network)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads
# of parallel processes slow every test down several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # the slim serving install (bertforge[serve]) runs tests/test_protocols.py without torch
    torch = None

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
if os.environ.get("GLUE_DIR"):
    GLUE_DIR = Path(os.environ["GLUE_DIR"])

needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="../shared/glue_data not present")


def make_tiny_bert(out: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4,
                   intermediate: int = 64, seed: int = 0, task: str | None = "sst2") -> Path:
    """A random BertForSequenceClassification with the real uncased BERT tokenizer, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.models import label_config, packaged_minilm_dir

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128,
                        num_labels=num_labels)
    if task:
        config.update(label_config(get_task(task)))
    model = BertForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip("../shared/glue_data not present")
    return GLUE_DIR


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """A folder holding SST-2 in the GLUE layout: the GLUE folder when it has SST-2, else the sample shipped
    with the package (the full dev set, 4,000 train rows), so SST-2-only tests run on any clone."""
    if (GLUE_DIR / "SST-2").is_dir():
        return GLUE_DIR
    from pipeline.data import sample_data_dir

    return sample_data_dir()
