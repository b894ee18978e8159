"""Named failures. Each says what went wrong in words a user can act on.

Catch-alls exist only at the HTTP and job boundaries; everywhere else code raises and catches these.
"""


class BackendError(Exception):
    """Base class of every error this backend raises on purpose.

    `retryable`: the same work may succeed if tried again later (a transient failure: a timeout, a refused
    connection, a 5xx answer); False for failures that would repeat.
    """

    retryable: bool = False


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


class LabelStudioApiError(BackendError):
    """A Label Studio API call failed (unreachable, refused credentials, unexpected answer)."""


class PromptTooLongError(BackendError, ValueError):
    """One class's phrases alone need more tokens than the detector reads in one prompt."""


class BackendCallError(BackendError):
    """The backend's HTTP API refused or failed a call."""


class InteractiveContextError(BackendError, ValueError):
    """An interactive request's context is malformed or asks for something the labeling config lacks."""


class ModelVersionMismatchError(BackendError):
    """The job was queued for other models or thresholds than this worker runs. Retryable: a bulk chunk is run
    again later, when a worker with the announced settings may take it."""

    retryable = True


class DeviceOutOfMemoryError(BackendError):
    """A single item (one image, one box) does not fit in the device's memory, even alone."""


class PredictTimeoutError(BackendError):
    """Some jobs of a /predict did not finish within PREDICT_TIMEOUT."""


class StudioNotConfiguredError(BackendError):
    """Bulk work pushes to Label Studio, which needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the worker."""


class TasksFailedError(BackendError):
    """Some tasks of a chunk failed; the message names each task and its reason. Retryable when every failure was."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class LocalPredictError(BackendError):
    """At least one image could not be predicted (the others were written)."""


class JobMessageError(BackendError):
    """A queued job's message has another schema version than this worker reads, or is malformed."""


class ModelVersionUnknownError(BackendError):
    """The API cannot say which model_version the workers compute (it reads it from their announcements)."""


class NoWorkerError(ModelVersionUnknownError):
    """No live worker on the backend's queues has announced its models (none runs, or none finished loading)."""


class WorkersDisagreeError(ModelVersionUnknownError):
    """Live workers on the backend's queues announced different model settings: no one model_version fits all."""


class ReviewFormatError(BackendError, ValueError):
    """A Label Studio annotation or prediction result item cannot be compared: a region on a served control is
    malformed (missing or ill-typed fields, a brush RLE that does not decode) or exceeds a bound (an RLE's declared
    size, the number of regions)."""
