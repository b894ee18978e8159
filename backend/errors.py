"""Named failures. Each says what went wrong in words a user can act on.

Catch-alls exist only at the HTTP and job boundaries; everywhere else code raises and catches these.
"""


class BackendError(Exception):
    """Base class of every error this backend raises on purpose."""


class LabelConfigError(BackendError):
    """The labeling config cannot be served (no Image, no supported control, malformed XML)."""


class TaskDataError(BackendError):
    """A task lacks the data the labeling config points at (e.g. no value for `$image`)."""


class ImageFetchError(BackendError):
    """An image could not be fetched or decoded.

    `retryable` is True for transient failures (timeouts, connection errors, 5xx) and False for
    failures that will repeat (404, not an image, over the byte or pixel cap).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ModelLoadError(BackendError):
    """A model could not be loaded from the configured id, path or checkpoint."""


class QueueUnavailableError(BackendError):
    """Redis cannot be reached, so no job can be queued or read."""
