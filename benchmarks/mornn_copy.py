"""Copy task (docs/tasks.md): MORNN with the documented recipe against an LSTM of equal size.

    PYTHONPATH=src python benchmarks/mornn_copy.py --delay 100 --steps 600 --threads 1

Both models: embedding -> RNN -> linear head (``matrec.models.recurrent.RecurrentModel``), RMSprop
through ``mornn_param_groups`` (orthogonal parameters at lr / 10; the LSTM has none, so it is plain
RMSprop), gradient clipping at 1. Prints validation loss and recall every ``--every`` steps, and the
memoryless baseline loss.
"""
from __future__ import annotations

import argparse
import time

import torch
from _harness import Table, add_json_argument, write_json
from torch import nn

from matrec.data.tasks import build_task
from matrec.models.recurrent import RecurrentModel
from matrec.nn.mornn import MORNN, mornn_param_groups


def lstm_hidden_for(n_params: int, embed: int, vocab: int, out: int) -> int:
    """LSTM hidden size whose model (embedding, LSTM with both biases, linear head) has the parameter
    count closest to ``n_params``."""

    def count(H: int) -> int:
        return vocab * embed + 4 * H * (embed + H + 2) + H * out + out

    H = 1
    while count(H + 1) <= n_params:
        H += 1
    return min(H, H + 1, key=lambda h: abs(count(h) - n_params))


def train(model, task, steps, lr, batch, every, seed, report, *, budget_s=None, target_recall=None) -> dict:
    """The recipe's loop: RMSprop through ``mornn_param_groups``, clipping at 1, an evaluation on one
    fixed held-out batch every ``every`` steps, each passed to ``report(step=, seconds=, loss=, recall=)``.

    Stops after ``steps``, or at the first step past ``budget_s`` seconds, or at the first
    evaluation with recall >= ``target_recall``. Returns the last evaluation.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device  # batches are drawn on the CPU, then moved
    opt = torch.optim.RMSprop(mornn_param_groups(model, lr))
    # the same held-out batch at every evaluation, from its own generator: drawing it from `gen`
    # would make the training data depend on how often we evaluate
    xv, yv = (t.to(device) for t in task.get_batch("val", 256, torch.Generator().manual_seed(seed + 1)))
    t0, last = time.perf_counter(), {}
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in task.get_batch("train", batch, gen))
        loss = task.loss(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out_of_time = budget_s is not None and time.perf_counter() - t0 >= budget_s
        if step % every == 0 or step == steps or out_of_time:
            with torch.no_grad():
                m = task.metrics(model(xv)[0], yv)
            last = dict(step=step, seconds=time.perf_counter() - t0, loss=m["loss"], recall=m["recall"])
            report(**last)
            if out_of_time or (target_recall is not None and m["recall"] >= target_recall):
                break
    return last


def main(argv=None) -> tuple[Table, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=int, default=100)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--embed", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="mornn,lstm", help="comma-separated subset of mornn,lstm")
    p.add_argument("--nonlinearity", default="modrelu", help="MORNN's (the recipe: modrelu)")
    add_json_argument(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    task = build_task("copy", delay=a.delay)
    torch.manual_seed(a.seed)
    mornn = RecurrentModel(MORNN(a.embed, a.hidden, batch_first=True, nonlinearity=a.nonlinearity),
                           hidden_size=a.hidden, output_size=task.output_size,
                           vocab_size=task.vocab_size, embed_dim=a.embed)
    n = sum(p.numel() for p in mornn.parameters())
    H = lstm_hidden_for(n, a.embed, task.vocab_size, task.output_size)
    torch.manual_seed(a.seed)
    lstm = RecurrentModel(nn.LSTM(a.embed, H, batch_first=True), hidden_size=H,
                          output_size=task.output_size, vocab_size=task.vocab_size, embed_dim=a.embed)
    meta = {"delay": a.delay, "length": task.length, "baseline": task.baseline, "mornn_hidden": a.hidden,
            "mornn_params": n, "lstm_hidden": H, "lstm_params": sum(p.numel() for p in lstm.parameters())}
    print(f"copy delay {a.delay} (length {task.length}), baseline loss {task.baseline:.4f}, "
          f"MORNN H={a.hidden} ({n} params) vs LSTM H={H} "
          f"({meta['lstm_params']} params), batch {a.batch}, RMSprop lr {a.lr}\n")
    table = Table({"model": "model", "step": "step", "seconds": "seconds", "loss": "val loss", "recall": "recall"},
                  formats={"seconds": "{:.1f}", "loss": "{:.4f}", "recall": "{:.3f}"}, stream=True)
    models = a.models.split(",")
    if "mornn" in models:
        name = f"MORNN {a.nonlinearity}"
        train(mornn.to(a.device), task, a.steps, a.lr, a.batch, a.every, a.seed,
              lambda **row: table.add(model=name, **row))
    if "lstm" in models:
        train(lstm.to(a.device), task, a.steps, a.lr, a.batch, a.every, a.seed,
              lambda **row: table.add(model="LSTM", **row))
    write_json(a.json, [table], **meta)
    return table, meta


if __name__ == "__main__":
    main()
