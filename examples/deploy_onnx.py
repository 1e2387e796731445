"""Generate text from an exported matrec model with ONNX Runtime alone: no torch, no matrec.

    matrec export runs/mru --format onnx            # runs/mru/model-sequence.onnx, .onnx.json, tokenizer.json
    python examples/deploy_onnx.py runs/mru/model-sequence.onnx --prompt "ROMEO:" --tokens 200

What a deployment needs is the three files ``matrec export`` writes: the graph, its sidecar
``<graph>.json`` (input/output names, the state tensors with their shapes and starting values) and
the ``tokenizer.json`` the sidecar names. This script imports onnxruntime, numpy and tokenizers
only. It decodes greedily (the most likely next token), carrying the recurrent state from call to
call: a sequence graph reads the prompt in one call, a step graph one token per call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def initial_state(spec: dict) -> np.ndarray:
    """One state tensor's starting value from its sidecar entry ("zeros", "identity", "false")."""
    shape = spec["shape"]
    if spec["init"] == "false":
        return np.zeros(shape, dtype=bool)
    if spec["init"] == "identity":
        return np.broadcast_to(np.eye(shape[-1], dtype=np.float32), shape).copy()
    return np.zeros(shape, dtype=np.float32)


class Generator:
    """The graph at ``path`` with its sidecar and tokenizer: ``generate(prompt, n)`` -> token ids."""

    def __init__(self, path, threads: int = 1) -> None:
        path = Path(path)
        self.meta = json.loads(Path(str(path) + ".json").read_text())
        if "tokenizer" not in self.meta:
            raise SystemExit(f"{path}.json names no tokenizer: export the run again with this matrec "
                             f"(it writes tokenizer.json beside the graph)")
        self.tokenizer = Tokenizer.from_file(str(path.parent / self.meta["tokenizer"]))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]   # x, mask, state.<layer>.<name>...

    def __call__(self, ids: list[int], state: list[np.ndarray]):
        """Logits of the last position ``[V]`` and the new state, for ``ids`` fed in one call."""
        x = np.asarray([ids], dtype=np.int64)                         # [1, T]
        feed = dict(zip(self.names, [x, np.ones(x.shape, dtype=bool), *state]))
        out, *new_state = self.session.run(None, feed)
        return out[0, -1], new_state

    def generate(self, prompt_ids: list[int], n: int) -> list[int]:
        state = [initial_state(s) for s in self.meta["state"]]
        if self.meta["mode"] == "sequence":
            logits, state = self(prompt_ids, state)                   # the whole prompt, one call
        else:
            for t in prompt_ids:                                      # a step graph: one token per call
                logits, state = self([t], state)
        tokens = [int(np.argmax(logits))]
        while len(tokens) < n:
            logits, state = self([tokens[-1]], state)                 # state carried
            tokens.append(int(np.argmax(logits)))
        return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the .onnx graph (its .onnx.json sidecar and tokenizer.json beside it)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, ids, text} as JSON")
    p.add_argument("--check-imports", action="store_true",
                   help="fail if torch or matrec was imported (what the test suite checks)")
    args = p.parse_args(argv)
    gen = Generator(args.model, args.threads)
    prompt_ids = gen.tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise SystemExit(f"the prompt {args.prompt!r} encodes to no tokens")
    ids = gen.generate(prompt_ids, args.tokens)
    text = gen.tokenizer.decode(ids)
    print(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": text}) if args.json else args.prompt + text)
    if args.check_imports:
        loaded = sorted(m for m in ("torch", "matrec") if m in sys.modules)
        if loaded:
            raise SystemExit(f"imported {loaded}: the deployment must not need them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
