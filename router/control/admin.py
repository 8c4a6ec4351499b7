"""The management API's logic (the manual's ``/``, ``/health``, ``/v1/models``, ``/api/*``).

Reads come from the cluster view (no Redis round trip); actions go to workers through the
``ControlClient`` and wait for their outcome, bounded. Success messages are the manual's, word
for word, with the alias as the caller gave it.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

import msgspec
from llm_lab_router import __version__
from llm_lab_router.protocol import CatalogEntry, Keys, Reply, trim_logs
from llm_lab_router.router.control.client import (
    ControlClient,
    ControlError,
    Origin,
    describe_failure,
    merged_models,
    start_failed,
)
from llm_lab_router.router.control.device_report import cpu_summary, cuda_summary, host_detail
from llm_lab_router.router.control.plan import build_plan
from llm_lab_router.router.core.errors import ApiError, Prefetching
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.responses import (
    DevicesResult,
    AllStopped,
    Cleared,
    Health,
    InstanceDetail,
    InstanceRef,
    LogStats,
    LogStatsResult,
    ModelCard,
    ModelDetail,
    ModelInfo,
    ModelList,
    PlanResult,
    Restarted,
    ServerInfo,
    Started,
    Stopped,
)
from llm_lab_router.router.core.view import ClusterView
from llm_lab_router.router.observe.vram_figures import vram_figures
from redis.asyncio import Redis


def clear_message(alias: str, keep_minutes: int, deleted: int) -> str:
    if keep_minutes:
        return f"模型 '{alias}' 已清理 {keep_minutes} 分钟前的日志，删除 {deleted} 条"
    return f"模型 '{alias}' 已清空全部日志，删除 {deleted} 条"


InScope = Callable[[Iterable[str]], bool]  # whether a model (its id and aliases) is in an admin key's scope


def failures(replies: list[Reply]) -> dict[str, str]:
    """The workers whose reply failed, with their reason."""
    return {r.worker: r.message or "failed" for r in replies if not r.ok}


def failures_text(failed: dict[str, str]) -> str:
    return "; ".join(f"worker '{w}': {why}" for w, why in failed.items())


class Manager:
    def __init__(self, view: ClusterView, control: ControlClient, redis: Redis, keys: Keys,
                 options: RouterOptions) -> None:
        self.view = view
        self.control = control
        self.redis = redis
        self.keys = keys
        self.options = options

    # --- lookups ---

    def model_for(self, alias: str) -> str:
        model = self.view.resolve(alias)
        if model is None:
            raise ApiError(404, f"model '{alias}' is not in the catalog of any live worker", "model_not_found")
        return model

    def live_worker(self, worker: str) -> None:
        """A 404 unless ``worker`` is live, naming the live ones."""
        if worker not in self.view.workers():
            live = ", ".join(sorted(self.view.workers())) or "none"
            raise ApiError(404, f"worker '{worker}' is not live (live workers: {live})", "worker_not_found")

    def host_for(self, alias: str, model: str, worker: str | None) -> str | None:
        """``worker`` checked for an action on one host: live, with ``model`` in its catalog
        (``None``: every host). A 404 otherwise, naming the hosts that would do."""
        if worker is None:
            return None
        self.live_worker(worker)
        if worker not in (hosts := self.view.catalog_workers(model)):
            raise ApiError(404, f"model '{alias}' is not in the catalog of worker '{worker}' (it is in the catalog "
                                f"of: {', '.join(hosts)})", "model_not_on_worker")
        return worker

    async def log_model(self, alias: str) -> str:
        """The model whose logs ``alias`` names: a catalog model, or one whose worker is gone
        but whose log stream is still there (its last words are what one wants to read)."""
        model = self.view.resolve(alias)
        if model is None and await self.redis.exists(self.keys.logs(alias)):
            model = alias
        if model is None:
            raise ApiError(404, f"model '{alias}' is not in the catalog of any live worker and has no logs",
                           "model_not_found")
        return model

    # --- read-only views ---

    def server_info(self) -> ServerInfo:
        return ServerInfo("LLM-Manager API Server", __version__)

    def health(self) -> Health:
        models = self.view.models()
        running = sum(1 for m in models if self.view.status(m.id) == "running")
        return Health("healthy" if self.view.redis_ok else "degraded", len(models), running,
                      len(self.view.workers()), "ok" if self.view.redis_ok else "unreachable")

    def model_card(self, entry: CatalogEntry) -> ModelCard:
        instances = self.view.instances(entry.id)
        return ModelCard(id=entry.id, created=entry.created, owned_by=entry.owned_by, aliases=entry.aliases,
                         status=self.view.status(entry.id), mode=entry.mode,
                         instances=[InstanceRef(i.worker, i.state, i.url) for i in instances],
                         pending=self.control.reason(entry.id) or msgspec.UNSET)

    def model(self, alias: str) -> ModelCard:
        return self.model_card(self._entry(self.model_for(alias)))

    def model_list(self, visible: InScope | None = None) -> ModelList:
        """Every catalog model; with ``visible`` (a key limited to some models), those only."""
        models = self.view.models() if visible is None else [e for e in self.view.models() if visible((e.id, *e.aliases))]
        return ModelList(data=[self.model_card(e) for e in sorted(models, key=lambda e: e.id)])

    def names(self, alias: str) -> tuple[str, ...]:
        """The names the model ``alias`` goes by (as asked, id, aliases), for permission checks;
        ``alias`` alone when no live catalog has it (a model whose logs outlived its worker)."""
        model = self.view.resolve(alias)
        entry = self.view.catalog_entry(model) if model else None
        return (alias,) if model is None or entry is None else (alias, model, *entry.aliases)

    def _entry(self, model: str) -> CatalogEntry:
        entry = self.view.catalog_entry(model)
        assert entry is not None  # resolve() only knows catalog models
        return entry

    def model_info(self, alias: str) -> ModelInfo:
        model = self.model_for(alias)
        e = self._entry(model)
        instances = [InstanceDetail(i.worker, i.state, i.url, i.pid, i.started_at, i.updated_at, i.last_error,
                                    i.restarts, i.gpus, i.last_error_at,
                                    Prefetching(i.prefetch_done, i.prefetch_total) if i.prefetch_total else None)
                     for i in self.view.instances(model)]
        return ModelInfo(model=ModelDetail(e.id, e.aliases, e.mode, self.view.status(model), e.owned_by, e.created,
                                     e.auto_start, e.on_demand, e.idle_ttl, e.max_concurrency,
                                     self.view.catalog_workers(model), instances, self.control.reason(model),
                                     [row for w, entry in self.view.catalog_entries(model).items()
                                      for row in vram_figures(w, entry)]))

    async def model_info_now(self, alias: str) -> ModelInfo:
        """``model_info`` with the requests in flight and queued now, over every router."""
        info = self.model_info(alias)
        info.model.inflight, info.model.queued = await self.control.load(info.model.id)
        return info

    def devices(self) -> DevicesResult:
        snaps = self.view.devices()
        if not snaps:
            raise ApiError(503, "no live worker has published device metrics", "devices_unavailable")
        ordered = [snaps[w] for w in sorted(snaps)]
        return msgspec.convert({"devices": {"cuda": cuda_summary(ordered), "cpu": cpu_summary(ordered)},
                                "hosts": {w: host_detail(snaps[w]) for w in sorted(snaps)}}, DevicesResult)

    async def plan(self, worker: str | None = None) -> PlanResult:
        """What fits where (router.control.plan), from the view and the models' use now."""
        if worker is not None:
            self.live_worker(worker)
        view = self.view
        catalogs = {w: {} for w in view.workers()}
        for entry in view.models():
            for w, e in view.catalog_entries(entry.id).items():
                catalogs[w][entry.id] = e
        usage = await self.control.usage_of([e.id for e in view.models()])
        return build_plan(catalogs, view.devices(), view.all_instances(), usage, worker)

    # --- actions ---

    async def start(self, alias: str, wait: bool, worker: str | None = None,
                    origin: Origin | None = None) -> tuple[int, Started]:
        """Start and wait until it serves (200), or only begin (202, ``wait=false``); on
        ``worker`` only, when given (``on``: the manual's message, naming that host).
        ``origin``: the caller, named in the audit trail of an eviction the start makes."""
        model = self.model_for(alias)
        host = self.host_for(alias, model, worker)
        on = f" (worker '{host}')" if host else ""
        if not wait and not self.control.running_on(model, host):
            self.control.start_in_background(model, self.options.start_timeout, host, origin)
            return 202, Started(message=f"模型 '{alias}' 正在启动{on}", model=model, state="starting",
                                workers=[host] if host else [])
        try:
            await self.control.ensure_running(model, self.options.start_timeout, host, origin=origin)
        except ControlError as exc:
            raise start_failed(f"模型 '{alias}' 启动失败{on}: {describe_failure(exc)}", exc) from None
        return 200, Started(message=f"模型 '{alias}' 启动成功{on}", model=model, state="running",
                            workers=[i.worker for i in self.control.running_on(model, host)])

    async def stop(self, alias: str, worker: str | None = None) -> Stopped:
        model = self.model_for(alias)
        host = self.host_for(alias, model, worker)
        on = f" (worker '{host}')" if host else ""
        replies = await self.control.stop(model, self.options.stop_timeout, host)
        if bad := failures(replies):
            raise ApiError(503, f"模型 '{alias}' 停止失败{on}: {failures_text(bad)}", "model_stop_failed", failed=bad)
        return Stopped(message=f"模型 '{alias}' 停止成功{on}", model=model, workers=[r.worker for r in replies])

    def scoped(self, in_scope: InScope) -> list[CatalogEntry]:
        """The catalog models within an admin scope."""
        return sorted((e for e in self.view.models() if in_scope((e.id, *e.aliases))), key=lambda e: e.id)

    async def stop_all(self, in_scope: InScope | None = None) -> AllStopped:
        """Every model on every host; with ``in_scope`` (a scoped admin key), those of its scope
        only, one stop per model (a worker's ``stop_all`` would stop the others too)."""
        if in_scope is None:
            replies = await self.control.stop_all(self.options.stop_timeout)
        else:
            active = [e.id for e in self.scoped(in_scope)
                      if any(i.state != "stopped" for i in self.view.instances(e.id))]
            per_model = await asyncio.gather(*(self.control.stop(m, self.options.stop_timeout) for m in active))
            replies = [msgspec.structs.replace(r, models=[m] if r.ok else []) for m, rs in zip(active, per_model)
                       for r in rs]
        if bad := failures(replies):
            raise ApiError(503, f"部分模型未能关闭: {failures_text(bad)}", "stop_all_failed", failed=bad)
        return AllStopped(message="所有模型已关闭", models=merged_models(replies),
                          workers=sorted({r.worker for r in replies}))

    async def restart_autostart(self, in_scope: InScope | None = None) -> Restarted:
        """Stop every model and start the ``auto_start`` ones again; with ``in_scope``, only the
        models of that scope (each ``auto_start`` one started on the hosts where it is so)."""
        if in_scope is None:
            replies = await self.control.restart_autostart(self.options.start_timeout)
        else:
            await self.stop_all(in_scope)
            replies = await self._start_autostart(self.scoped(in_scope))
        started = merged_models(replies)
        if bad := failures(replies):
            raise ApiError(503, f"已重启 {len(started)} 个autostart模型 ({', '.join(started)}), 但: "
                                f"{failures_text(bad)}", "restart_autostart_failed", failed=bad)
        return Restarted(message=f"已重启 {len(started)} 个autostart模型", started_models=started)

    async def _start_autostart(self, entries: list[CatalogEntry]) -> list[Reply]:
        """Start each of ``entries`` on every host whose catalog marks it ``auto_start``."""
        targets = [(e.id, w) for e in entries for w, c in self.view.catalog_entries(e.id).items() if c.auto_start]

        async def one(model: str, host: str) -> Reply:
            try:
                await self.control.ensure_running(model, self.options.start_timeout, host)
            except ControlError as exc:
                return Reply(id="", worker=host, ok=False, message=f"{model}: {exc.message}")
            return Reply(id="", worker=host, ok=True, models=[model])

        return list(await asyncio.gather(*(one(m, w) for m, w in targets)))

    async def log_stats(self) -> LogStatsResult:
        models = sorted(m.id for m in self.view.models())
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.xlen(self.keys.logs(model))
        counts = await pipe.execute() if models else []
        return LogStatsResult(stats=LogStats(len(models), sum(counts), sum(1 for c in counts if c)))

    async def clear_logs(self, alias: str, keep_minutes: int) -> Cleared:
        model = await self.log_model(alias)
        deleted = await trim_logs(self.redis, self.keys, model, keep_minutes)
        return Cleared(message=clear_message(alias, keep_minutes, deleted), model=model, deleted=deleted,
                       keep_minutes=keep_minutes)
