"""The ingest stage's one error type (pipelines/common/runner.py prints it as `ingest: error: ...`)."""

from pipelines.common.runner import StageError


class IngestError(StageError):
    """A source could not be read; the message says which and what to do."""
