"""`matrec export RUN_DIR --format onnx|executorch [--mode] [--out]` on workbench runs, and its
errors: each names the argument, exits 2 and overwrites nothing."""
import json

import pytest
import torch

from matrec import cli
from test_cli import TINY, run



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the copy task: a MORNN (exportable) and an LSTM (not)."""
    root = tmp_path_factory.mktemp("runs")
    for model in ("mornn", "lstm"):
        assert cli.main(["train", "--model", model, "--out-dir", str(root), "--run-name", model, *TINY]) == 0
    return root


def _fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_export_a_run_and_run_it(runs, capsys):
    """Named by its checkpoints/ folder, the run gets the file in its top folder by default."""
    pytest.importorskip("onnxruntime")
    from matrec.export import load
    out = runs / "mornn" / "model-step.onnx"
    code, stdout, _ = run(capsys, "export", str(runs / "mornn" / "checkpoints"), "--format", "onnx",
                          "--mode", "step")
    info = json.loads(stdout.splitlines()[-1])
    assert code == 0 and info["out"] == str(out) and info["bytes"] == out.stat().st_size
    assert json.loads((runs / "mornn" / "model-step.onnx.json").read_text())["mode"] == "step"
    _, _, model, _ = cli._load_for_inference(runs / "mornn")
    x = torch.randint(0, model.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model(x)
    runner, state = load(out), None
    for t in range(20):
        y, state = runner(x[:, t:t + 1], state=state)
        torch.testing.assert_close(y[0, 0], ref[0, t], atol=1e-5, rtol=1e-5)


def test_existing_output_is_not_overwritten(runs, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_text("keep")
    code, err = _fails(capsys, "export", str(runs / "mornn"), "--format", "onnx", "--out", str(out))
    assert code == 2 and "--out" in err and "exists" in err and out.read_text() == "keep"


def test_unsupported_model_is_named(runs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "lstm.onnx"
    code, err = _fails(capsys, "export", str(runs / "lstm"), "--format", "onnx", "--out", str(out))
    assert code == 2 and "RUN_DIR" in err and "'lstm'" in err and "LSTM" in err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["--format", "onnx", "--mode", "chunk"], "argument --mode: invalid choice: 'chunk'"),
    (["--format", "onnx", "--max-length", "0"], "--max-length must be an int in [8, 16777216], got 0"),
])
def test_bad_format_mode_and_length(runs, capsys, argv, message):
    code, err = _fails(capsys, "export", str(runs / "mornn"), *argv)
    assert code == 2 and message in err


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    code, err = _fails(capsys, "export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and str(tmp_path) in err and not (tmp_path / "x.onnx").exists()
