"""docs/deploy.md's Python example runs as written (it asserts its own result against PyTorch)."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_deploy_example_streams_in_both_runtimes():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("executorch")
    assert len(BLOCKS) == 1
    exec(compile(BLOCKS[0], "docs/deploy.md[python block 0]", "exec"), {})
