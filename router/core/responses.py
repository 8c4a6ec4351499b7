"""Response shapes of the HTTP API (the manual's contract) and the one error type services raise.

Services raise ``ApiError``; the base handler turns it (and any other failure) into the body
the caller expects: the OpenAI error shape on ``/v1/*`` so SDKs raise the right exception,
``{"success": false, "message": ...}`` on everything else.
"""

from __future__ import annotations

import msgspec
from llm_lab_router.audit import AuditEntry
from llm_lab_router.protocol import CpuInfo, CudaInfo
from llm_lab_router.timeline import TimelineEvent
from llm_lab_router.router.core.errors import Prefetching, WaitReason

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
    pending: WaitReason | msgspec.UnsetType = msgspec.UNSET  # only while it waits: why (router.control.explain)


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
    last_error: str  # the last failure, kept after a recovery (with its time)
    restarts: int
    gpus: str
    last_error_at: float = 0.0  # unix time of last_error (0: none yet)
    prefetching: Prefetching | None = None  # while it waits to start on this host (done = total: all read)


class VramFigures(msgspec.Struct, kw_only=True):
    """One GPU profile of a model on one host: its VRAM per GPU (MiB) as declared, estimated
    from the files (llm_router.estimate) and measured (worker.learning); 0 = unknown.
    ``estimate_error``: (estimated - measured) / measured, once both are known."""

    worker: str
    profile: int  # index into the model's device profiles
    devices: list[str]
    declared_mb: int
    estimated_mb: int
    measured_mb: int
    estimate_error: float | None = None


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
    vram: list[VramFigures] = []  # per host and GPU profile: declared, estimated, measured
    # Now, over every live router: its requests in flight (being served, or waiting for a start,
    # a swap or a slot), and of those, the ones waiting for a swap (llm:used, llm:waiting).
    inflight: int = 0
    queued: int = 0


class Ok(msgspec.Struct, kw_only=True):
    """Base of the ``/api`` success bodies: ``"success": true`` first, as in the manual."""

    success: bool = True


class ModelInfo(Ok, kw_only=True):
    model: ModelDetail


class PlanGpu(msgspec.Struct, kw_only=True):
    index: int
    name: str
    total_mb: int
    free_mb: int  # as placement counts it: NVML's free minus what placed models hold
    resident: list[str]  # models holding VRAM on it now


class PlanProfile(msgspec.Struct, kw_only=True):
    devices: list[str]
    vram_mb: int  # per GPU, as placement uses it
    source: str  # measured, declared, estimated, unknown (a GPU profile with no figure) or cpu


class PlanModel(msgspec.Struct, kw_only=True):
    """One model of a host's catalog: what starting it there now would do."""

    model: str
    state: str  # its instance's state on this host
    profiles: list[PlanProfile]
    fits_alone: bool  # some profile fits this host's GPUs with nothing else loaded
    now: str  # running (or starting, stopping), fits, evicts or no_room
    profile: int | None = None  # the profile it runs with (by its GPUs) or would get now
    evicts: list[str] = []  # now = evicts: the idle models stopped first, least recently used first
    why: str = ""  # now = no_room: each profile and why it does not fit


class HostPlan(msgspec.Struct, kw_only=True):
    worker: str
    gpus: list[PlanGpu]
    models: list[PlanModel]
    together: list[list[str]]  # the largest sets of its GPU models that fit its GPUs at once
    together_complete: bool = True  # false: too many models to try every set (the first found)
    gpu_error: str = ""  # why no GPU is known (NVML offline, no snapshot yet)


class Nowhere(msgspec.Struct, kw_only=True):
    model: str
    reasons: dict[str, str]  # host -> why no profile fits even an empty host


class Disagreement(msgspec.Struct, kw_only=True):
    model: str
    figures: VramFigures


class PlanResult(Ok, kw_only=True):
    hosts: list[HostPlan]
    nowhere: list[Nowhere]  # models that fit no live host even with nothing else loaded
    disagree: list[Disagreement]  # estimates off the measurement by more than the plan's tolerance


class Done(Ok, kw_only=True):
    message: str


class Started(Done, kw_only=True):
    """A start's outcome, for programs (the CLI words its own text from these fields)."""

    model: str  # the model id the alias names
    state: str  # "running" (200), or "starting" (202, wait=false)
    workers: list[str]  # the hosts it runs on now; while starting, the one asked for (or none yet)


class Stopped(Done, kw_only=True):
    model: str
    workers: list[str]  # the hosts asked to stop it: each stopped it or had it stopped already


class AllStopped(Done, kw_only=True):
    models: list[str]  # the models stopped, on any host
    workers: list[str]  # the hosts asked


class Cleared(Done, kw_only=True):
    model: str
    deleted: int  # log entries deleted
    keep_minutes: int  # entries of the last keep_minutes minutes were kept (0: none)


class Restarted(Ok, kw_only=True):
    message: str
    started_models: list[str]


class AuditList(Ok, kw_only=True):
    """``GET /api/audit``: entries of ``llm:audit``, oldest first."""

    entries: list[AuditEntry]


class UsageRow(msgspec.Struct, kw_only=True):
    """One line of the report: a key, group or model over the period."""

    name: str
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_estimated: int = 0  # the part of tokens_in + tokens_out estimated (no usage reported)
    gpu_hours: float = 0.0


class BudgetState(msgspec.Struct, kw_only=True):
    """A group's GPU-time budget as the usage report shows it (router/limits/budgets.py)."""

    group: str
    gpu_hours: float  # the budget
    period: str  # day, week or month (UTC)
    used_gpu_hours: float  # this period, so far
    resets_at: float  # unix time the period ends


class UsageReport(Ok, kw_only=True):
    """``GET /api/usage``: the ledger over ``[since, until]`` (unix times, whole hours), one row
    per ``by`` (key, group or model), and their total."""

    since: float
    until: float
    by: str
    rows: list[UsageRow]
    total: UsageRow
    budgets: list[BudgetState] = []  # the groups' GPU-time budgets this period (an admin's report)


class Outcome:
    """An admin action's answer, once it has one (``BaseHandler.audited`` records it)."""

    body: Done | Restarted | None = None


def audit_fields(body: Done | Restarted | None, model: str) -> dict:
    """What an action's answer tells the audit trail: the model (as resolved), the models it
    stopped or started, the hosts, and a start's state (``starting``: begun, ``wait=false``)."""
    fields: dict = {"model": getattr(body, "model", "") or model}
    if models := getattr(body, "models", None) or getattr(body, "started_models", None):
        fields["models"] = list(models)
    if workers := getattr(body, "workers", None):
        fields["host"] = ",".join(workers)
    if (state := getattr(body, "state", "")) and state != "running":
        fields["detail"] = f"state {state}"
    return fields


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


class HistoryResult(Ok, kw_only=True):
    """``GET /api/history``: one series over ``[from, to)`` in points of ``step`` seconds, read
    from the finest resolution kept that long (``resolution``). A point's values are null where
    nothing was recorded (Redis or the writer was away): a gap, never a zero. ``available``
    (without ``series`` only, else empty): every series recorded (``model:{id}``,
    ``gpu:{host}:{index}``, ``host:{host}``, ``gpus``). GPU series also carry ``vram:{model}``
    (MiB that model's engines hold, one field per model seen in the range) and ``other`` (MiB
    used by no engine of the lab: another user's process, the driver)."""

    series: str
    start: float = msgspec.field(name="from")
    end: float = msgspec.field(name="to")
    step: int
    resolution: int
    fields: list[str]
    points: list[dict[str, float | None]]
    available: list[str]


class EventsResult(Ok, kw_only=True):
    """``GET /api/events``: timeline events, oldest first (at most ``limit``; ``more`` when cut)."""

    events: list[TimelineEvent]
    more: bool = False
