"""Training step time of model presets, for two or more source trees in one run (before/after a change).

    git archive <commit> src | tar -x -C /tmp/before        # the tree to compare against
    PYTHONPATH=src python benchmarks/train_step.py --tree before=/tmp/before/src --tree after=src

One step is what the Trainer does per batch on CPU: forward, cross-entropy, backward, gradient clipping,
AdamW step, on random tokens (vocabulary 65, batch 8, T 256; the MORNN hidden 256). Each (tree, model) runs
in its own process with one thread, timed by the CPU time of that process (``time.process_time``: on a
shared machine other processes then add cache and memory contention, not waiting); the trees alternate
round by round (``--rounds``), so both see the same load, and the table keeps each one's median step over
all its rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODELS = {
    "ablation-mru-ldu": {}, "ablation-attn": {}, "ablation-linear_attn": {}, "shakespeare-mru": {},
    "mornn": {"hidden_size": 256},
}

STEP = r"""
import json, sys, time, torch
from matrec.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
name, args, steps, batch, T = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = build_model(name, vocab_size=65, output_size=65, **args).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, 65, (batch, T + 1))
times = []
for i in range(steps + 3):
    t = time.process_time()
    out, _ = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, 65), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if i >= 3:
        times.append(time.process_time() - t)
print(json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="label=path of a src/ folder")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    models = args.models.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for model in models:
            for label, path in trees.items():
                env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
                out = subprocess.run([sys.executable, "-c", STEP, model, json.dumps(MODELS.get(model, {})),
                                      str(args.steps), str(args.batch), str(args.seq)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                times.setdefault((model, label), []).extend(json.loads(out.strip().splitlines()[-1]))
    labels = list(trees)
    print(f"| model | {' | '.join(f'{label} (ms/step)' for label in labels)} | {labels[-1]} / {labels[0]} |")
    print("|---|" + "---|" * (len(labels) + 1))
    for model in models:
        ms = [1000 * statistics.median(times[model, label]) for label in labels]
        print(f"| `{model}` | {' | '.join(f'{m:.1f}' for m in ms)} | {ms[-1] / ms[0]:.3f} |")


if __name__ == "__main__":
    main()
