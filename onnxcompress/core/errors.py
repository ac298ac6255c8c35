"""The error hierarchy. Every error the tool raises on purpose is an `OnnxCompressError`.

Each class carries the process exit code the command line maps it to, so the CLI needs no table
of its own. Messages are one line and name the stage and the file, node or input at fault.
"""
from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class. `exit_code` is what the command line exits with."""

    exit_code = 1


class UsageError(OnnxCompressError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class ModelError(OnnxCompressError):
    """The input model cannot be read, is not valid ONNX, or cannot be run."""


class DataError(OnnxCompressError):
    """Calibration or validation data that does not fit the model."""


class OutputError(OnnxCompressError):
    """The output cannot be written where asked."""


class RewriteError(OnnxCompressError):
    """The rewritten model failed a check (a bug in a handler; the output is not written)."""


class ClusterError(OnnxCompressError):
    """The Ray cluster (`--ray`) could not be started or reached, or a worker failed for a
    reason of its own (a failure of the data or the model is raised as itself)."""


class AgreementError(OnnxCompressError):
    """The compressed model does not meet `--min-agreement`. Carries the full report."""

    exit_code = 3

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
