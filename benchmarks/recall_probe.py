"""How quickly does each mixer learn to recall the token k steps back? A capability probe, not a task.

Random tokens (vocabulary 8) in rows of 64, the target at step t is the input at t - k; every model
is a 2-layer causal model from the registry at a similar size, trained from the same seed with
AdamW for ``--steps`` steps (batch 32, one fixed rate, gradient clip 1); the table gives the
accuracy of the last 8 batches (chance 1/8). The MRU variants differ only in the options that
decide how a token changes the running product: the construction, the input scale (element_scale,
1/E by default) and normalize.

``--prefix N``: before every row the model reads N more random tokens (no loss, no gradient) and
starts the row from the state they leave, as a model reading a long stream does with its carried
state. A model that forgets what it no longer needs is unaffected; one whose state keeps a trace of
everything it has read has to find the recent tokens under the old ones.

    PYTHONPATH=src python benchmarks/recall_probe.py --lags 3 20 --steps 400
    PYTHONPATH=src python benchmarks/recall_probe.py --lags 3 --steps 400 --prefix 512 --models mru gru
    PYTHONPATH=src python benchmarks/recall_probe.py --quick
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _harness import Table, add_json_argument, add_quick_argument, write_json

from matrec.models import build_model

QUICK = "two models, lag 2, 20 steps"
WIDTH = 54   # 6 heads of order 3 for the MRU, as in experiments/passkey_retrieval.toml
# label -> (registered model, its options)
MODELS = {
    "mru": ("mru", {"d_model": WIDTH, "n_heads": 6}),
    "mru element_scale 1/sqrt(E)": ("mru", {"d_model": WIDTH, "n_heads": 6, "element_scale": WIDTH ** -0.5}),
    "mru cayley": ("mru", {"d_model": WIDTH, "n_heads": 6, "state_matrix": "cayley"}),
    "mru cayley, 1/sqrt(E)": ("mru", {"d_model": WIDTH, "n_heads": 6, "state_matrix": "cayley",
                                      "element_scale": WIDTH ** -0.5}),
    "mru identity": ("mru", {"d_model": WIDTH, "n_heads": 6, "state_matrix": "identity"}),
    "mru spectral": ("mru", {"d_model": WIDTH, "n_heads": 6, "normalize": "spectral"}),
    "mru direction": ("mru", {"d_model": WIDTH, "n_heads": 6, "normalize": "direction"}),
    "attn": ("attn", {"d_model": 48, "n_heads": 4}),
    "gru": ("gru", {"hidden_size": 64}),
}
VOCAB, ROWS, LENGTH = 8, 32, 64


def probe(label: str, lag: int, steps: int, lr: float, seed: int = 0, prefix: int = 0) -> dict:
    name, options = MODELS[label]
    torch.manual_seed(seed)
    model = build_model(name, vocab_size=VOCAB, output_size=VOCAB, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed + 1)
    hits, start = [], time.perf_counter()
    for step in range(steps):
        x = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=data)               # [B, T]
        state = None
        if prefix:
            with torch.no_grad():
                _, state = model(torch.randint(0, VOCAB, (ROWS, prefix), generator=data))
        out, _ = model(x, state)                                                   # [B, T, V]
        logits, target = out[:, lag:].reshape(-1, VOCAB), x[:, :-lag].reshape(-1)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - 8:
            hits.append((logits.argmax(-1) == target).float().mean().item())
    params = sum(p.numel() for p in model.parameters())
    return {"model": label, "lag": lag, "prefix": prefix, "params": params, "accuracy": sum(hits) / len(hits),
            "loss": loss.item(), "seconds": time.perf_counter() - start}


def main(argv=None) -> Table:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lags", type=int, nargs="+", default=[3, 20])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prefix", type=int, default=0, help="random tokens read (state carried) before every row")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    add_quick_argument(p, QUICK)
    add_json_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.lags, args.steps, args.models = [2], 20, ["mru", "gru"]
    if min(args.lags) < 1 or max(args.lags) >= LENGTH:
        p.error(f"--lags must lie in [1, {LENGTH - 1}], got {args.lags}")
    if args.prefix < 0:
        p.error(f"--prefix must be >= 0, got {args.prefix}")
    torch.set_num_threads(1)
    table = Table({"model": "model", "params": "parameters", "lag": "lag k", "prefix": "prefix",
                   "accuracy": "accuracy (chance 0.125)",
                   "loss": "last loss", "seconds": "seconds"},
                  title=f"recall of the token k steps back after {args.steps} steps (lr {args.lr:g})",
                  formats={"accuracy": "{:.3f}", "loss": "{:.3f}", "seconds": "{:.0f}"}, stream=True)
    for lag in args.lags:
        for label in args.models:
            table.add(**probe(label, lag, args.steps, args.lr, prefix=args.prefix))
    write_json(args.json, [table], steps=args.steps, lr=args.lr)
    return table


if __name__ == "__main__":
    main()
