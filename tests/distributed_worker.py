"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): a few steps of the shared
training loop on a tiny classifier, then each process saves the weights it ended with."""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from pipeline.data import Collator, EncodedDataset, load_glue, sample_data_dir
from pipeline.models import load_tokenizer
from pipeline.training import LoopConfig, TrainLoop


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    # 40 examples in batches of 8: five batches, an odd count the two processes cannot share evenly
    dataset = EncodedDataset(load_glue("sst2", "train", sample_data_dir())[:40], tokenizer, 32)

    def loss_fn(batch):
        batch.pop("idx")
        return {"loss": model(**batch).loss}

    cfg = LoopConfig(epochs=2, batch_size=8, learning_rate=1e-3, checkpoint_every=0, seed=3)
    loop = TrainLoop(cfg, model, dataset, Collator(tokenizer, False), loss_fn, out, evaluate_fn=lambda: 0.5,
                     progress=False)
    loop.run()
    rank = loop.accelerator.process_index
    torch.save({"state": model.state_dict(), "steps": loop.state["global_step"]}, Path(out) / f"rank{rank}.pt")
    loop.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
