"""One model loader for every stage, serving and bench; it never runs Python shipped inside a model folder."""
import json
import shutil

import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import make_tiny_bert
from pipeline.cli import main
from pipeline.errors import BertforgeError
from pipeline.inference import load_runtime
from pipeline.models import load_classifier, load_config, load_model, load_tokenizer
from pipeline.data import get_task
from pipeline.prune import PruneConfig, prune

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertConfig, BertForSequenceClassification
class EvilConfig(BertConfig):
    pass
class PrunedBertForSequenceClassification(BertForSequenceClassification):
    pass
"""


def _plant(folder, marker, module: str = "modeling_pruned_bert", model_type: str | None = None) -> None:
    """Ship `module`.py in the folder, writing `marker` when imported, and point config.json's auto_map at it."""
    (folder / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": f"{module}.EvilConfig",
                          "AutoModelForSequenceClassification": f"{module}.PrunedBertForSequenceClassification"}
    if model_type is not None:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))


def _load_every_way(folder):
    yield lambda: load_config(folder)
    yield lambda: load_model(folder)
    yield lambda: load_classifier(folder, get_task("sst2"))
    yield lambda: load_runtime(folder)


def test_a_folder_with_an_auto_map_loads_without_running_its_code(tmp_path):
    folder = make_tiny_bert(tmp_path / "evil")
    marker = tmp_path / "marker"
    _plant(folder, marker)
    for load in _load_every_way(folder):
        load()
    load_tokenizer(folder)
    assert main(["eval", "--task", "sst2", "--model", str(folder), "--glue-dir", str(_sample()),
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert not marker.exists()


def test_a_model_only_its_own_code_can_read_is_refused_in_one_line(tmp_path, capsys):
    folder = make_tiny_bert(tmp_path / "evil")
    marker = tmp_path / "marker"
    _plant(folder, marker, module="evil", model_type="evil-bert")
    for load in _load_every_way(folder):
        with pytest.raises(BertforgeError, match="cannot load"):
            load()
    load_tokenizer(folder)  # the tokenizer files are data: they load, and run nothing
    assert main(["eval", "--task", "sst2", "--model", str(folder), "--glue-dir", str(_sample())]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def test_pruned_artifact_loads_through_bertforges_class_not_its_copy(tiny_bert, tmp_path):
    out = tmp_path / "pruned"
    prune(PruneConfig(model=str(tiny_bert), task="sst2", out=str(out), glue_dir=str(_sample()), heads=0.5, ffn=0.5,
                      importance_examples=32), progress=False)
    config = json.loads((out / "config.json").read_text())
    if len(set(config.get("intermediate_sizes") or [0])) == 1:
        pytest.skip("this tiny model pruned to equal FFN widths: no per-layer class needed")
    reference = load_model(out)
    marker = tmp_path / "marker"
    copy = out / "modeling_pruned_bert.py"
    evil = EVIL.format(marker=str(marker))
    # the copy, tampered with, padded to its recorded size so the load-time size check lets it through
    copy.write_text(evil + "#" * (copy.stat().st_size - len(evil.encode()) - 1) + "\n")
    model = load_model(out)
    assert not marker.exists()
    assert [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer] == config["intermediate_sizes"]
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    assert torch.allclose(model.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
    assert isinstance(model, BertForSequenceClassification)


def _sample():
    from pipeline.data import sample_data_dir

    return sample_data_dir()


def test_a_damaged_weights_file_is_one_clear_error(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BertforgeError, match="cannot load model weights"):
        load_model(folder)
    shutil.rmtree(folder)
