"""onnxcompress: make trained ONNX models smaller while keeping their decisions.

    from onnxcompress import compress, Config
    report = compress("model.onnx", config=Config(keep=0.75), calib="calib.npz")
"""
from .api import compress, default_output
from .core.config import Config
from .core.errors import (AgreementError, ClusterError, DataError, ModelError, OnnxCompressError, OutputError,
                          RewriteError, UsageError)
from .core.plan import Plan

__version__ = "0.1.0"

__all__ = ["compress", "default_output", "Config", "Plan", "OnnxCompressError", "UsageError",
           "ModelError", "DataError", "OutputError", "RewriteError", "ClusterError", "AgreementError",
           "__version__"]
