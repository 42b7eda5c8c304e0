"""The distillation benchmark's equal-compute rule: every compared method of a task trains as many epochs over
the same rows as TinyBERT's two steps together, so their rows process the same number of examples."""
from types import SimpleNamespace

from benchmarks.distill_glue import method_budget, schedule_for, trained_epochs


def test_every_method_trains_as_many_epochs_as_tinybert_s_two_steps(sst2_dir):
    args = SimpleNamespace(max_train_examples=64, intermediate_epochs=4, prediction_epochs=2, precision="auto",
                           max_steps_per_epoch=None, batch_size=16, intermediate_lr=5e-5, prediction_lr=3e-5,
                           train_file={})
    sched = schedule_for("sst2", args)
    epochs = {m: trained_epochs(*method_budget(m, sched, "sst2", args, sst2_dir))
              for m in ("tinybert", "pred-only", "labels-only", "kd", "difficulty", "theseus")}
    assert set(epochs.values()) == {6}, epochs
    # theseus replaces modules for the intermediate epochs, then trains its successor alone for the rest
    replacing, options = method_budget("theseus", sched, "sst2", args, sst2_dir)
    assert (replacing, options["successor_epochs"]) == (4, 2)
    assert 0 < options["slope"] * 4 * 4 <= 0.7 + 1e-6  # p climbs from 0.3 to 1 over 4 epochs of 4 steps
