"""One error hierarchy for the appliance, and its OpenAI error envelope.

Every error a client can see is an :class:`ApplianceError`. ``appliance.lib.http`` maps them (and the
framework's own exceptions) to HTTP responses in one place.
"""

from __future__ import annotations

from typing import Any


class ApplianceError(Exception):
    """Base of every error the appliance reports to a client."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = "internal_error"
    # A refusal that a well-behaved client does not provoke again and again (a body too large or nested too
    # deeply, a full ingestion queue): past a limit per client address, it is answered slowly
    # (``appliance.lib.pacing``). Every 413 is paced, whatever its class.
    paced: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        paced: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if paced is not None:
            self.paced = paced
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_envelope(self.message, self.error_type, self.param, self.code)


def error_envelope(message: str, error_type: str, param: str | None, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class InvalidRequestError(ApplianceError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class NotFoundError(ApplianceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist on this appliance.", param="model")


class UpstreamError(ApplianceError):
    """The engine answered, but with something the gateway cannot pass on as a success."""

    status_code = 502
    error_type = "upstream_error"
    code = "engine_error"


class UpstreamRequestError(ApplianceError):
    """The engine refused the request as invalid (its own 4xx); passed on with the engine's status."""

    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, status_code: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code


class EngineUnavailableError(ApplianceError):
    status_code = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"


class ServiceUnavailableError(ApplianceError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class AuthenticationError(ApplianceError):
    """No valid identity. The message never says which check failed: that would help an attacker."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_credentials"

    def __init__(self, message: str = "Missing or invalid credentials.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="appliance"'})


class PermissionDeniedError(ApplianceError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"

    def __init__(
        self, message: str = "You are not allowed to do this.", *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)


class ConflictError(ApplianceError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(ApplianceError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ClientDisconnectedError(ApplianceError):
    """The client went away before its answer (nobody reads this response; nginx's 499 names it in logs)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_disconnected"


class UnsupportedMediaTypeError(ApplianceError):
    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitedError(ApplianceError):
    """Too many requests of one kind right now (sign-in attempts, say); ``Retry-After`` says when to retry."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 1,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        paced: bool | None = None,
    ) -> None:
        super().__init__(
            message, headers={**(headers or {}), "Retry-After": str(max(1, retry_after))}, code=code, paced=paced
        )
        self.retry_after = max(1, retry_after)
