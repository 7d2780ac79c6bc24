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
