"""Does training keep the MRU's state finite? A short AdamW run of the ablation presets on
tiny-shakespeare, printing the loss and the largest carried state |H_T| per construction.

    python benchmarks/mru_stability.py [--path tinyshakespeare.txt] [--steps 30] [--quick]
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, add_quick_argument

import matrec
from matrec.data.tasks import build_task

QUICK = "3 steps, 2 constructions"   # what --quick does (matrec bench --quick reads it)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default=None, help="tiny-shakespeare file (default: download/cache)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--constructions", nargs="+", default=["ldu", "scaled", "cayley_qr", "ldu_ns"])
    add_quick_argument(p, QUICK)
    args = p.parse_args()
    if args.quick:
        args.steps, args.constructions = 3, args.constructions[:2]
    torch.set_num_threads(1)
    task = build_task("shakespeare", seq_len=256, path=args.path)
    table = Table({"preset": "preset", "loss": f"loss step 1 -> {args.steps}", "max_state": "max |H_T|"},
                  formats={"max_state": "{:.3g}"}, stream=True)
    for name in args.constructions:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model = matrec.build_model(f"ablation-mru-{name}", **task.model_io())
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        losses, top = [], 0.0
        for _ in range(args.steps):
            x, y = task.get_batch("train", args.batch, g)
            out, state = model(x)
            loss = task.loss(out, y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            top = max(top, state[0].detach().abs().max().item())
        table.add(preset=f"`ablation-mru-{name}`", loss=f"{losses[0]:.3f} -> {losses[-1]:.3f}", max_state=top)


if __name__ == "__main__":
    main()
