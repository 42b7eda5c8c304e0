"""Artifacts are checked against their manifest when loaded (issue 14, item 5): file sizes always
(cheap), sha256 on request (`--verify`). A truncated or altered file is a one-line error and exit 2,
through the CLI, the loaders and the serving path; a plain Hugging Face folder (no manifest) with a
truncated file gets a one-line error too."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from pipeline.artifacts import Manifest, prepare_output_dir, verify_artifact, verify_files, write_manifest
from pipeline.data import sample_data_dir
from pipeline.errors import BertforgeError
from serving_helpers import export_tiny_onnx

SAMPLE = str(sample_data_dir())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A PyTorch and an ONNX artifact folder with manifests, and a plain folder without one."""
    root = tmp_path_factory.mktemp("artifacts")
    torch_dir = make_tiny_bert(root / "torch")
    write_manifest(torch_dir, Manifest(stage="finetune", task="sst2"))
    onnx_dir = export_tiny_onnx(torch_dir, root / "onnx")
    write_manifest(onnx_dir, Manifest(stage="export", task="sst2", format="onnx", params={"onnx_file": "model.onnx"}))
    plain = make_tiny_bert(root / "plain")
    return {"torch": torch_dir, "onnx": onnx_dir, "plain": plain}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    """Same size, other content: only a checksum can tell (a byte deep in the weights, so it still loads)."""
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(*argv, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stderr.strip().splitlines()


def _assert_one_line_error(code, err, *words):
    text = "\n".join(err)
    assert code == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert err[-1].startswith("bertforge ") and all(w in err[-1] for w in words), err[-1]


@pytest.mark.parametrize("kind,name", [("torch", "model.safetensors"), ("torch", "tokenizer.json"),
                                       ("onnx", "model.onnx"), ("onnx", "tokenizer.json"),
                                       ("plain", "model.safetensors"), ("plain", "tokenizer.json")])
@pytest.mark.slow
def test_a_truncated_file_is_a_one_line_error_from_the_cli(artifacts, tmp_path, kind, name):
    folder = _copy(artifacts[kind], tmp_path / kind)
    _truncate(folder / name)
    code, err = _cli("eval", "--task", "sst2", "--model", str(folder), "--glue-dir", SAMPLE)
    # with a manifest the message names the file and says the sizes disagree; without, the loader's error
    _assert_one_line_error(code, err, *((name,) if kind != "plain" else ()))


@pytest.mark.parametrize("kind,name", [("torch", "model.safetensors"), ("onnx", "model.onnx"),
                                       ("onnx", "tokenizer.json"), ("plain", "tokenizer.json")])
def test_the_serving_load_path_refuses_a_truncated_artifact(artifacts, tmp_path, kind, name):
    from serving.app import create_app
    from serving.config import ServeConfig

    folder = _copy(artifacts[kind], tmp_path / kind)
    _truncate(folder / name)
    with pytest.raises(BertforgeError) as e:
        create_app(folder, ServeConfig(port=0, num_threads=1))
    assert "\n" not in str(e.value)
    if kind != "plain":
        assert name in str(e.value)


def test_sizes_are_checked_on_every_load_and_checksums_on_request(artifacts, tmp_path):
    from pipeline.inference import load_runtime

    folder = _copy(artifacts["torch"], tmp_path / "t")
    verify_artifact(folder, sha256=True)  # intact
    _flip_a_byte(folder / "model.safetensors")
    load_runtime(folder)  # sizes agree: loads (the cheap check cannot see this)
    with pytest.raises(BertforgeError, match="model.safetensors.*sha256"):
        verify_artifact(folder, sha256=True)
    assert verify_files(folder) == ["model.safetensors"]
    (folder / "vocab.txt").unlink()
    with pytest.raises(BertforgeError, match="vocab.txt.*missing"):
        load_runtime(folder)


@pytest.mark.slow
def test_verify_flag_on_eval_and_serve(artifacts, tmp_path):
    folder = _copy(artifacts["onnx"], tmp_path / "o")
    _flip_a_byte(folder / "model.onnx")
    code, err = _cli("eval", "--task", "sst2", "--model", str(folder), "--glue-dir", SAMPLE, "--verify")
    _assert_one_line_error(code, err, "model.onnx", "sha256")
    # serve checks before it loads anything or binds its port
    code, err = _cli("serve", "--model", str(folder), "--port", "0", "--verify", timeout=120)
    _assert_one_line_error(code, err, "model.onnx", "sha256")


def test_rewriting_an_artifact_folder_drops_its_old_manifest(artifacts, tmp_path):
    """A stage writing into a finished artifact's folder must not have its half-written files checked
    against the old manifest (nor leave that manifest describing files it replaced)."""
    folder = _copy(artifacts["torch"], tmp_path / "t")
    prepare_output_dir(folder)
    assert not (folder / "bertforge.json").exists()


def test_scratch_left_by_a_killed_export_is_not_shipped(artifacts, tmp_path):
    """Export and quantization work in a tempfile folder inside their output; after a kill it stays, and
    the re-run's manifest listed its files (the kill benchmark found this)."""
    import tempfile

    out = tmp_path / "onnx"
    out.mkdir()
    scratch = Path(tempfile.mkdtemp(dir=out))  # what a kill inside `with TemporaryDirectory(dir=out)` leaves
    (scratch / "model.onnx").write_bytes(b"half an export")
    (out / "tokenizer").mkdir()
    prepare_output_dir(out)
    assert not scratch.exists() and (out / "tokenizer").is_dir()


def test_leftovers_of_a_killed_write_are_not_listed_in_the_manifest(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    (folder / ".bertforge.json.tmp-4242").write_text("{")  # a kill while the manifest was written
    (folder / ".checkpoints.trash").mkdir()  # a kill while the finished run's checkpoints were deleted
    (folder / ".checkpoints.trash" / "state.pt").write_bytes(b"x")
    listed = {f["path"] for f in write_manifest(folder, Manifest(stage="finetune")).files}
    assert "model.safetensors" in listed and not any(".tmp-" in p or "trash" in p for p in listed)
