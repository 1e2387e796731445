"""`matrec export | sample | train` under faults and hostile input (issue 26): out-of-range
options refused before any work, a full disk during a checkpoint, forged checkpoints and stored
tokenizers. Each user error is one line with exit status 2, through the real command."""
import hashlib
import importlib.util
import json
import resource
import shutil
import signal

import pytest

from matrec import cli
from matrec.train.checkpoint import load_checkpoint
from support import TINY_TRAIN, matrec_cli, one_line_error, refused_in_process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny recurrent run (copy), an attention run (copy) and a BPE language-model run."""
    root = tmp_path_factory.mktemp("runs")
    (root / "text.txt").write_text("to be or not to be, that is the question\n" * 40)
    mp = pytest.MonkeyPatch()
    mp.setenv("MATREC_CACHE", str(root / "cache"))
    try:
        for name, extra in (("mornn", ["--model", "mornn", "--task-arg", "delay=4"]),
                            ("attn", ["--model", "attn", "--task-arg", "delay=4", "--model-arg", "d_model=16",
                                      "--model-arg", "n_layers=1", "--model-arg", "n_heads=2"]),
                            ("lm", ["--task", "text", "--task-arg", f"path={root / 'text.txt'}", "--task-arg",
                                    "seq_len=8", "--task-arg", "vocab_size=300"])):
            argv = [*TINY_TRAIN, *extra, "--out-dir", str(root), "--run-name", name]
            if name == "attn":   # hidden_size is not an attention option
                argv = [a for a in argv if a not in ("--hidden-size", "8")]
            assert cli.main(["train", *argv]) == 0
    finally:
        mp.undo()
    return root



def test_export_max_length_is_checked_before_any_work(runs, tmp_path, capsys):
    one_line_error(matrec_cli("export", runs / "mornn", "--format", "onnx", "--max-length", "1",
                              "--out", tmp_path / "m.onnx"),
                   "export", "--max-length must be an int in [8, 16777216], got 1")
    for bad in (2 ** 63, 10 ** 12, 0, -5):
        assert "--max-length must be an int in [8, 16777216]" in refused_in_process(
            capsys, "export", runs / "mornn", "--format", "onnx", "--max-length", bad, "--out", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="needs the export extra")
def test_executorch_max_length_too_large_for_attention_is_refused_up_front(runs, tmp_path):
    proc = matrec_cli("export", runs / "attn", "--format", "executorch", "--max-length", 10 ** 6,
                      "--out", tmp_path / "m.pte", timeout=120)
    one_line_error(proc, "export", "--max-length 1,000,000 makes ExecuTorch plan at least", "GiB", "lower it")
    assert not (tmp_path / "m.pte").exists()


def _fsize_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_refused_by_the_disk_is_a_clear_error_and_the_previous_one_stays(runs, tmp_path):
    """A real refusal by the kernel: the run continues with a file-size limit below a checkpoint's size."""
    run = tmp_path / "run"
    shutil.copytree(runs / "mornn", run)
    before = load_checkpoint(run)[0]["step"]
    files = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    proc = matrec_cli("train", "--resume", run, "--steps", "8", preexec_fn=_fsize_limit(1500))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("matrec")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("matrec train: error: File too large while writing a checkpoint (the previous "
                               "checkpoint is intact): ") and "model.safetensors" in lines[0]
    assert load_checkpoint(run)[0]["step"] == before      # still loads, verified by its checksums
    assert files == {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}


def _forge(run, path, content: bytes):
    """Replace ``path`` of the run's checkpoint with ``content`` and record its SHA-256 in state.json."""
    ckpt = next((run / "checkpoints").glob("step-*"))
    (ckpt / path).write_bytes(content)
    state = json.loads((ckpt / "state.json").read_text())
    if path in state["files"]:
        state["files"][path] = hashlib.sha256(content).hexdigest()
    (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


def test_forged_weights_and_bad_stored_tokenizers_are_clear_errors(runs, tmp_path, capsys):
    forged = tmp_path / "forged"
    shutil.copytree(runs / "lm", forged)
    ckpt = _forge(forged, "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    for argv in (["sample", forged, "--tokens", "2"], ["export", forged, "--format", "onnx", "--out", tmp_path / "x"]):
        err = refused_in_process(capsys, *argv)
        assert "cannot be read as safetensors" in err and str(ckpt / "model.safetensors") in err
    one_line_error(matrec_cli("sample", forged, "--tokens", "2"), "sample", "cannot be read as safetensors")
    # a valid safetensors file of other tensors
    from safetensors.torch import save
    import torch
    _forge(forged, "model.safetensors", save({"w": torch.zeros(3)}))
    assert "do not fit the model" in refused_in_process(capsys, "sample", forged, "--tokens", "2")

    bad = tmp_path / "bad-tokenizer"
    shutil.copytree(runs / "lm", bad)
    ckpt = next((bad / "checkpoints").glob("step-*"))
    state = json.loads((ckpt / "state.json").read_text())
    for tokenizer in ('{"not": "a tokenizer"}', "garbage"):
        (ckpt / "state.json").write_text(json.dumps({**state, "tokenizer": tokenizer}))
        err = refused_in_process(capsys, "sample", bad, "--tokens", "2")
        assert "the tokenizer in state.json cannot be read" in err and str(ckpt) in err
    one_line_error(matrec_cli("sample", bad, "--tokens", "2"), "sample", "the tokenizer in state.json cannot be read")
    if importlib.util.find_spec("transformers") is not None:
        err = refused_in_process(capsys, "export-hf", bad, tmp_path / "hf")
        assert "the tokenizer in state.json cannot be read" in err and not (tmp_path / "hf").exists()
        err = refused_in_process(capsys, "export-hf", forged, tmp_path / "hf")
        assert "do not fit the model" in err and not (tmp_path / "hf").exists()


def test_a_config_file_nested_20000_deep_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' * 20_000 + "1" + "}" * 20_000)
    one_line_error(matrec_cli("train", "--config", path), "train", str(path), "nested too deeply")
