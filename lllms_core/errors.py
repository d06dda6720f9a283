"""One error hierarchy for the core and the engines.

Each error knows its HTTP status and OpenAI error ``type``/``code``; the API
encodes them once into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class LllmsError(Exception):
    """Base of every error lllms reports to a caller."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(LllmsError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """A request asks for something its model's engine cannot do."""

    code = "unsupported_parameter"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ConfigError(LllmsError):
    """A configuration file or dict is invalid; the message names model and field."""

    status = 500
    type = "configuration_error"


class AuthenticationError(LllmsError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(LllmsError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PayloadTooLargeError(LllmsError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFullError(LllmsError):
    """More requests are waiting than the configured queue limit allows."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(LllmsError):
    status = 504
    type = "timeout_error"
    code = "timeout"


class ServiceUnavailableError(LllmsError):
    status = 503
    type = "server_error"
    code = "unavailable"


class ModelLoadError(LllmsError):
    """Preparing (download, verify) or loading a model failed."""

    status = 503
    type = "server_error"
    code = "model_load_failed"


class DownloadError(ModelLoadError):
    code = "download_failed"


class ChecksumMismatchError(DownloadError):
    code = "checksum_mismatch"


class EngineError(LllmsError):
    """An engine failed while running a task."""

    status = 500
    type = "server_error"
    code = "engine_error"
