"""One experiment cell in its own process: the spec (JSON) on stdin, the result as the last line
of stdout (used by the local backend of ``matrec experiment run --jobs N``)."""
from __future__ import annotations

import json
import sys

from .runner import RESULT_MARK, run_cell


def main() -> int:
    result = run_cell(json.loads(sys.stdin.read()))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
