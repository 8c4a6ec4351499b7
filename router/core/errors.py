"""The errors every layer raises and the shapes they take on the wire; why a request waits.

Services raise ``ApiError``; the HTTP layer turns it (and any other failure) into the body the
caller expects: the OpenAI error shape on ``/v1/*`` so SDKs raise the right exception,
``{"success": false, "message": ...}`` on everything else. A request that waits (a start, a
swap, a slot) carries a ``WaitReason`` (built by ``router.control.explain``) in its error, its
keep-alives and ``/info``. This module is the base of the router: it imports no other part of it.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Literal

import msgspec
from llm_lab_router.protocol import Blocked
from redis.exceptions import RedisError


class HostRoom(msgspec.Struct, kw_only=True, omit_defaults=True):
    free_mb: dict[str, int] = {}  # GPU index -> free MiB as the router sees it
    needed_mb: int = 0  # per GPU, the model's first GPU profile
    why: str = ""


class Prefetching(msgspec.Struct):
    """A model's weight files read into the host's page cache before its start (worker.prefetch)."""

    done: int  # bytes read
    total: int  # bytes to read (its files, within the host's prefetch budget)


class WaitReason(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: Literal["no_room", "starting", "queued", "backoff"]
    message: str
    eta: float = 0.0  # unix time it should be served / scheduled; 0 = unknown
    position: int = 0  # 1 = next
    waiting: int = 0  # requests waiting for the model (all routers, as last read)
    since: float = 0.0  # unix time the earliest of them began waiting (all routers); 0 = unknown
    blocked: list[Blocked] = []
    hosts: dict[str, HostRoom] = {}
    prefetching: dict[str, Prefetching] = {}  # queued: per host, its weights read ahead of the start


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """A failure with its HTTP status and a message meant for the caller.

    ``code`` is the machine-readable OpenAI ``error.code`` (``model_not_found``...)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, reason: WaitReason | None = None,
                 failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}  # extra response headers (``Retry-After`` of a 429)
        self.reason = reason  # why a request could not be served (yet): ``error.reason`` (router.control.explain)
        self.failed = failed  # an action on several hosts: each host that failed, with its reason


def redis_unavailable(exc: BaseException) -> ApiError:
    return ApiError(503, f"Redis is unreachable ({type(exc).__name__}: {exc}); "
                         "running models are still served, control actions are not", "redis_unavailable")


def as_api_error(status: int, exc: BaseException | None) -> ApiError:
    """Whatever went wrong, as an ``ApiError`` (internal errors say little on purpose)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RedisError):
        return redis_unavailable(exc)
    reason = getattr(exc, "reason", None) or getattr(exc, "log_message", None)
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "error"
    return ApiError(status, reason)


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    reason: WaitReason | msgspec.UnsetType = msgspec.UNSET  # present when the router knows why it waits


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorBody


class Failure(msgspec.Struct, kw_only=True):
    success: bool = False
    message: str
    reason: WaitReason | msgspec.UnsetType = msgspec.UNSET
    failed: dict[str, str] | msgspec.UnsetType = msgspec.UNSET  # worker id -> why (a stop that failed on some)


def error_body(err: ApiError, openai_shape: bool) -> msgspec.Struct:
    if openai_shape:
        kind = OPENAI_ERROR_TYPES.get(err.status, "internal_error" if err.status >= 500 else "invalid_request_error")
        return OpenAIError(OpenAIErrorBody(err.message, kind, err.code, err.reason or msgspec.UNSET))
    return Failure(message=err.message, reason=err.reason or msgspec.UNSET, failed=err.failed or msgspec.UNSET)


_encoder = msgspec.json.Encoder()


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)
