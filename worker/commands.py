"""Commands from routers: read from the worker's stream, run, answered on a reply list.

``CommandIntake`` is the Redis side: it reads ``llm:cmd:{wid}`` as consumer ``wid`` of
the group ``COMMAND_GROUP``, runs each command in its own task, pushes the ``Reply`` to
``llm:reply:{wid}:{id}`` and acknowledges the entry in the same transaction. An entry is only
acknowledged once answered, so commands delivered to a worker that died before answering
are still pending for it, and run when it comes back (it reads its pending entries first).

``Operations`` is what the commands do, in terms of ``ModelProcess`` calls. Commands for one
model need no lock: the supervisor's ``ensure_*`` calls are idempotent and single-flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import msgspec
import redis.asyncio as aredis
import redis.exceptions
from llm_lab_router.backoff import REDIS_ERRORS, RedisLink, stop_if_cancelled
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import COMMAND_GROUP, Command, CommandOp, Keys, Reply, command_of, to_json, trim_logs
from llm_lab_router.worker.process import ModelProcess

log = logging.getLogger("llm_router.worker")

REPLY_TTL = 60  # seconds a reply waits for its sender
TAIL_IN_REPLY = 20  # log lines quoted in the reply of a failed start


class Operations:
    """Runs one ``Command`` against this worker's models and says how it went."""

    def __init__(self, worker_id: str, models: dict[str, ModelProcess], redis: aredis.Redis, keys: Keys) -> None:
        self.worker_id = worker_id
        self.models = models  # the agent's own dict: a reload changes it in place
        self.redis = redis
        self.keys = keys
        # What runs each command of the protocol (``CommandOp``; msgspec refuses any other op).
        self.ops: dict[CommandOp, Callable[[Command], Awaitable[Reply]]] = {
            "start": self._op_start,
            "stop": self._op_stop,
            "stop_all": self._op_stop_all,
            "restart_autostart": self._op_restart_autostart,
            "clear_logs": self._op_clear_logs,
        }

    async def execute(self, cmd: Command) -> Reply:
        return await self.ops[cmd.op](cmd)

    def _reply(self, cmd: Command, ok: bool, message: str, **fields) -> Reply:
        return Reply(id=cmd.id, worker=self.worker_id, ok=ok, message=message, **fields)

    def _find(self, name: str) -> ModelProcess | None:
        """The supervisor of the model ``name`` (id or alias) names. Read from the supervisors,
        not from a copy of the config, so a reload cannot leave two versions to disagree."""
        return next((mp for mp in self.models.values() if name in mp.model.names), None)

    async def _op_start(self, cmd: Command) -> Reply:
        mp = self._find(cmd.model)
        if mp is None:
            return self._unknown(cmd)
        inst = await mp.ensure_running(on_demand=cmd.on_demand)
        if inst.state == "running":
            return self._reply(cmd, True, f"model '{inst.model}' is running at {inst.url}", state=inst.state)
        why = "; ".join(filter(None, [inst.last_error, mp.refusal])) or f"model '{inst.model}' is {inst.state}"
        return self._reply(cmd, False, why,
                           state=inst.state, log_tail=mp.log_tail(TAIL_IN_REPLY),
                           no_room=mp.host.placer.lost_on_vram(mp.model.id))

    async def _op_stop(self, cmd: Command) -> Reply:
        mp = self._find(cmd.model)
        if mp is None:
            return self._unknown(cmd)
        inst = await mp.ensure_stopped()
        return self._reply(cmd, True, f"model '{inst.model}' stopped", state=inst.state)

    async def _op_stop_all(self, cmd: Command) -> Reply:
        stopped = await self.stop_all()
        return self._reply(cmd, True, f"stopped {len(stopped)} models", models=stopped)

    async def _op_restart_autostart(self, cmd: Command) -> Reply:
        await self.stop_all()
        auto = [mp for mp in self.models.values() if mp.model.auto_start]
        results = await asyncio.gather(*(mp.ensure_running() for mp in auto))
        started = [inst.model for inst in results if inst.state == "running"]
        failed = [f"{inst.model}: {inst.last_error or inst.state}" for inst in results if inst.state != "running"]
        if failed:
            return self._reply(cmd, False, f"started {len(started)} of {len(auto)} auto_start models; "
                               + "; ".join(failed), models=started)
        return self._reply(cmd, True, f"started {len(started)} auto_start models", models=started)

    async def _op_clear_logs(self, cmd: Command) -> Reply:
        if cmd.model:
            mp = self._find(cmd.model)
            if mp is None:
                return self._unknown(cmd)
            targets = [mp.model.id]
        else:
            targets = list(self.models)
        deleted = 0
        for model_id in targets:
            deleted += await trim_logs(self.redis, self.keys, model_id, cmd.keep_minutes)
        return self._reply(cmd, True, f"deleted {deleted} log entries", deleted=deleted)

    async def stop_all(self) -> list[str]:
        """Stop every model that is not stopped, in parallel; return their ids."""
        active = [mp for mp in self.models.values() if mp.state != "stopped"]
        await asyncio.gather(*(mp.ensure_stopped() for mp in active))
        return [mp.model.id for mp in active]

    def _unknown(self, cmd: Command) -> Reply:
        return self._reply(cmd, False, f"unknown model '{cmd.model}'")


def expired(cmd: Command, entry_id: str, now: float) -> bool:
    """Whether the sender of ``cmd`` no longer waits for it: its ``timeout`` has passed since
    the entry was added, on Redis's clock at both ends (``now``: ``CLOCK.now()``). The entry id
    is the time Redis added it (ms), so neither the sender's clock nor a deadline computed on it
    is involved: a router whose clock is off by minutes gets its commands run, and a command
    that waited in the stream longer than its sender (the worker was away) is not run late."""
    if cmd.timeout <= 0:
        return False
    try:
        added = int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:  # not an id Redis generated: only the sender's word is left
        return False
    return now > added + cmd.timeout


class CommandIntake:
    """Reads this worker's command stream and answers every entry exactly once it is done."""

    def __init__(self, redis: aredis.Redis, keys: Keys, worker_id: str,
                 execute: Callable[[Command], Awaitable[Reply]],
                 before_reply: Callable[[], Awaitable[None]] | None = None, block_ms: int = 2000) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.execute = execute
        self.before_reply = before_reply  # e.g. wait until the states a reply reports are published
        self.block_ms = block_ms
        self.stream = keys.commands(worker_id)
        self._link = RedisLink("commands")
        self._inflight: dict[str, asyncio.Task] = {}  # entry id -> its task

    async def run(self) -> None:
        """Read and dispatch until cancelled: first this consumer's pending entries (delivered
        before a crash or an outage, never answered), then new ones."""
        cursor = "0"
        group_ready = False
        while True:
            stop_if_cancelled()
            try:
                if not group_ready:
                    await self._create_group()
                    group_ready = True
                block = self.block_ms if cursor == ">" else None
                response = await self.redis.xreadgroup(COMMAND_GROUP, self.worker_id, {self.stream: cursor},
                                                       count=32, block=block)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                group_ready, cursor = False, "0"  # Redis lost the group (restart without persistence)
                continue
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
                group_ready, cursor = False, "0"
                await self._link.pause()
                continue
            self._link.ok()
            entries = response[0][1] if response else []
            if cursor != ">":
                cursor = entries[-1][0] if entries else ">"  # page through pending, then go live
            for entry_id, fields in entries:
                self._dispatch(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields)

    async def drain(self, timeout: float) -> None:
        """Let commands in flight finish and answer (up to ``timeout``), then cancel the rest."""
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _create_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, COMMAND_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _dispatch(self, entry_id: str, fields: dict | None) -> None:
        if entry_id in self._inflight:  # re-read from the pending list while still running
            return
        task = asyncio.create_task(self._handle(entry_id, fields), name=f"command {entry_id}")
        self._inflight[entry_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(entry_id, None))

    async def _handle(self, entry_id: str, fields: dict | None) -> None:
        try:
            cmd = command_of(fields or {})
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
            log.warning("ignoring malformed command %s: %s", entry_id, exc)
            await self._answer(entry_id, None)
            return
        if expired(cmd, entry_id, CLOCK.now()):
            log.info("command %s (%s %s) expired before it could run", cmd.id, cmd.op, cmd.model)
            reply = Reply(id=cmd.id, worker=self.worker_id, ok=False, message="expired")
        else:
            log.info("command %s: %s %s", cmd.id, cmd.op, cmd.model)
            try:
                reply = await self.execute(cmd)
            except Exception as exc:  # a bug, not an expected failure: say so, with the traceback
                log.exception("command %s (%s %s) failed", cmd.id, cmd.op, cmd.model)
                reply = Reply(id=cmd.id, worker=self.worker_id, ok=False, message=f"internal error: {exc}")
        if self.before_reply is not None:
            await self.before_reply()
        await self._answer(entry_id, reply)

    async def _answer(self, entry_id: str, reply: Reply | None) -> None:
        """Push the reply and acknowledge the entry atomically; retry while Redis is away."""
        link = RedisLink(f"reply {entry_id}")
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    if reply is not None:
                        key = self.keys.reply(self.worker_id, reply.id)
                        pipe.lpush(key, to_json(reply))
                        pipe.expire(key, REPLY_TTL)
                    pipe.xack(self.stream, COMMAND_GROUP, entry_id)
                    await pipe.execute()
                return
            except REDIS_ERRORS as exc:
                link.failed(exc)
                await link.pause()
