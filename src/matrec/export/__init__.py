"""Edge inference: matrec models exported to ONNX Runtime and ExecuTorch (docs/deploy.md).

:func:`exportable` gives a model's export form (plain-tensor state in and out, a dynamic length,
a padding mask); :func:`export` writes it as ``.onnx`` or ``.pte``; :func:`load` runs it. The
runtimes need the ``export`` extra; this package imports without it.
"""
from .forms import MODES, ExportForm, UnsupportedModelError, export_state, exportable, initial_tensor
from .runtimes import (FORMATS, ExecuTorchRunner, OnnxRunner, Runner, check_format, delegation,
                       export, export_executorch, export_onnx, load, lower_executorch, lower_program)

__all__ = ["MODES", "FORMATS", "ExportForm", "UnsupportedModelError", "exportable", "export_state", "initial_tensor",
           "export", "export_onnx", "export_executorch", "lower_executorch", "lower_program", "delegation", "load",
           "Runner", "OnnxRunner", "ExecuTorchRunner", "check_format"]
