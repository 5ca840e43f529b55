"""User-facing errors: each names the problem in one line.

The CLI prints them as ``error: <message>`` and exits non-zero; anything else
that escapes is an internal error.
"""


class LutcError(Exception):
    """A problem with what the user gave us (model, shapes, data, target)."""


class ModelLoadError(LutcError):
    """The ONNX file is missing, unreadable, truncated or fails the checker."""


class UnsupportedModelError(LutcError):
    """The model uses operators or features the importer cannot handle."""


class ShapeError(LutcError):
    """Dynamic dimensions are unbound, or a binding contradicts the model."""


class FeedError(LutcError):
    """Run-time inputs do not match the model's input names, shapes or dtypes."""


class TargetError(LutcError):
    """The target description is malformed or names an unknown CPU."""


class CalibrationError(LutcError):
    """Calibration data is missing, malformed, or does not match the model's inputs."""
