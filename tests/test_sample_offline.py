"""`matrec sample` from a text run's checkpoint alone: the tokenizer it keeps replaces the data file."""
import shutil

import pytest

from matrec import cli

pytest.importorskip("tokenizers")

TINY = ["--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1",
        "--ckpt-every", "2", "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot",
        "--model", "lstm", "--hidden-size", "8", "--device", "cpu"]


def sample(capsys, run, prompt):
    assert cli.main(["sample", str(run), "--prompt", prompt, "--tokens", "20", "--seed", "1"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("task,args", [
    ("text", ["--task-arg", "vocab_size=300", "--task-arg", "seq_len=16"]),
])
def test_sample_needs_no_data_file_once_trained(task, args, tmp_path, capsys, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 200 + "a b c d e f g\n" * 50)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    assert cli.main(["train", "--task", task, "--task-arg", f"path={data}", *args, *TINY,
                     "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    capsys.readouterr()
    before = sample(capsys, tmp_path / "r", "the ")
    data.unlink()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    assert sample(capsys, tmp_path / "r", "the ") == before  # same text, from the stored tokenizer


def test_a_prompt_outside_a_stored_char_vocabulary_is_named(tmp_path, capsys, monkeypatch):
    from matrec.data.tasks.lm import StoredVocabulary, char_tokenizer

    vocab = StoredVocabulary(char_tokenizer(list("ab\n")).to_str())
    assert vocab.model_io() == {"vocab_size": 3, "input_size": None, "output_size": 3}
    assert vocab.decode(vocab.encode("ab\nba")) == "ab\nba"
    with pytest.raises(ValueError, match="cannot be encoded with this run's vocabulary"):
        vocab.encode("abz")
