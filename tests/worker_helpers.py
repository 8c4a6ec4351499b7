"""A real ``llm-router worker`` process for a test, and a small synchronous client for its
Redis keys (commands in; replies, hashes, streams and events out): ``Worker`` and its
fixture ``worker`` (test_worker, test_reload, test_presets), plus the checks they share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import MOCK_ENGINE, role_url, wait_for
from llm_lab_router.lifeline import processes_with_env
from llm_lab_router.protocol import (
    Command,
    Event,
    Instance,
    Keys,
    Reply,
    command_fields,
    from_hash,
    from_json,
    log_entry,
)
from llm_lab_router.worker.orphans import WORKER_ENV, is_gone

KEYS = Keys()
ENGINE = ["{python}", str(MOCK_ENGINE), "--port", "{port}", "--host", "{host}", "--model", "{id}", "--quiet"]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def model(model_id: str, *engine_args: str, **fields) -> dict:
    """A model running the mock engine, with test-friendly timings."""
    return {"id": model_id, "command": [*ENGINE, *engine_args], "startup_timeout": 10.0, "stop_grace": 1.0,
            "restart": "no", **fields}


class Worker:
    """One ``llm-router worker`` process of a test, and a tiny sync client for its keys."""

    def __init__(self, procs, rds, redis_url: str, tmp_path: Path) -> None:
        self.procs, self.rds, self.redis_url, self.tmp_path = procs, rds, redis_url, tmp_path
        self.wid = f"w-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None
        self.config: Path | None = None

    def write_config(self, models: list[dict], **settings) -> Path:
        low = 30000 + (os.getpid() * 7 + len(self.wid)) % 20000
        worker = {"heartbeat_interval": 0.2, "lease_ttl": 2.0, "devices_interval": 0.5,
                  "port_range": [low, low + 200], **settings}
        lines = ["[worker]", *(f"{k} = {toml_value(v)}" for k, v in worker.items())]
        for m in models:
            lines += ["", "[[models]]", *(f"{k} = {toml_value(v)}" for k, v in m.items())]
        self.config = self.tmp_path / f"{self.wid}.toml"
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def start(self, models: list[dict] | None = None, wait: bool = True, env: dict[str, str] | None = None,
              **settings) -> subprocess.Popen:
        if models is not None or self.config is None:
            self.write_config(models or [], **settings)
        self.proc = self.procs.start([sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(self.config),
                                      "--redis", role_url(self.redis_url, "worker", self.wid), "--worker-id", self.wid],
                                     name="worker", stop_signal=signal.SIGINT, env=env)
        if wait:
            wait_for(lambda: self.rds.hget(KEYS.worker(self.wid), "pid") == str(self.proc.pid)
                     or self.proc.poll() is not None, message="the worker's lease")  # not a dead one's
            assert self.proc.poll() is None, self.procs.log(self.proc)
        return self.proc

    def send(self, op: str, model: str = "", entry_id: str = "*", **fields) -> Command:
        """Add a command; ``entry_id``: its stream id (as Redis would stamp it at that time)."""
        cmd = Command(op=op, model=model, **fields)
        self.rds.xadd(KEYS.commands(self.wid), command_fields(cmd), id=entry_id)
        return cmd

    def reply(self, cmd: Command, timeout: float = 15) -> Reply:
        got = self.rds.blpop([KEYS.reply(self.wid, cmd.id)], timeout)
        assert got is not None, f"no reply to {cmd.op} within {timeout}s\n{self.log()}"
        return from_json(got[1], Reply)

    def command(self, op: str, model: str = "", timeout: float = 15, **fields) -> Reply:
        return self.reply(self.send(op, model, **fields), timeout)

    def instance(self, model_id: str) -> Instance | None:
        data = self.rds.hgetall(KEYS.instance(model_id, self.wid))
        return from_hash(data, Instance) if data else None

    def wait_state(self, model_id: str, state: str, timeout: float = 10, **fields) -> Instance:
        def check():
            inst = self.instance(model_id)
            return inst if inst and inst.state == state and all(
                getattr(inst, k) == v for k, v in fields.items()) else None
        return wait_for(check, timeout, message=f"{model_id} {state} {fields or ''}")

    def logs(self, model_id: str) -> list:
        return [log_entry(fields) for _, fields in self.rds.xrange(KEYS.logs(model_id))]

    def messages(self, model_id: str, stream: str | None = None) -> list[str]:
        return [e.message for e in self.logs(model_id) if stream is None or e.stream == stream]

    def log(self) -> str:
        return self.procs.log(self.proc) if self.proc else ""


@pytest.fixture
def worker(procs, rds, redis_url, tmp_path) -> Worker:
    return Worker(procs, rds, redis_url, tmp_path)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except OSError:
        return 0


def alive(pid: int) -> bool:
    try:
        return not is_gone(psutil.Process(pid))
    except psutil.Error:
        return False


def processes_of(wid: str) -> list[int]:
    return [proc.pid for proc in processes_with_env(WORKER_ENV, wid) if not is_gone(proc)]


def events(pubsub, until, timeout: float = 10) -> list[Event]:
    """Events from ``llm:events:{wid}`` until one satisfies ``until`` (which is the last returned)."""
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg:
            got.append(from_json(msg["data"], Event))
            if until(got[-1]):
                return got
    raise AssertionError(f"no matching event within {timeout}s; got {got}")
