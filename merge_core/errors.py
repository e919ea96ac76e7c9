"""Exceptions raised by merge_core.

Every message names the file (or key) and the problem, so hosts can show it
as-is and the CLI can print it on one line.
"""


class MergeError(Exception):
    """Base class: a merge could not be done; nothing was written."""


class BadCheckpoint(MergeError):
    """A file is missing, truncated, corrupt or not a checkpoint."""


class UnsafeCheckpoint(BadCheckpoint):
    """A pickled checkpoint wants to run code; it was refused, not executed."""


class ArchitectureMismatch(MergeError):
    """The inputs are of different model architectures."""


class ShapeMismatch(MergeError):
    """A key has shapes that cannot be merged."""


class MissingKeys(MergeError):
    """Keys are missing from some inputs and --strict was given."""


class OutputExists(MergeError):
    """The output exists (or is an input) and overwriting was not allowed."""


class MergeCancelled(MergeError):
    """The progress callback asked to stop."""


class DeviceUnavailable(MergeError):
    """The requested device (e.g. CUDA) is not available."""


class NonFiniteOutput(MergeError):
    """The merged result contains NaN or Inf."""
