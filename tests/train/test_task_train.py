"""A tiny LSTM trains on every task: its evaluation loss falls within a few dozen Adam steps."""
import random
from pathlib import Path

import pytest
import torch

import matrec
from matrec.data.tasks import TASKS, build_task
from support import SHAKESPEARE_FILE


def _text_file(folder: Path) -> str:
    rng = random.Random(0)
    words = ["once", "upon", "a", "time", "there", "was", "little", "girl", "who", "loved", "her", "dog"]
    path = folder / "stories.txt"
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(8)) + ".\n" for _ in range(2000)))
    return str(path)


# name -> (task options, steps, batch size, learning rate); small enough to run in about a second.
SETTINGS = {
    "copy": ({"delay": 5, "n_symbols": 3}, 40, 32, 1e-2),
    "copy_variable": ({"delay": 6, "min_delay": 3, "n_symbols": 3}, 40, 32, 1e-2),
    "adding": ({"length": 16}, 40, 32, 1e-2),
    "selective_copy": ({"length": 8, "n_symbols": 2, "alphabet": 3}, 60, 64, 1e-2),
    "assoc_recall": ({"n_pairs": 2, "n_queries": 1, "n_keys": 3, "n_values": 3}, 60, 64, 1e-2),
    "seq_digits": ({}, 80, 32, 1e-2),
    "perm_digits": ({}, 80, 32, 1e-2),
    "shakespeare": ({"seq_len": 32}, 40, 16, 1e-2),
    "shakespeare_stream": ({"seq_len": 32}, 40, 16, 1e-2),
    "text": ({"vocab_size": 280, "seq_len": 32}, 40, 16, 1e-2),
    "text_stream": ({"vocab_size": 280, "seq_len": 32}, 40, 8, 1e-2),
    "forecast": ({"seq_len": 32, "length": 1 << 14, "lag": 300}, 40, 16, 1e-2),
    "forecast_regime": ({"seq_len": 32, "length": 1 << 14, "val_length": 1 << 11, "query_every": 4.0,
                         "dwell": 16.0, "query": 1.5}, 40, 16, 1e-2),
    "documents": ({"seq_len": 32}, 40, 16, 1e-2),
    "passkey": ({"seq_len": 96, "distance": 0, "length": 1 << 14, "val_length": 1 << 12}, 40, 16, 1e-2),
}


def test_every_registered_task_has_a_training_setting():
    # tasks that matrec itself ships (other test modules register toy tasks of their own)
    shipped = [n for n in TASKS.names() if TASKS.get(n).__module__.startswith("matrec.")]
    assert sorted(SETTINGS) == sorted(shipped)


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_tiny_lstm_loss_falls(name, tmp_path, monkeypatch):
    options, steps, batch_size, lr = SETTINGS[name]
    if name.startswith("shakespeare") or name == "passkey":
        if not SHAKESPEARE_FILE.exists():
            pytest.skip("shared/data/tinyshakespeare.txt not beside the repo")
        options = {**options, "path": str(SHAKESPEARE_FILE)}
    if name.startswith("text"):
        monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
        options = {**options, "path": _text_file(tmp_path)}
    torch.manual_seed(0)
    task = build_task(name, **options)
    model = matrec.build_model("lstm", **task.model_io(), hidden_size=48)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def evaluate() -> float:
        with torch.no_grad():
            if task.stream:
                x, y = task.batch_at("val", 4, 0)
            else:
                x, y = task.get_batch("val", 256, torch.Generator().manual_seed(123))
            return float(task.loss(model(x)[0], y))

    before = evaluate()
    generator, state = torch.Generator().manual_seed(0), None
    for _ in range(steps):
        x, y = task.get_batch("train", batch_size, generator)
        out, state = model(x, state if task.stream else None)
        state = _detach(state)                  # truncated back-propagation across stream chunks
        opt.zero_grad()
        task.loss(out, y).backward()
        opt.step()
    after = evaluate()
    assert after < 0.9 * before, f"{name}: eval loss {before:.4f} -> {after:.4f}"
