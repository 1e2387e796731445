"""examples/deploy_onnx.py, the deployment without torch or matrec: it reads the graph, its sidecar
and the tokenizer.json export writes beside it, and its greedy text equals PyTorch's.

Run in a subprocess that must not import torch or matrec (``--check-imports``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the export extra")
pytest.importorskip("onnxscript", reason="the export extra")
pytest.importorskip("tokenizers", reason="the workbench extra")

from matrec.data.tasks.lm import char_tokenizer  # noqa: E402
from matrec.export import export, exportable  # noqa: E402
from matrec.models import build_model, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHARS = list("\nabcdefghij RMEO:")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return build_model("sequence", pattern=["mornn", "mru"], vocab_size=len(CHARS), output_size=len(CHARS),
                       d_model=16).eval()


@pytest.mark.parametrize("mode", ["sequence", "step"])
def test_example_generates_what_pytorch_generates(lm, mode, tmp_path):
    tokenizer = char_tokenizer(CHARS)
    path = tmp_path / f"model-{mode}.onnx"
    meta = export(exportable(lm, mode), path, "onnx", max_length=128, tokenizer_json=tokenizer.to_str())
    assert meta["tokenizer"] == "tokenizer.json" and (tmp_path / "tokenizer.json").is_file()
    assert meta["x"]["shape"] == ([1, "T"] if mode == "sequence" else [1, 1])
    prompt = "ROMEO:\nabc"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # not even matrec's src on the path
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy_onnx.py"), str(path), "--prompt", prompt,
                        "--tokens", "30", "--json", "--check-imports"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    got = json.loads(r.stdout)
    ids = [CHARS.index(c) for c in prompt]
    assert got["prompt_ids"] == ids
    expected = generate(lm, torch.tensor([ids]), 30, temperature=0)[0, len(ids):].tolist()
    assert got["ids"] == expected
    assert got["text"] == "".join(CHARS[i] for i in expected)


def test_tokenizer_file_is_shared_and_never_replaced(lm, tmp_path):
    a, b = char_tokenizer(CHARS).to_str(), char_tokenizer(CHARS[::-1]).to_str()
    export(exportable(lm, "step"), tmp_path / "one.onnx", "onnx", tokenizer_json=a)
    export(exportable(lm, "step"), tmp_path / "two.onnx", "onnx", tokenizer_json=a)   # the same vocabulary
    with pytest.raises(FileExistsError, match="tokenizer.json' exists and holds another vocabulary"):
        export(exportable(lm, "step"), tmp_path / "three.onnx", "onnx", tokenizer_json=b)
    assert not (tmp_path / "three.onnx").exists()
    assert (tmp_path / "tokenizer.json").read_text() == a
