"""``matrec bench``: run the repository's benchmark scripts (benchmarks/*.py), each printing its table."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path


def find_benchmarks(path: str | None = None) -> Path:
    """The benchmarks/ folder: ``--dir``, ``$MATREC_BENCHMARKS``, ./benchmarks, or the source
    checkout this package was installed from (editable installs)."""
    if path is not None:   # asked for by name: never fall back to another folder
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--dir {path!r} is not a folder (missing, or a file)")
        return Path(path)
    candidates = [os.environ.get("MATREC_BENCHMARKS"), Path.cwd() / "benchmarks",
                  Path(__file__).resolve().parents[2] / "benchmarks"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise FileNotFoundError(
        "no benchmarks/ folder found (looked at --dir, $MATREC_BENCHMARKS, ./benchmarks and "
        f"{Path(__file__).resolve().parents[2] / 'benchmarks'}); the benchmark scripts ship with the "
        "source checkout: run `matrec bench` from the repository root or pass --dir")


def declares_quick(script: Path) -> bool:
    """Whether a benchmark script has a ``--quick`` mode: it assigns a module-level ``QUICK`` (what
    the mode does; benchmarks/_harness.py's ``add_quick_argument`` adds the flag). Read from the
    syntax tree, so the script is not run."""
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    targets = [t for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    return any(isinstance(t, ast.Name) and t.id == "QUICK" for t in targets)


def cmd_bench(args) -> int:
    folder = find_benchmarks(args.dir)
    scripts = {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}
    if args.list:
        print("\n".join(scripts) or f"(no scripts in {folder})")
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise ValueError(f"benchmark must be one of {sorted(scripts)}, got {unknown}")
    if not scripts:
        raise FileNotFoundError(f"no benchmark scripts (*.py) in {folder}")
    env = {**os.environ}
    src = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    failed, skipped = [], []
    for name in args.names or list(scripts):
        if args.quick and not declares_quick(scripts[name]):
            skipped.append(name)   # a full-size run is not what --quick asked for
            print(f"== {name}: skipped (the script declares no QUICK mode)", flush=True)
            continue
        cmd = [sys.executable, str(scripts[name])] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {failed}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/",
                       description="Run the repository's benchmark scripts (benchmarks/*.py); each "
                       "prints its own table.")
    p.add_argument("names", nargs="*", help="scripts to run (default all; see --list)")
    p.add_argument("--quick", action="store_true", help="pass --quick to each script (small sizes); "
                   "scripts that declare no QUICK mode are skipped")
    p.add_argument("--list", action="store_true", help="list the scripts and exit")
    p.add_argument("--dir", default=None, help="benchmarks folder (default: found automatically)")
    p.set_defaults(func=cmd_bench)
