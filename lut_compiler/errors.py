"""User-facing errors: each names the problem in one line.

The CLI prints them as ``error: <message>`` and exits with the code of their family:
EXIT_USAGE for the command line, EXIT_INPUT for what it points at (model, data, target,
an output location that cannot be written); anything else that escapes is our bug
(EXIT_INTERNAL).
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2  # argparse exits with 2 as well
EXIT_INPUT = 3


class LutcError(Exception):
    """A problem with what the user gave us (model, shapes, data, target)."""


class UsageError(LutcError):
    """Options that contradict each other or miss a companion (the command line itself)."""


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


class OutputError(LutcError):
    """The output location cannot be written (read-only, full, not a directory)."""


class CalibrationError(LutcError):
    """Calibration data is missing, malformed, or does not match the model's inputs."""
