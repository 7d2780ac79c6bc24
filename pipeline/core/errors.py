"""Errors the command line turns into one clear line on stderr and exit code 2."""


class PipelineError(Exception):
    """Unusable input or artifacts: the message says what and where.

    `run_pipeline.py` prints `error: <message>` and exits with code 2, no traceback.
    """


class DataFormatError(PipelineError):
    """A malformed line or field in a dataset file; the message starts with `file:line`."""

    def __init__(self, path, line, message):
        self.path = str(path)
        self.line = line
        location = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{location}: {message}")


class ArtifactError(PipelineError):
    """An artifact in OUT/ is missing, damaged or from an incompatible run."""


def write_failure_reason(error):
    """The operating system's reason (str) behind a failed write, e.g. 'File too large'.

    h5py wraps HDF5's report, "..., error message = 'File too large', ...", in an OSError
    or RuntimeError whose text is a paragraph; the OS reason inside it is what a user
    needs. A plain OSError gives its strerror.
    """
    message = " ".join(str(error).split())
    return next(
        (part.split("=", 1)[1].strip(" '") for part in message.split(", ") if part.startswith("error message =")),
        " ".join(str(getattr(error, "strerror", None) or message).split()),
    )


def op_error_reason(error):
    """The human part (str) of a TensorFlow op error's message, without graph-node prefixes.

    "{{function_node ...}} Invalid JPEG data, size 9 [Op:DecodeImage]" -> "Invalid JPEG data, size 9".
    """
    import re

    message = (getattr(error, "message", None) or type(error).__name__).strip().splitlines()[0]
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)  # "{{function_node ...}}" names graph internals
    message = re.sub(r"\s*\[Op:\w+\]$", "", message)
    return message.strip() or type(error).__name__
