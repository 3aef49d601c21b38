"""The base of every error a stage reports as one line (pipelines/common/runner.py turns it into an exit status)."""


class StageError(RuntimeError):
    """A stage cannot go on; the message names the problem and what to do about it."""

    exit_code = 1
