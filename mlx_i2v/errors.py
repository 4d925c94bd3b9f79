"""User-facing errors.

Every error a user can cause (bad input, missing or broken weights, an unreachable Hub) is raised as a
subclass of :class:`MlxI2VError` with a message that fits on one line; the CLI prints that line and exits
non-zero instead of showing a traceback. Anything else escaping the library is a bug.
"""


class MlxI2VError(Exception):
    """Base class for errors caused by the user's input or environment."""


class InvalidInputError(MlxI2VError, ValueError):
    """An argument is out of range or an input file cannot be used."""


class ModelNotFoundError(MlxI2VError, FileNotFoundError):
    """The model directory or Hub repository cannot be found (or fetched)."""


class WeightLoadError(MlxI2VError):
    """A checkpoint is missing tensors, has unexpected or mis-shaped ones, or cannot be read."""


class UnsafeCheckpointError(WeightLoadError):
    """A pickle checkpoint asks for something other than tensors."""


class GenerationCancelled(MlxI2VError):
    """Raised internally when an ``on_step`` callback returns False."""


class ParallelError(MlxI2VError):
    """A distributed generation cannot go on: a rank left or stopped answering, or the ranks were started
    with different models or settings. The message names the rank that reports it and the cause."""
