"""`matrec experiment run | report`: the subcommand group (registered by matrec.cli)."""
from __future__ import annotations

from pathlib import Path

from ..checks import check_int

DEFAULT_OUT = "runs/experiments"


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run a grid of runs from an experiment file, and report it",
                       description="Experiments as files: `run` trains every cell of a TOML/JSON "
                       "experiment file (each an ordinary run directory, resumable), `report` turns "
                       "run directories into tables, a JSON and plots. See docs/experiments.md.")
    esub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = esub.add_parser("run", help="run (or resume) every cell of an experiment file",
                        description="Run every cell of FILE at --scale into <out>/<name>/<scale>/<run>/; "
                        "finished and failed runs are skipped, interrupted ones resumed.")
    r.add_argument("file", help="experiment file (.toml or .json)")
    r.add_argument("--scale", default="cpu", help="which of the file's scales: cpu (default), gpu or gpu-full")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"experiments folder (default {DEFAULT_OUT})")
    r.add_argument("--dry-run", action="store_true", help="list the runs and their state "
                   "(new / partial / done / failed) and the model sizes; train nothing")
    r.add_argument("--jobs", default="1", help="runs at once, each in its own process (default 1: "
                   "one after the other in this process); a CPU run without a threads setting gets "
                   "cores // jobs threads, and with several GPUs each job its own")
    r.add_argument("--only", metavar="SELECTION", action="append", default=None,
                   help="run only some runs: model labels (e.g. mornn,lstm) or shell patterns of run "
                   "names (e.g. 'mornn-*-seed0'), comma-separated or repeated; the decisive cells first, "
                   "the others stay as they are and a later run without --only does them")
    r.add_argument("--ray", metavar="ADDRESS", default=None, help="submit each run as a task to the "
                   "Ray cluster at ADDRESS (needs the ray extra; --out on a shared file system)")
    r.set_defaults(func=cmd_run)
    r = esub.add_parser("report", help="tables, JSON and plots from run directories",
                        description="Read every run directory under DIR (experiment runs, or plain "
                        "`matrec train` runs) and write report.md, report.json and PNG plots.")
    r.add_argument("dir", help="folder holding run directories (searched recursively)")
    r.add_argument("--out", default=None, help="where to write the report (default DIR)")
    r.add_argument("--include", metavar="REPORT_JSON", action="append", default=[],
                   help="an earlier report.json whose runs count too (final numbers, no training curves), "
                   "for runs whose directories are gone; a run directory replaces its entry; repeatable")
    r.add_argument("--pair", metavar="A:B", action="append", default=[],
                   help="also table A's final metric minus B's, seed by seed (cell names as the paired table "
                   "prints them, e.g. 'mru-identity:mru-scaled'); repeatable")
    r.set_defaults(func=cmd_report)


def main(args) -> int:
    return args.func(args)


def cmd_run(args) -> int:
    import torch

    from .runner import InlineBackend, LocalBackend, RayBackend, run_experiment, specs_of
    from .spec import LARGE_GRID, OPTIONAL_SCALES, SCALES, check, load_experiment
    from .state import check_settings

    jobs = args.jobs
    try:
        jobs = check_int("--jobs", int(jobs), 1)
    except ValueError:
        raise ValueError(f"--jobs must be an int >= 1, got {args.jobs!r}") from None
    if args.scale not in SCALES + OPTIONAL_SCALES:
        raise ValueError(f"--scale must be one of {list(SCALES + OPTIONAL_SCALES)}, got {args.scale!r}")
    exp = load_experiment(args.file, args.scale, args.out)
    if args.only:
        wanted = [w.strip() for arg in args.only for w in arg.split(",") if w.strip()]
        known = list(dict.fromkeys(c.label for c in exp.cells))
        chosen = exp.cells_matching(wanted)
        if not chosen:
            raise ValueError(f"--only must name model labels of {exp.path!r} ({known}) or patterns of its "
                             f"run names, got {args.only!r}")
        exp.cells = chosen
    if len(exp.cells) > LARGE_GRID:
        print(f"warning: {len(exp.cells):,} runs (more than {LARGE_GRID:,}): each is its own run "
              f"directory and process start; check that this grid is the one you meant")
    check(exp)
    # a Ray task asks for its threads as CPUs: one each unless the file says otherwise, not this
    # machine's cores (which would make the cluster run one task per node)
    threads = 1 if args.ray else None
    specs = specs_of(exp, jobs, threads)
    print(f"experiment {exp.name} ({exp.scale} scale): {len(specs)} runs in {Path(args.out) / exp.name / exp.scale}")
    for label, count in exp.parameters.items():
        size = next((c.size for c in exp.cells if c.label == label and c.size), "")
        print(f"  {label}: {count:,} parameters" + (f" ({size})" if size else ""))
    if exp.matching:
        print(f"  matched: {exp.matching}")
    if args.dry_run:
        check_settings(specs, f"experiment file {exp.path!r}")
        _print_dry_run(specs, exp)
        return 0
    if args.ray:
        backend = RayBackend(args.ray)
    elif jobs > 1:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = LocalBackend(jobs, gpus)
    else:
        backend = InlineBackend()
    results = run_experiment(exp, backend, jobs, threads=threads)
    count = {state: sum(r["state"] == state and not r.get("by_other") for r in results)
             for state in ("done", "failed", "blocked", "damaged")}
    by_other = [r for r in results if r.get("by_other")]
    retried = [r for r in results if "retried" in r]
    print(f"{count['done']} runs done, {count['failed']} failed, {count['blocked']} left alone (see above), "
          f"{len(specs) - len(results)} skipped" + (f", {count['damaged']} damaged (see above)"
                                                    if count["damaged"] else "")
          + (f", {len(by_other)} finished by another process" if by_other else "")
          + f"; report: matrec experiment report {Path(args.out) / exp.name}")
    if retried:
        print(f"retried {len(retried)} run(s) that had failed for a reason of the machine (no CUDA, disk "
              f"full; the earlier record is in each run's failures.jsonl): "
              + ", ".join(f"{Path(r['run_dir']).name} -> {r['state']}" for r in retried))
    bad = count["failed"] + count["blocked"] + count["damaged"] + sum(r["state"] != "done" for r in by_other)
    return 1 if bad else 0


def _print_dry_run(specs: list[dict], exp) -> None:
    """Each run's state and estimated time, and the total at --jobs 1 (``matrec.experiment.estimate``)."""
    from .estimate import estimate
    from .state import inspect

    est = estimate(specs, exp.eval_at)
    for s in specs:
        state, detail = inspect(s["run_dir"])
        t = est["runs"].get(s["run_dir"])
        print(f"{state:<8} {s['run_dir']}" + ("" if t is None else f"  (est. {t:,.0f} s)")
              + (f"  ({detail})" if detail else ""))
    if est["table"] is None:
        print("estimated time: no measured step times for this device")
    else:
        print(f"estimated time at --jobs 1: {est['total']:,.0f} s ({est['total'] / 60:.1f} min) for the "
              f"step budgets (capped by any seconds budget), from the step times measured on "
              f"{est['machine']} ({est['table']})"
              + (f"; no figure for {len(est['budgeted'])} run(s), counted at their seconds budget "
                 "+ start-up, their evaluations not" if est.get("budgeted") else "")
              + (f"; no figure for {len(est['missing'])} run(s), not counted" if est["missing"] else ""))


def cmd_report(args) -> int:
    from .report import write_report

    import sys
    from .paired import parse_pair
    try:
        pairs = [parse_pair(p) for p in args.pair]
        result = write_report(args.dir, args.out, warn=lambda line: print(line, file=sys.stderr),
                              include=args.include, pairs=pairs)
    except ValueError as e:
        print(f"matrec experiment report: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(result["files"]))
    return 0
