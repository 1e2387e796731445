"""Known, harmless messages of third-party libraries, silenced around matrec's own calls.

The export extra's libraries log and warn on every ``matrec export`` / ``export-hf`` / ``import-hf``
about things a matrec user cannot act on (torchao's optional CUDA kernels failing to load on a
machine without them, the enums it registers with torch's pytree, torchvision missing for ONNX ops
matrec never exports). :func:`known_noise` drops exactly those records and warnings, by logger and
message (warnings: by category and message), for the duration of a ``with`` block; every other
message still reaches the user.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

# (logger, a fragment of the message) of each dropped log record
_RECORDS = (
    ("torchao", "Failed to load "),   # its optional compiled kernels (CUDA architectures) on import
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),   # torchao's enums
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
)
# (category, message regex, module regex) of each ignored warning
_WARNINGS = (
    # torch.export's pytree specs, pickled by torch itself while exporting (reported from copyreg)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", ""),
    # torch.onnx naming the dynamic axis T of x and of mask (the same Dim) once
    (UserWarning, r"# The axis name: \w+ will not be used, since it shares the same shape constraints",
     r"torch\.onnx"),
)


class _Drop(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def known_noise():
    """Drop the known third-party messages above while the block runs."""
    filters = [(logging.getLogger(name), _Drop(fragment)) for name, fragment in _RECORDS]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message, module in _WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
