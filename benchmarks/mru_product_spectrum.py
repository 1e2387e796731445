"""How far do a trained MRU's running products stretch? For each trained run under ``--runs`` (the
ablation's run directories by default), the largest and smallest singular values of every head's
running product ``P_t = M_1 M_2 ... M_t`` over one long validation sequence (``--length``, default
65,536 tokens), per construction.

    python benchmarks/mru_product_spectrum.py [--runs runs/experiments/mru_ablation/cpu/*-seed0] [--length 65536]

Why not the model's own scan: ``P_t`` of a non-orthogonal construction can leave float32's range
(3.4e38) long before T = 65,536, and even float64's (1.8e308); the singular values themselves are
what we want, overflowing or not. So the products are formed in float64 and renormalised every
``--chunk`` steps: ``P_t = exp(s_t) Q_t`` with ``||Q_t||_2 = 1`` and ``s_t`` accumulated, which
gives ``log sigma_max(P_t) = s_t + log sigma_max(Q_t)`` whatever its size. The smallest singular value
is the same computation on the inverses, ``sigma_min(P_t) = 1 / sigma_max(P_t^-1)`` with ``P_t^-1 =
M_t^-1 ... M_1^-1``: renormalising a product by its largest singular value would push the smallest
one below float64's range once the condition number passes about 1e300, the inverse product has
no such limit. A singular ``M_t`` gives ``sigma_min = 0`` from then on (reported as -inf).
Columns: log10 of the extreme singular values over all heads, steps t <= T and seeds, at t = T (with
the smallest head's largest one: a head whose whole product fades), and the largest at t = the run's
training seq_len (what the model saw while it trained);
"float32 overflow" is whether sigma_max ever passed 3.4e38 (the model's scan would hold inf there).
A layer trained with ``normalize=`` (docs/mru.md) is measured on its normalised matrices, the ones
its scan multiplies.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from _harness import Table

import matrec
from matrec.data.tasks import build_task
from matrec.ops.mru_scan import mru_scan
from matrec.ops.state_matrix import STATE_NORMALIZATIONS, state_matrix
from matrec.train.checkpoint import load_checkpoint, load_model_weights
from matrec.train.config import TrainConfig

FLOAT32_MAX_LOG10 = math.log10(torch.finfo(torch.float32).max)


def log_sigma_max_of_products(M: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``log sigma_max(M_1 ... M_t)`` for every ``t``: ``M [..., T, d, d]`` -> ``[..., T]`` (float64).

    The products are formed ``chunk`` steps at a time from a start of norm 1, the log of the norm
    carried outside the matrices, so no size of the product overflows; a chunk only needs its own
    growth (at most ``sigma_max(M)^chunk``) to stay within float64.
    """
    M = M.double()
    *batch, T, d, _ = M.shape
    Q = torch.eye(d, dtype=torch.float64).expand(*batch, d, d).contiguous()   # [..., d, d]
    scale = torch.zeros(batch, dtype=torch.float64)                             # [...]
    out = []
    for lo in range(0, T, chunk):
        P = mru_scan(M[..., lo:lo + chunk, :, :], Q)                            # [..., c, d, d]
        top = torch.linalg.matrix_norm(P, ord=2)                                 # [..., c]
        if not bool(torch.isfinite(top).all()):
            raise FloatingPointError(f"a product grew past float64 within {chunk} steps (steps "
                                     f"{lo}..{lo + chunk}); use a smaller chunk")
        out.append(scale[..., None] + torch.log(top))
        last = top[..., -1]
        Q = P[..., -1, :, :] / last[..., None, None]
        scale = scale + torch.log(last)
    return torch.cat(out, dim=-1)


def log_singular_extremes(M: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sigma_max, log sigma_min)`` of ``P_t = M_1 ... M_t`` for every ``t``, each ``[..., T]``.

    ``sigma_min(P_t) = 1 / sigma_max(P_t^-1)`` and ``(P_t^-1)^T = M_1^-T ... M_t^-T`` is again a
    running product in the same order; from the first singular ``M_t`` on, ``log sigma_min = -inf``.
    """
    M = M.double()
    top = log_sigma_max_of_products(M, chunk)
    singular = torch.linalg.matrix_rank(M) < M.shape[-1]                         # [..., T]
    safe = torch.where(singular[..., None, None], torch.eye(M.shape[-1], dtype=M.dtype), M)
    bottom = -log_sigma_max_of_products(torch.linalg.inv(safe).transpose(-1, -2), chunk)
    bottom = bottom.masked_fill(singular.cummax(dim=-1).values, -math.inf)
    return top, bottom


def state_matrices_of_run(run_dir: Path, length: int) -> dict[str, torch.Tensor]:
    """Every MRU layer's ``M_t [h, T, d, d]`` (float64) for the first ``length`` validation tokens of
    the run's task (rebuilt with ``seq_len=length``), from the run's latest checkpoint."""
    meta, ckpt_dir, _ = load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(meta["config"])
    task = build_task(cfg.task, **{**cfg.task_args, "seq_len": length})
    model = matrec.build_model(cfg.model, **task.model_io(), **cfg.model_args)
    load_model_weights(model, ckpt_dir)
    model.eval()
    x, _ = task.get_batch("val", 1, torch.Generator().manual_seed(0))             # [1, T]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, matrec.MRU)}
    if not layers:
        return {}   # no MRU: nothing to measure (and no full forward over `length` tokens)
    inputs = {}

    class Captured(Exception):
        pass

    def grab(name):
        def hook(module, args):
            inputs[name] = args[0].detach()                                       # [1, T, E]
            if len(inputs) == len(layers):
                raise Captured   # the rest of the model (and its float32 scan) is not needed
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    except Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for name, m in layers.items():
            raw = torch.nn.functional.linear(inputs[name].double(), m.in_proj.weight.double(),
                                             None if m.in_proj.bias is None else m.in_proj.bias.double())
            raw = (raw * m.element_scale).view(1, length, m.num_heads, m.numel).transpose(1, 2)
            M = state_matrix(m.state_matrix, raw, m.order)[0]                     # [h, T, d, d]
            # a layer trained with normalize= multiplies the normalised matrices: measure those
            out[name] = M if m.normalize is None else STATE_NORMALIZATIONS.get(m.normalize)(M)
    return out


def analyse(runs: Path | list[Path], length: int, chunk: int = 64) -> Table:
    """One row per model (construction) over the run directories under ``runs`` (a folder or several)."""
    table = Table({"construction": "construction", "seeds": "seeds", "max_top": "max log10 σ_max",
                   "min_bottom": "min log10 σ_min", "end_top": "log10 σ_max at T",
                   "end_top_least": "least head's log10 σ_max at T",
                   "end_bottom": "log10 σ_min at T", "train_top": "log10 σ_max at the training length",
                   "f32": "float32 overflow"},
                  title=f"running products over T = {length:,} validation tokens",
                  formats={k: "{:.1f}" for k in ("max_top", "min_bottom", "end_top", "end_top_least", "end_bottom",
                                                   "train_top")},
                  stream=True)
    groups: dict[str, list[Path]] = {}
    folders = [runs] if isinstance(runs, (str, Path)) else runs
    for config in sorted(c for folder in folders for c in Path(folder).rglob("config.json")):
        run_dir = config.parent
        if not (run_dir / "checkpoints" / "latest.json").is_file():
            continue
        model_args = json.loads(config.read_text()).get("model_args", {})
        model = json.loads(config.read_text())["model"]
        groups.setdefault(model + (f" {model_args}" if model_args else ""), []).append(run_dir)
    for label, run_dirs in groups.items():
        stats = []
        for run_dir in run_dirs:
            trained = json.loads((run_dir / "config.json").read_text()).get("task_args", {}).get("seq_len", length)
            for M in state_matrices_of_run(run_dir, length).values():
                top, bottom = log_singular_extremes(M, chunk)                    # [h, T]
                stats.append((top.max().item(), bottom.min().item(), top[:, -1].max().item(),
                              bottom[:, -1].min().item(), top[:, min(trained, length) - 1].max().item(),
                              top[:, -1].min().item()))
        if not stats:
            continue   # a model without an MRU layer
        ln10 = math.log(10)
        max_top = max(s[0] for s in stats) / ln10
        table.add(construction=label, seeds=len(run_dirs), max_top=max_top,
                  min_bottom=min(s[1] for s in stats) / ln10, end_top=max(s[2] for s in stats) / ln10,
                  end_top_least=min(s[5] for s in stats) / ln10,
                  end_bottom=min(s[3] for s in stats) / ln10, train_top=max(s[4] for s in stats) / ln10,
                  f32="yes" if max_top > FLOAT32_MAX_LOG10 else "no")
    return table


def main(argv=None) -> Table | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["runs/experiments/mru_ablation/cpu"],
                   help="folders holding trained run directories (searched recursively), or run directories")
    p.add_argument("--length", type=int, default=65536, help="sequence length T")
    p.add_argument("--chunk", type=int, default=64, help="steps between renormalisations")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        print(f"no run directories under {missing}: train them first, e.g. `matrec experiment run "
              f"experiments/mru_ablation.toml --scale cpu`, or pass --runs", file=sys.stderr)
        return None
    torch.set_num_threads(1)
    return analyse(runs, args.length, args.chunk)


if __name__ == "__main__":
    main()
