"""The chat_data stage's one error type (pipelines/common/runner.py prints it as `chat_data: error: ...`)."""

from pipelines.common.errors import StageError


class ChatDataError(StageError):
    """A source cannot be read, or nothing usable remains; the message says which and what to do."""
