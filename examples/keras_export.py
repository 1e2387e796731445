"""Deploying a Keras MORNN: SavedModel export, then the TFLite (LiteRT) converter.

    PYTHONPATH=src python examples/keras_export.py --out /tmp/mornn_export

Trains a small Embedding -> MORNN (modReLU) -> Dense model on matrec's copy task (delay 20) with
``model.fit``, exports it with ``model.export`` (SavedModel), reloads it and compares outputs, then
tries ``tf.lite.TFLiteConverter`` on the SavedModel and, if it converts, runs the flatbuffer in the
TFLite interpreter and compares again. Prints one line per stage.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keras_copy import build_model, evaluate, train  # noqa: E402

from matrec.data.tasks import build_task  # noqa: E402

import tensorflow as tf  # noqa: E402  (after keras_copy, which imports matrec.keras first)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/keras_export")
    p.add_argument("--delay", type=int, default=20)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    task = build_task("copy", delay=a.delay)
    model = build_model("mornn", 64, task, lr=3e-3)
    train(model, task, a.steps, every=a.steps, log=lambda s: None)
    print(f"trained: recall {evaluate(model, task)['recall']:.3f} at delay {a.delay}")
    x, _ = task.get_batch("val", 8, torch.Generator().manual_seed(3))
    x = x.numpy().astype("int32")
    want = np.asarray(model(x))

    saved = os.path.join(a.out, "saved_model")
    model.export(saved, verbose=False)
    reloaded = tf.saved_model.load(saved)  # kept referenced: its variables die with it
    got = reloaded.serve(tf.constant(x)).numpy()
    print(f"SavedModel: reloaded, max |diff| {np.abs(got - want).max():.2e}")

    # 1. the SavedModel as exported (dynamic batch), TFLite builtin ops only
    convert_and_run("TFLite builtins, dynamic batch", lambda: tf.lite.TFLiteConverter.from_saved_model(saved),
                    x, want, os.path.join(a.out, "dynamic.tflite"))
    # 2. the same weights in a model with a fixed batch size: every shape in the loop is static
    fixed = build_model("mornn", 64, task, batch_size=len(x))
    fixed.set_weights(model.get_weights())
    convert_and_run("TFLite builtins, fixed batch", lambda: tf.lite.TFLiteConverter.from_keras_model(fixed),
                    x, want, os.path.join(a.out, "fixed.tflite"))

    # 3. dynamic batch with TensorFlow ops allowed where TFLite has no builtin (Flex delegate)
    def with_select_ops():
        c = tf.lite.TFLiteConverter.from_saved_model(saved)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        c._experimental_lower_tensor_list_ops = False
        return c

    convert_and_run("TFLite builtins + select TF ops, dynamic batch", with_select_ops, x, want,
                    os.path.join(a.out, "select.tflite"))


def convert_and_run(label, make_converter, x, want, path) -> bool:
    """Convert, run in the TFLite interpreter on ``x``, print the max difference from ``want``."""
    try:
        flat = make_converter().convert()
    except Exception as e:  # the converter's failures are many and version-dependent: report them
        msg = " ".join(str(e).split())
        print(f"{label}: conversion failed: {type(e).__name__}: {msg[:400]}")
        return False
    Path(path).write_bytes(flat)
    try:
        interp = tf.lite.Interpreter(model_content=flat)
        inp = interp.get_input_details()[0]
        interp.resize_tensor_input(inp["index"], x.shape)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interp.invoke()
        out = interp.get_tensor(interp.get_output_details()[0]["index"])
    except Exception as e:
        print(f"{label}: converted ({len(flat)} bytes) but failed to run: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]}")
        return False
    print(f"{label}: converted ({len(flat)} bytes), ran in the interpreter, max |diff| "
          f"{np.abs(out - want).max():.2e}")
    return True


if __name__ == "__main__":
    main()
