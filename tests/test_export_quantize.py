"""ONNX export parity and fusion, int8/fp16 quantization, accuracy-aware quantization, neural-compressor,
and clear errors for bad inputs. Real ONNX Runtime sessions on small random models."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest
from pipeline.cli import main
from pipeline.data import get_task, load_glue
from pipeline.errors import BertforgeError
from pipeline.evaluate import evaluate, predict_logits
from pipeline.export import ExportConfig, export
from pipeline.inference import TorchClassifier, load_runtime
from pipeline.models import load_tokenizer
from pipeline.onnx_utils import op_counts
from pipeline.prune import PruneConfig, prune
from pipeline.quantize import Pt2Classifier, QuantizeConfig, quantize

DEV = 200  # dev examples scored in these tests


@pytest.fixture(scope="module")
def mid_bert(tmp_path_factory, sst2_dir):
    """hidden 128, FFN 512: weights dominate the file, as in real models. Initialised wider than BERT's
    0.02 so predictions depend on the input, with the decision boundary at the median logit gap: many
    near-ties, the hardest case for agreement after quantization."""
    path = make_tiny_bert(tmp_path_factory.mktemp("mid") / "bert", hidden=128, heads=4, intermediate=512, seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.config.initializer_range = 0.2
    torch.manual_seed(0)
    model.apply(model._init_weights)
    dev = load_glue("sst2", "dev", sst2_dir)[:DEV]
    logits = predict_logits(TorchClassifier.from_model(model.eval(), load_tokenizer(path)), dev, get_task("sst2"), 64, progress=False)
    with torch.no_grad():
        model.classifier.bias[1] -= float(np.median(logits[:, 1] - logits[:, 0]))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(mid_bert, sst2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    for name, optimize in (("plain", "none"), ("fused", "O2")):
        export(ExportConfig(model=str(mid_bert), out=str(root / name), glue_dir=str(sst2_dir), optimize=optimize,
                            validation_examples=64, evaluate_dev=False), progress=False)
    return root


def test_export_parity_and_loaders(mid_bert, exported, sst2_dir):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    for name in ("plain", "fused"):
        m = read_manifest(exported / name)
        assert m.format == "onnx" and m.parent == str(mid_bert)
        for check in m.params["validation"].values():
            assert check["validated"] and check["max_abs_diff"] < 1e-4 and check["label_agreement"] == 1.0
        # dynamic axes: optimum's loader, other batch and sequence sizes than at export time
        ort_model = ORTModelForSequenceClassification.from_pretrained(exported / name)
        torch_model = AutoModelForSequenceClassification.from_pretrained(mid_bert).eval()
        tokenizer = load_tokenizer(mid_bert)
        for texts in (["a fine film"], ["one", "a much longer sentence about a movie that was not good at all", "ok"]):
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                np.testing.assert_allclose(ort_model(**enc).logits.numpy(), torch_model(**enc).logits.numpy(), atol=1e-4)
    # bertforge's own runtime and evaluation read the folder too
    assert load_runtime(exported / "fused").format == "onnx"
    dev = load_glue("sst2", "dev", sst2_dir)[:32]
    onnx_score = evaluate(str(exported / "fused"), "sst2", sst2_dir, progress=False, examples=dev).metrics["score"]
    assert onnx_score == evaluate(str(mid_bert), "sst2", sst2_dir, progress=False, examples=dev).metrics["score"]


def test_fused_graph_holds_fused_operators(exported):
    fused, plain = op_counts(exported / "fused" / "model.onnx"), op_counts(exported / "plain" / "model.onnx")
    for op in ("Attention", "EmbedLayerNormalization", "BiasGelu"):
        assert op in fused, op
        assert op not in plain
    assert fused["Attention"] == 2  # one per layer
    # the CPU export leaves out SkipLayerNormalization (its CPU kernel is slower than Add + LayerNormalization)
    assert "SkipLayerNormalization" not in fused and fused["LayerNormalization"] == 4


def test_cpu_sessions_skip_the_slow_skip_layer_norm_fusion(exported, sst2_dir, tmp_path):
    """ORT fuses Add + LayerNormalization of a dynamic-int8 graph into SkipLayerNormalization at load unless
    told not to; bertforge's CPU sessions tell it. If ORT renames the optimizer, the name stops working and
    this fails."""
    import onnxruntime as ort

    from pipeline.providers import CPU_EP, disabled_optimizers, select_providers

    quantize(QuantizeConfig(model=str(exported / "plain"), out=str(tmp_path / "q"), glue_dir=str(sst2_dir),
                            eval_examples=16), progress=False)
    assert disabled_optimizers(select_providers("cpu")) == ["SkipLayerNormFusion"]
    assert disabled_optimizers([("CUDAExecutionProvider", {}), CPU_EP]) == []

    def ops_after_load(disabled):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
        ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), options, providers=[CPU_EP],
                             disabled_optimizers=disabled)
        return op_counts(tmp_path / "loaded.onnx")

    assert "SkipLayerNormalization" in ops_after_load([])
    assert "SkipLayerNormalization" not in ops_after_load(disabled_optimizers([CPU_EP]))


def test_pruned_model_exports_and_fuses(tiny_bert, sst2_dir, tmp_path):
    prune(PruneConfig(model=str(tiny_bert), task="sst2", out=str(tmp_path / "pruned"), glue_dir=str(sst2_dir),
                      heads=0.5, ffn=0.5, importance_examples=32), progress=False)
    m = export(ExportConfig(model=str(tmp_path / "pruned"), out=str(tmp_path / "onnx"), glue_dir=str(sst2_dir),
                            validation_examples=64, evaluate_dev=False), progress=False)
    assert m.params["validation"]["optimized"]["validated"]
    assert m.params["fused_ops"]["Attention"] == 2


def test_dynamic_int8_is_small_and_agrees(exported, sst2_dir, tmp_path):
    m = quantize(QuantizeConfig(model=str(exported / "fused"), out=str(tmp_path / "q"), glue_dir=str(sst2_dir),
                                eval_examples=DEV), progress=False)
    fp32, int8 = (exported / "fused" / "model.onnx").stat().st_size, (tmp_path / "q" / "model.onnx").stat().st_size
    assert fp32 / int8 >= 3.0
    assert m.precision == "int8" and "QAttention" in m.params["ops"]
    assert m.params["agreement_with_source"]["label_agreement"] >= 0.9
    assert abs(m.metrics["dev"]["score"] - m.metrics["source_dev"]["score"]) <= 0.05


def test_static_int8_answers_ignore_their_batch_neighbours_dynamic_ones_do_not(exported, sst2_dir, tmp_path):
    """What a dynamically batching server sees (benchmarks/batch_invariance.py): the same texts alone and in
    shuffled batches of 16 through serving's Predictor. Dynamic int8 takes one activation scale per batch, so
    neighbours move a row's logits; static int8's scales are fixed at calibration, so none can."""
    from benchmarks.batch_invariance import answers
    from serving.predictor import Predictor

    quantize(QuantizeConfig(model=str(exported / "fused"), out=str(tmp_path / "dyn"), glue_dir=str(sst2_dir),
                            eval_examples=32), progress=False)
    quantize(QuantizeConfig(model=str(exported / "plain"), out=str(tmp_path / "static"), mode="static",
                            glue_dir=str(sst2_dir), calibration_examples=64, eval_examples=32), progress=False)
    texts = [ex.text_a for ex in load_glue("sst2", "dev", sst2_dir)[:96]]
    moved = {}
    for name in ("dyn", "static"):
        predictor = Predictor(load_runtime(str(tmp_path / name), num_threads=1), max_tokens=64)
        _, alone = answers(predictor, texts, 1, seed=0)
        _, batched = answers(predictor, texts, 16, seed=0)
        moved[name] = float(np.abs(batched - alone).max())
    assert moved["static"] <= 1e-5, moved
    assert moved["dyn"] > 1e-3, moved
    # the server says which kind it serves
    from serving.app import _batch_invariant
    assert _batch_invariant(tmp_path / "dyn") is False and _batch_invariant(tmp_path / "static") is True
    assert _batch_invariant(exported / "fused") is True


def test_static_int8_and_fp16(exported, sst2_dir, tmp_path):
    m = quantize(QuantizeConfig(model=str(exported / "plain"), out=str(tmp_path / "s"), mode="static",
                                glue_dir=str(sst2_dir), calibration_examples=64, eval_examples=DEV), progress=False)
    assert (exported / "plain" / "model.onnx").stat().st_size / (tmp_path / "s" / "model.onnx").stat().st_size >= 3.0
    assert m.params["agreement_with_source"]["label_agreement"] >= 0.9
    with pytest.raises(BertforgeError, match="unfused"):
        quantize(QuantizeConfig(model=str(exported / "fused"), out=str(tmp_path / "s2"), mode="static", glue_dir=str(sst2_dir)))

    h = quantize(QuantizeConfig(model=str(exported / "fused"), out=str(tmp_path / "h"), mode="fp16"), progress=False)
    graph = onnx.load(str(tmp_path / "h" / "model.onnx"))
    assert h.precision == "fp16"
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64  # inputs unchanged


@pytest.mark.slow
def test_accuracy_aware_meets_tolerance(exported, glue_dir, tmp_path):
    # GLUE's SST-2 (the glue_dir fixture skips without it): the case, full int8 missing a zero tolerance on the
    # carved rows and the search restoring it, was found on its training rows; on the bundled sample's rows this
    # model's full int8 ties fp32 (tried: 128 to 512 tuning rows), leaving the search nothing to do.
    m = quantize(QuantizeConfig(model=str(exported / "plain"), out=str(tmp_path / "aa"), mode="static",
                                glue_dir=str(glue_dir), tolerance=0.0, calibration_examples=64, eval_examples=DEV, tune_examples=256,
                                sensitivity_examples=32), progress=False)
    report = m.params["accuracy_aware"]
    assert report["met"] and report["score"] >= report["fp32_score"]
    assert "not dev" in report["tuned_on"]  # tuned on carved train rows; dev is scored once, afterwards
    assert m.metrics["dev"]["examples"] == DEV
    # this model and tuning rows are chosen so that full int8 misses the tolerance: the search must run
    assert report["full_int8_score"] < report["fp32_score"]
    assert report["excluded_nodes"] and len(report["sensitivity"]) > len(report["excluded_nodes"])
    graph = onnx.load(str(tmp_path / "aa" / "model.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = {n.name: n for n in graph.node}
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for name in report["excluded_nodes"]:  # kept in float: the weight is a float initializer, not dequantized
        assert set(nodes[name].input) & floats, name
    assert any(set(n.input) & dequantized for n in graph.node if n.op_type == "MatMul")  # the rest is int8


@pytest.mark.slow
def test_neural_compressor_backend(tiny_bert, sst2_dir, tmp_path):
    m = quantize(QuantizeConfig(model=str(tiny_bert), out=str(tmp_path / "inc"), mode="inc-dynamic",
                                glue_dir=str(sst2_dir), calibration_examples=16, eval_examples=64), progress=False)
    assert m.format == "pytorch" and m.precision == "int8" and (tmp_path / "inc" / "model.pt2").is_file()
    assert m.params["agreement_with_source"]["max_abs_diff"] < 0.05
    runtime = Pt2Classifier(str(tmp_path / "inc"))
    enc = runtime.tokenizer(["a", "two words here"], padding=True, return_tensors="np")
    assert runtime(dict(enc)).shape == (2, 2)


def test_cli_bad_inputs(exported, mid_bert, tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported / "fused", corrupt)
    (corrupt / "model.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["quantize", "--model", str(corrupt), "--out", str(tmp_path / "o")]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
    assert main(["quantize", "--model", str(mid_bert), "--out", str(tmp_path / "o")]) == 2
    assert "export it first" in capsys.readouterr().err
    no_weights = tmp_path / "no_weights"
    shutil.copytree(mid_bert, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert main(["export", "--model", str(no_weights), "--out", str(tmp_path / "o"), "--no-eval"]) == 2
    assert "cannot load model weights" in capsys.readouterr().err
    assert main(["export", "--model", str(exported / "fused"), "--out", str(tmp_path / "o")]) == 2
    assert "already an ONNX artifact" in capsys.readouterr().err
