"""Response shapes of the HTTP API (the manual's contract) and the one error type services raise.

Services raise ``ApiError``; the base handler turns it (and any other failure) into the body
the caller expects: the OpenAI error shape on ``/v1/*`` so SDKs raise the right exception,
``{"success": false, "message": ...}`` on everything else.
"""

from __future__ import annotations

from http import HTTPStatus

import msgspec
from redis.exceptions import RedisError

from llm_router.protocol import CpuInfo, CudaInfo
from router.explain import WaitReason

# --- errors ---

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
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
                 headers: dict[str, str] | None = None, reason: WaitReason | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}  # extra response headers (``Retry-After`` of a 429)
        self.reason = reason  # why a request could not be served (yet): ``error.reason`` (router.explain)


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


def error_body(err: ApiError, openai_shape: bool) -> msgspec.Struct:
    if openai_shape:
        kind = OPENAI_ERROR_TYPES.get(err.status, "internal_error" if err.status >= 500 else "invalid_request_error")
        return OpenAIError(OpenAIErrorBody(err.message, kind, err.code, err.reason or msgspec.UNSET))
    return Failure(message=err.message, reason=err.reason or msgspec.UNSET)


# --- success shapes (the manual's fields first; multi-host detail beside them) ---


class ServerInfo(msgspec.Struct):
    message: str
    version: str
    models_url: str = "/v1/models"


class Health(msgspec.Struct):
    status: str  # "healthy"; "degraded" while Redis is unreachable (the router still forwards)
    models_count: int
    running_models: int
    workers: int
    redis: str  # "ok" | "unreachable"


class InstanceRef(msgspec.Struct):
    worker: str
    state: str
    url: str


class ModelCard(msgspec.Struct, kw_only=True):
    """An item of ``GET /v1/models`` (OpenAI's model object plus our status)."""

    id: str
    object: str = "model"
    created: int
    owned_by: str
    aliases: list[str]
    status: str
    mode: str
    instances: list[InstanceRef]
    pending: WaitReason | msgspec.UnsetType = msgspec.UNSET  # only while it waits: why (router.explain)


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class InstanceDetail(msgspec.Struct):
    worker: str
    state: str
    url: str
    pid: int
    started_at: float
    updated_at: float
    last_error: str
    restarts: int
    gpus: str


class ModelDetail(msgspec.Struct):
    id: str
    aliases: list[str]
    mode: str
    status: str
    owned_by: str
    created: int
    auto_start: bool
    on_demand: bool
    idle_ttl: float
    max_concurrency: int
    workers: list[str]  # live workers whose catalog has it
    instances: list[InstanceDetail]
    pending: WaitReason | None = None  # why it is not served yet (a swap wait, a start), alike on every router


class Ok(msgspec.Struct, kw_only=True):
    """Base of the ``/api`` success bodies: ``"success": true`` first, as in the manual."""

    success: bool = True


class ModelInfo(Ok, kw_only=True):
    model: ModelDetail


class Done(Ok, kw_only=True):
    message: str


class Restarted(Ok, kw_only=True):
    message: str
    started_models: list[str]


class LogStats(msgspec.Struct):
    total_models: int
    total_log_entries: int
    models_with_logs: int


class LogStatsResult(Ok, kw_only=True):
    stats: LogStats


class GpuTotals(msgspec.Struct):
    device_count: int
    device_name: str  # distinct GPU names, joined with ", "
    memory_total: int  # MiB, summed over every GPU of every host
    memory_used: int
    memory_free: int


class CudaSummary(msgspec.Struct):
    online: bool  # some host has NVML online
    info: GpuTotals


class CpuTotals(msgspec.Struct):
    cpu_count: int
    memory_total: int  # MiB, summed over the hosts
    memory_used: int
    memory_free: int


class CpuSummary(msgspec.Struct):
    online: bool
    info: CpuTotals


class DeviceSummary(msgspec.Struct):
    """The manual's ``devices``: the cluster's total, as if it were one machine."""

    cuda: CudaSummary
    cpu: CpuSummary


class HostDevices(msgspec.Struct):
    """One host's device snapshot, per GPU (as its worker published it)."""

    host: str
    ts: float
    cuda: CudaInfo
    cpu: CpuInfo


class DevicesResult(Ok, kw_only=True):
    devices: DeviceSummary
    hosts: dict[str, HostDevices]  # by worker id


_encoder = msgspec.json.Encoder()


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)
