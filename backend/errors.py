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


class OutboundRefusedError(ImageFetchError):
    """The outbound policy refused an image fetch before connecting: a loopback, private, link-local or other
    non-public address not allowed by FETCH_ALLOW_NETWORKS / FETCH_ALLOW_HOSTS, or a Label Studio path outside its
    media paths. Never retryable."""


class ModelLoadError(BackendError):
    """A model could not be loaded from the configured id, path or checkpoint."""


class QueueUnavailableError(BackendError):
    """Redis cannot be reached, so no job can be queued or read."""


class RedisFullError(QueueUnavailableError):
    """Redis refused a write because it reached its maxmemory (noeviction): nothing more can be queued."""


class RequestTooLargeError(BackendError):
    """A request exceeds a size limit (body bytes, tasks per synchronous /predict, labeling config bytes)."""


class RequestDataError(BackendError):
    """A request field is malformed in a way the schema cannot say (e.g. /setup's hostname is no http(s) origin)."""


class LabelConfigMissingError(BackendError):
    """A job refers to a labeling config that is no longer in Redis (expired or deleted)."""


class EmbeddedRedisDirInUseError(BackendError):
    """Another `serve` holds the EMBEDDED_REDIS_DIR folder: two servers must not share one append-only file."""


class CrashLoopError(BackendError):
    """A supervised child of `serve` (worker or embedded Redis) died SUPERVISE_MAX_RESTARTS times within
    SUPERVISE_WINDOW: restarting it again would not help."""
