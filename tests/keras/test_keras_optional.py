"""matrec.keras is optional: the core package never imports keras or TensorFlow."""
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_import_matrec_never_imports_keras():
    code = ("import sys, matrec\n"
            "matrec.MORNN, matrec.MRU, matrec.build_model, matrec.SequenceModel\n"
            "import matrec.nn, matrec.models, matrec.ops\n"
            "bad = [m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
