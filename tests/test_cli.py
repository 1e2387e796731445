"""The `matrec` command end to end on tiny settings."""
import argparse
import re
import json

import pytest
import torch
import torch.nn.functional as F

from matrec import cli
from matrec.data.tasks.base import TASKS, Task

TINY = ["--task-arg", "delay=4", "--hidden-size", "8", "--steps", "4", "--batch-size", "4",
        "--eval-every", "2", "--eval-batches", "1", "--log-every", "2", "--ckpt-every", "2",
        "--threads", "1", "--no-progress", "--no-tensorboard"]


class ToyText(Task):
    """Strings over 'ab\\n' where 'a' is always followed by 'b' (a text task for `sample`)."""

    name = "toy_text"
    has_vocabulary = True
    vocab_size = output_size = 3
    chars = "ab\n"

    def get_batch(self, split, batch_size, generator):
        ids = torch.randint(0, 3, (batch_size, 9), generator=generator)
        ids[:, 1:][ids[:, :-1] == 0] = 1
        return ids[:, :-1], ids[:, 1:]

    def loss(self, output, target):
        return F.cross_entropy(output.reshape(-1, 3).float(), target.reshape(-1))

    def encode(self, text):
        return torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


TASKS.register("toy_text", ToyText, overwrite=True)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["sample"], ["compare"], ["bench"]])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(command + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: matrec" in text
    if command == ["train"]:
        for flag in ("--task", "--model", "--steps", "--lr", "--optimizer", "--grad-clip", "--resume",
                     "--config", "--compile", "--threads", "--warmup-steps"):
            assert flag in text
    # every option of every command has a help text (argparse prints none when help is missing)
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]] if command else parser
    assert all(a.help for a in sub._actions if not isinstance(a, argparse._SubParsersAction))


def test_train_eval_resume_end_to_end(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--model", "gru", "--out-dir", str(tmp_path), "--run-name", "r", *TINY)
    assert code == 0 and json.loads(out.splitlines()[-1])["status"] == "completed"
    run_dir = tmp_path / "r"
    assert {"config.json", "metrics.jsonl", "plot.png", "summary.json",
        "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    code, out, _ = run(capsys, "eval", str(run_dir), "--batches", "2")
    metrics = json.loads(out)
    assert code == 0 and metrics["step"] == 4 and {"loss", "recall"} <= set(metrics)
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(run_dir), "--lr", "0.1"])
    assert "only --steps and --[no-]progress may be given with it, got ['--lr']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(run_dir), "--steps", "3"])
    assert "steps (3) is below the checkpoint's step (4)" in capsys.readouterr().err
    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--steps", "6", "--progress")
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 6
    assert "it/s" in err                  # the bar the run was started without (TINY: --no-progress)
    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--steps", "8", "--no-progress")
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 8 and "it/s" not in err


def test_eval_with_a_changed_task_option_equals_a_run_configured_with_it(tmp_path, capsys):
    # length extrapolation: a model trained at one task setting, evaluated at another
    from matrec.train import Trainer, TrainConfig
    from matrec.train.checkpoint import load_checkpoint, load_model_weights
    code, _, _ = run(capsys, "train", "--model", "gru", "--out-dir", str(tmp_path), "--run-name", "r", *TINY)
    run_dir = tmp_path / "r"
    code, out, _ = run(capsys, "eval", str(run_dir), "--batches", "2", "--task-arg", "delay=9")
    at9 = json.loads(out)
    code4, out4, _ = run(capsys, "eval", str(run_dir), "--batches", "2")
    assert code == 0 and code4 == 0 and at9["task_args"] == {"delay": 9} and at9["loss"] != json.loads(out4)["loss"]
    meta, ckpt_dir, _ = load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict({**meta["config"], "task_args": {"delay": 9}, "out_dir": str(tmp_path),
                                 "run_name": "ref", "progress": False})
    reference = Trainer(cfg)
    load_model_weights(reference.model, ckpt_dir)
    expected = reference.evaluate(2)
    assert {k: at9[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(run_dir), "--task-arg", "dellay=3"])
    assert e.value.code == 2 and "task 'copy' got unknown option(s) ['dellay']" in capsys.readouterr().err


def test_task_args_that_are_not_json_take_the_option_type(tmp_path):
    args = cli.build_parser().parse_args(
        ["train", "--task", "forecast", "--task-arg", "periods=50,400", "--task-arg", "echo=.5",
         "--task-arg", "lag=[3]", "--task-arg", "seq_len=16"])
    cfg = cli._config_from_args(args)
    # lag=[3] is JSON, so it reaches the task as given (and fails there with its own message)
    assert cfg.task_args == {"periods": (50, 400), "echo": 0.5, "lag": [3], "seq_len": 16}
    args = cli.build_parser().parse_args(["train", "--task", "copy", "--task-arg", "delay=ten"])
    with pytest.raises(ValueError, match=r"delay must be int \(like 100\), got 'ten'"):
        cli._config_from_args(args)


def test_train_from_config_file_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"task": "copy", "task_args": {"delay": 3}, "model": "rnn", "steps": 3,
                               "batch_size": 2, "out_dir": str(tmp_path), "run_name": "fromfile"}))
    code, _, _ = run(capsys, "train", "--config", str(cfg), "--steps", "2", "--no-progress",
                     "--no-tensorboard", "--no-plot", "--threads", "1")
    resolved = json.loads((tmp_path / "fromfile" / "config.json").read_text())
    assert code == 0 and resolved["steps"] == 2 and resolved["model"] == "rnn" and resolved["task_args"] == {"delay": 3}


def test_unknown_names_list_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "lstmm", "--out-dir", str(tmp_path), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model must be one of" in err and "'lstm'" in err and "lstmm" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "nope", "--out-dir", str(tmp_path), *TINY])
    assert "task must be one of" in capsys.readouterr().err


def test_bad_device_and_eval_batches_are_clear_errors(tmp_path, capsys):
    devices = [("gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "CUDA is not available here"))
    for device, message in devices:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--device", device, "--out-dir", str(tmp_path), *TINY])
        assert e.value.code == 2 and message in capsys.readouterr().err
    run(capsys, "train", "--model", "rnn", "--out-dir", str(tmp_path), "--run-name", "b", *TINY)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path / "b"), "--batches", "0"])
    assert e.value.code == 2 and "batches must be an int >= 1, got 0" in capsys.readouterr().err


def test_a_corrupt_or_missing_data_file_is_a_clear_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "input.txt").write_text("not tiny-shakespeare\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task", "shakespeare", "--task-arg", f"path={tmp_path / 'input.txt'}",
                  "--out-dir", str(tmp_path), *TINY[2:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "matrec train: error:" in err and "input.txt is corrupt" in err
    monkeypatch.delenv("MATREC_MNIST", raising=False)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MATREC_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task", "seq_digits", "--task-arg", "dataset=mnist", "--out-dir",
                  str(tmp_path), *TINY[2:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "MATREC_OFFLINE is set" in err and "set MATREC_MNIST" in err


def test_eval_of_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    run(capsys, "train", "--model", "rnn", "--out-dir", str(tmp_path), "--run-name", "c", *TINY)
    latest = json.loads((tmp_path / "c" / "checkpoints" / "latest.json").read_text())["dir"]
    (tmp_path / "c" / "checkpoints" / latest / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path / "c")])
    assert e.value.code == 2
    assert "is corrupt: state.safetensors" in capsys.readouterr().err


class NaNAtFifth(Task):
    """Copy-like batches whose training loss turns NaN at the fifth step."""

    name = "nan_at_fifth"
    vocab_size, output_size = 3, 3

    def __init__(self):
        self.calls = 0

    def get_batch(self, split, batch_size, generator):
        x = torch.randint(0, 3, (batch_size, 5), generator=generator)
        return x, x

    def loss(self, output, target):
        self.calls += output.requires_grad
        loss = F.cross_entropy(output.reshape(-1, 3).float(), target.reshape(-1))
        return loss * float("nan") if self.calls == 5 else loss


TASKS.register("nan_at_fifth", NaNAtFifth, overwrite=True)


def test_a_nan_stops_the_command_with_status_1_and_names_the_good_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--task", "nan_at_fifth", "--model", "gru", "--out-dir",
                       str(tmp_path), "--run-name", "n", *TINY[2:4], "--steps", "8", *TINY[6:])
    assert code == 1
    assert "training loss is nan at step 5" in err and "last good checkpoint (step 4)" in err
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["status"] == "non-finite"


def test_compare_checks_every_model_name_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--models", "rnn,lstmm", "--out", str(tmp_path / "cmp"), *TINY])
    assert e.value.code == 2 and "model must be one of" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()     # rnn was not trained first


def test_compare_writes_one_table_and_one_plot(tmp_path, capsys):
    code, out, _ = run(capsys, "compare", "--models", "rnn,gru", "--out", str(tmp_path / "cmp"), *TINY)
    assert code == 0
    assert "| rnn |" in out and "| gru |" in out and "recall" in out
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["label"] for r in results] == ["rnn", "gru"]
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "results.md").read_text().startswith("| model |")


def test_sample_streams_text_from_a_text_checkpoint(tmp_path, capsys):
    code, _, _ = run(capsys, "train", "--task", "toy_text", "--model", "lstm", "--out-dir", str(tmp_path),
                     "--run-name", "t", *TINY[2:])
    assert code == 0
    code, out, _ = run(capsys, "sample", str(tmp_path / "t"), "--prompt", "ab", "--tokens", "12", "--seed", "3")
    text = out[:-1]   # the trailing newline
    assert code == 0 and text.startswith("ab") and len(text) == 14 and set(text) <= set("ab\n")
    for flag, value in (("--tokens", "-1"), ("--temperature", "-0.5"), ("--top-k", "0")):
        with pytest.raises(SystemExit) as e:   # a bad option fails before the prompt is printed
            cli.main(["sample", str(tmp_path / "t"), "--prompt", "ab", flag, value])
        out = capsys.readouterr()
        assert e.value.code == 2 and out.out == "" and f"{flag} must be" in out.err, (flag, out.err)


def test_streaming_generation_matches_full_context_recompute():
    from matrec.models import build_model
    from matrec.models.generate import generate_stream
    model = build_model("gru", vocab_size=3, output_size=3, hidden_size=8).eval()
    prompt = torch.tensor([0, 1, 2])
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    streamed = [int(t) for t in generate_stream(model, prompt, 6, generator=torch.Generator().manual_seed(0))]
    hook.remove()
    assert lengths == [3, 1, 1, 1, 1, 1]     # the prompt once, then one token per step with the state

    class Stateless(torch.nn.Module):   # the same model, forced down the re-feed path
        def forward(self, x, state=None):
            return model(x)[0], None

    refed = [int(t) for t in generate_stream(Stateless(), prompt, 6, generator=torch.Generator().manual_seed(0))]
    assert streamed == refed


def test_sample_needs_a_text_task(tmp_path, capsys):
    run(capsys, "train", "--model", "rnn", "--out-dir", str(tmp_path), "--run-name", "s", *TINY)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(tmp_path / "s")])
    assert e.value.code == 2 and "sample needs a text task" in capsys.readouterr().err


def test_bench_runs_scripts_and_errors_clearly(tmp_path, capsys, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "hello.py").write_text("import sys\nQUICK = 'tiny'\nprint('hello bench', sys.argv[1:])\n")
    code = cli.main(["bench", "--dir", str(bench), "--quick"])
    assert code == 0
    code = cli.main(["bench", "--dir", str(bench), "--list"])
    assert code == 0 and "hello" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dir", str(bench), "nope"])
    assert "benchmark must be one of ['hello']" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "benchmarks")
    monkeypatch.setenv("MATREC_BENCHMARKS", str(tmp_path / "missing"))
    import matrec.bench
    monkeypatch.setattr(matrec.bench, "__file__", str(tmp_path / "x" / "a" / "b" / "bench.py"))
    with pytest.raises(SystemExit):
        cli.main(["bench"])
    assert "no benchmarks/ folder found" in capsys.readouterr().err


def test_bench_passes_quick_to_the_scripts(tmp_path, capfd):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "echo.py").write_text("import sys\nQUICK: str = 'echo'\nprint('args', sys.argv[1:])\n")
    # only the declaration counts: the text "--quick" in a comment or a string does not
    (bench / "full_only.py").write_text("# not --quick\nprint('full size ran', '--quick')\n")
    (bench / "nested.py").write_text("def f():\n    QUICK = 'local'\nprint('nested ran')\n")
    assert cli.main(["bench", "--dir", str(bench), "--quick"]) == 0
    out = capfd.readouterr().out
    assert "args ['--quick']" in out
    assert "full_only: skipped" in out and "full size ran" not in out
    assert "nested: skipped" in out and "nested ran" not in out


def test_default_experiment_wiring(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "default_experiment", lambda **kw: calls.append(kw) or 0)
    assert cli.main(["train"]) == 0 and calls == [{}]     # `matrec train`, nothing else: the default
    monkeypatch.undo()
    assert cli.DEFAULT_BASE["task_args"] == {"delay": 300} and cli.DEFAULT_BASE["steps"] == 400
    assert [v["model"] for v in cli.DEFAULT_VARIANTS] == ["mornn", "lstm"]
    assert cli.default_experiment(out_dir=str(tmp_path), steps=2) == 0
    out = capsys.readouterr().out
    assert "| lstm |" in out and "wall time" in out
    (folder,) = tmp_path.iterdir()
    assert (folder / "compare.png").exists() and len(json.loads((folder / "results.json").read_text())) == 2


# ------------------------------------------------------------------------------ user mistakes
# Each one: status 2 (1 for what the system refused), `matrec <command>: error: ...` naming the
# argument, and no traceback (cli.main would raise instead of exiting).


def fails(capsys, argv, status=2):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, err
    assert f"matrec {argv[0]}: error:" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "nan", "grad_clip must be a finite number >= 0, got nan"),
    ("--lr", "inf", "lr must be a finite number > 0, got inf"),
    ("--min-lr-ratio", "nan", "min_lr_ratio must be a finite number in [0, 1], got nan"),
    ("--seed", str(2 ** 70), "seed must be an int in [0, 9223372036854775807]"),
    ("--seed", "-1", "seed must be an int in [0,"),
    ("--run-name", "../elsewhere", "run_name must be a folder name"),
])
def test_nonsense_options_are_refused_naming_the_field(tmp_path, capsys, flag, value, message):
    err = fails(capsys, ["train", "--out-dir", str(tmp_path), *TINY, flag, value])
    assert message in err
    assert not any(tmp_path.iterdir())     # refused before anything was written


@pytest.mark.parametrize("field, value, message", [
    ("amp", "false", "amp must be a bool (true or false), got 'false'"),
    ("task", None, "task must be a non-empty str, got None"),
    ("device", 0, "device must be a str"),
    ("lr", "1e-3", "lr must be a number, got '1e-3'"),
    ("seed", 1.5, "seed must be an int, got 1.5"),
    ("steps", True, "steps must be an int, got True"),
])
def test_config_files_go_through_the_same_checks(tmp_path, capsys, field, value, message):
    (tmp_path / "c.json").write_text(json.dumps({field: value}))
    assert message in fails(capsys, ["train", "--config", str(tmp_path / "c.json"), "--out-dir", str(tmp_path)])
    from matrec.train import TrainConfig
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        TrainConfig(**{field: value})


def test_a_config_that_is_a_folder_or_binary_is_a_clear_error(tmp_path, capsys):
    assert "is a directory, not a JSON file" in fails(capsys, ["train", "--config", str(tmp_path)])
    (tmp_path / "c.bin").write_bytes(bytes(range(256)))
    assert "is not UTF-8 text" in fails(capsys, ["train", "--config", str(tmp_path / "c.bin")])


def test_an_output_folder_under_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = fails(capsys, ["train", "--out-dir", str(tmp_path / "file" / "runs"), *TINY])
    assert "cannot create run directory" in err and "Not a directory" in err


def test_a_damaged_run_is_a_clear_error(tmp_path, capsys):
    run(capsys, "train", "--model", "rnn", "--out-dir", str(tmp_path), "--run-name", "g", *TINY)
    with open(tmp_path / "g" / "metrics.jsonl", "r+") as f:
        lines = f.readlines()
        f.seek(0)
        f.writelines(lines[:1] + ["garbage\n"] + lines[1:])
    err = fails(capsys, ["train", "--resume", str(tmp_path / "g"), "--steps", "6"])
    assert "metrics.jsonl' line 2 is not a metrics record" in err and "'garbage'" in err
    ckpt = tmp_path / "g" / "checkpoints" / "step-00000004" / "state.json"
    meta = json.loads(ckpt.read_text())
    del meta["optimizer"]
    ckpt.write_text(json.dumps(meta))
    for argv in (["eval", str(tmp_path / "g")], ["train", "--resume", str(tmp_path / "g")]):
        assert "state.json lacks field(s) ['optimizer']" in fails(capsys, argv)


def test_sample_refuses_a_nan_temperature_and_a_huge_seed(tmp_path, capsys):
    run(capsys, "train", "--task", "toy_text", "--model", "lstm", "--out-dir", str(tmp_path), "--run-name", "t",
        *TINY[2:])
    assert "--temperature must be a finite number >= 0, got nan" in fails(
        capsys, ["sample", str(tmp_path / "t"), "--temperature", "nan"])
    assert f"--seed must be an int in [0, {2 ** 63 - 1}], got {2 ** 64}" in fails(
        capsys, ["sample", str(tmp_path / "t"), "--seed", str(2 ** 64)])
    assert "--tokens must be an int >= 0, got -1" in fails(capsys, ["sample", str(tmp_path / "t"), "--tokens", "-1"])
    assert "--top-k must be an int >= 1, got 0" in fails(
        capsys, ["sample", str(tmp_path / "t"), "--top-k", "0"])


def test_a_batch_too_large_to_allocate_exits_1_with_advice(tmp_path, capsys):
    err = fails(capsys, ["train", "--out-dir", str(tmp_path), *TINY, "--batch-size", str(10 ** 13)], status=1)
    assert "out of memory" in err and "lower --batch-size" in err


def test_compare_checks_every_model_accepts_the_model_args_before_training(tmp_path, capsys):
    err = fails(capsys, ["compare", "--models", "rnn,mru", "--out", str(tmp_path / "cmp"), *TINY])
    assert "model 'mru' with model_args" in err and "hidden_size" in err
    assert not (tmp_path / "cmp").exists()     # rnn was not trained first
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "results.json").write_text("[]")
    err = fails(capsys, ["compare", "--models", "rnn", "--out", str(tmp_path / "cmp"), *TINY])
    assert "is not an empty folder" in err and (tmp_path / "cmp" / "results.json").read_text() == "[]"


@pytest.mark.parametrize("command", ["train", "compare", "eval", "sample"])
def test_a_core_only_install_names_the_extra_before_any_work(tmp_path, capsys, monkeypatch, command):
    import sys
    monkeypatch.setitem(sys.modules, "safetensors", None)    # what an uninstalled module looks like
    argv = {"train": ["train", "--out-dir", str(tmp_path), *TINY],
            "compare": ["compare", "--models", "rnn", "--out", str(tmp_path / "c"), *TINY],
            "eval": ["eval", str(tmp_path)], "sample": ["sample", str(tmp_path)]}[command]
    err = fails(capsys, argv)
    assert "needs the workbench extra" in err and "missing: safetensors" in err
    assert "pip install 'matrec[workbench]'" in err and not any(tmp_path.iterdir())


def test_bench_dir_must_be_a_folder(tmp_path, capsys):
    assert "--dir" in fails(capsys, ["bench", "--dir", str(tmp_path / "missing"), "--list"])
    (tmp_path / "f.py").write_text("")
    assert "is not a folder" in fails(capsys, ["bench", "--dir", str(tmp_path / "f.py"), "--list"])


def test_text_task_refuses_binary_files_and_checks_the_cache_before_training(tmp_path, capsys, monkeypatch):
    text = ["--task", "text", "--task-arg", "seq_len=8", "--task-arg", "vocab_size=300",
            "--out-dir", str(tmp_path / "runs"), *TINY[2:]]
    (tmp_path / "bin.txt").write_bytes(b"hello\n" * 50 + b"\xff\xfe\x00\x01" * 40)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    err = fails(capsys, ["train", *text, "--task-arg", f"path={tmp_path / 'bin.txt'}"])
    assert "bin.txt is not" in err and "training a" not in err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 100)
    assert "is not UTF-8 text" in fails(capsys, ["train", *text, "--task-arg", f"path={tmp_path / 'latin1.txt'}"])
    (tmp_path / "ok.txt").write_text("a line of text\n" * 200)
    (tmp_path / "blocker").write_text("a file where the cache folder would go")
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "blocker"))
    err = fails(capsys, ["train", *text, "--task-arg", f"path={tmp_path / 'ok.txt'}"])
    assert "the cache folder" in err and "is not usable" in err and "set MATREC_CACHE" in err
    assert "training a" not in err     # found before the tokenizer's training, not after


def test_interrupts_and_system_refusals_are_reported_without_a_traceback(tmp_path, capsys, monkeypatch):
    import matrec.bench  # the bench command lives there (cli.py imports it)
    def interrupted(args):
        raise KeyboardInterrupt

    def disk_full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    for func, status, message in ((interrupted, 130, "interrupted"), (disk_full, 1, "No space left on device")):
        monkeypatch.setattr(matrec.bench, "cmd_bench", func)
        assert message in fails(capsys, ["bench", "--list"], status=status)
    monkeypatch.setattr(matrec.bench, "cmd_bench", lambda args: 1 / 0)   # a bug is not a user mistake: it propagates
    with pytest.raises(ZeroDivisionError):
        cli.main(["bench"])


def test_train_help_takes_every_default_from_train_config(monkeypatch):
    import dataclasses

    from matrec.train import TrainConfig

    assert not [k for k, text in cli.HELP.items() if "(default" in text]   # stated once: in the dataclass
    actions = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        help_text = actions[f.name].help
        if f.default is dataclasses.MISSING or f.default is None:
            assert "(default" not in help_text, f.name
        else:
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            assert f"(default {shown})" in help_text, f.name
    # a changed default shows up in the help without touching the CLI
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    monkeypatch.setattr(fields["steps"], "default", 1234)
    actions = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert "(default 1234)" in actions["steps"].help
