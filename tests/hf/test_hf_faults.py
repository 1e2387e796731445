"""export-hf and import-hf under faults and hostile input, through the real ``matrec`` command:
nothing overwritten, every error one line naming the file and the field (issue 26)."""
import json
import shutil

import pytest

pytest.importorskip("transformers")

from matrec import cli  # noqa: E402
from support import TINY_TRAIN, matrec_cli, one_line_error, refused_in_process  # noqa: E402


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A two-step BPE language-model run (export-hf converts it) and its folder."""
    tmp = tmp_path_factory.mktemp("lm")
    (tmp / "text.txt").write_text("to be or not to be, that is the question\n" * 40)
    mp = pytest.MonkeyPatch()
    mp.setenv("MATREC_CACHE", str(tmp / "cache"))
    try:
        assert cli.main(["train", *TINY_TRAIN, "--task", "text", "--task-arg", f"path={tmp / 'text.txt'}",
                         "--task-arg", "seq_len=8", "--task-arg", "vocab_size=300", "--out-dir", str(tmp),
                         "--run-name", "run"]) == 0
    finally:
        mp.undo()
    return tmp / "run"


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}



def test_export_hf_never_writes_into_a_run_or_over_a_folder(lm_run, tmp_path, capsys):
    before = _snapshot(lm_run)
    # the real command: OUT the run itself, and a new folder inside it
    one_line_error(matrec_cli("export-hf", lm_run, lm_run), "export-hf", "exists and is not an empty folder")
    one_line_error(matrec_cli("export-hf", lm_run, lm_run / "hf"), "export-hf",
                   "lies inside the run directory", str(lm_run.resolve()))
    assert "lies inside the run directory" in refused_in_process(capsys, "export-hf", lm_run,
                                                                 lm_run / "checkpoints" / "hf")
    assert not (lm_run / "hf").exists() and not (lm_run / "checkpoints" / "hf").exists()
    # another run as OUT: refused whole, and that run keeps its config
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model": "rnn"}')
    (other / "metrics.jsonl").write_text("")
    one_line_error(matrec_cli("export-hf", lm_run, other), "export-hf", "not an empty folder")
    assert (other / "config.json").read_text() == '{"model": "rnn"}'
    (tmp_path / "file").write_text("x")
    assert "not an empty folder" in refused_in_process(capsys, "export-hf", lm_run, tmp_path / "file")
    assert _snapshot(lm_run) == before
    # a new folder, or an empty one, is what it writes
    (tmp_path / "empty").mkdir()
    assert cli.main(["export-hf", str(lm_run), str(tmp_path / "empty")]) == 0
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["model_type"] == "matrec"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers directory of a small MRU model (sequence backbone: d_model, vocab_size)."""
    import torch

    from matrec.hf import MatrecForCausalLM, config_from_model_spec
    folder = tmp_path_factory.mktemp("hf") / "mru"
    torch.manual_seed(0)
    config = config_from_model_spec("mru", vocab_size=13, d_model=16, n_layers=1, n_heads=2)
    MatrecForCausalLM(config).save_pretrained(folder)
    return folder


def _edited(hf_dir, tmp_path, **fields):
    folder = tmp_path / "edited"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


def test_import_hf_damaged_or_edited_directories_are_clear_errors(hf_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    run = tmp_path / "run"
    for field, value in (("vocab_size", 14), ("d_model", 32)):
        folder = _edited(hf_dir, tmp_path, **{field: value})
        err = refused_in_process(capsys, "import-hf", folder, run)
        assert str(folder / "model.safetensors") in err and f"{field}={value}" in err and "has shape" in err
        shutil.rmtree(folder)
    folder = _edited(hf_dir, tmp_path)
    (folder / "config.json").write_text("[1]")
    one_line_error(matrec_cli("import-hf", folder, run), "import-hf", str(folder / "config.json"),
                   "must hold a JSON object", "got a JSON list")
    shutil.rmtree(folder)
    folder = _edited(hf_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    err = refused_in_process(capsys, "import-hf", folder, run)
    assert str(folder / "model.safetensors") in err and "cannot be read as safetensors" in err
    tensors = load_file(hf_dir / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")   # a pickle: never loaded
    err = refused_in_process(capsys, "import-hf", folder, run)
    assert "has no model.safetensors" in err and "['pytorch_model.bin'] are pickles" in err
    assert not run.exists()
