"""Where a running ``llm-router up`` serves, recorded so the client commands find it.

``up --port 8001`` writes ``{state}/up/<pid>.json`` (``state``: ``$LLM_ROUTER_STATE_DIR`` or
``~/.local/state/llm-router``; see ``config.state_base``) once its router answers, and removes
it when it stops. A client command given neither ``--url`` nor ``LLM_ROUTER_URL`` uses the URL
of the most recently started ``up`` that is still running, else ``http://127.0.0.1:8000``.
A record whose process is gone (an ``up`` that was killed) is ignored and deleted.

Why one file per process rather than one per user: two ``up`` on a host (another
``--worker-id`` and ``--port``) each keep their own, and the one stopping removes only its own.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgspec
from llm_lab_router.config import state_base


class UpRecord(msgspec.Struct, kw_only=True):
    url: str  # the router's base URL, as a client on this host reaches it
    pid: int
    worker_id: str
    started_at: float


def records_dir() -> Path:
    return state_base() / "up"


def client_url(host: str, port: int) -> str:
    """The URL a client on this host uses for a router bound to ``host``: a wildcard bind is
    reached on loopback."""
    reach = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


def record(url: str, worker_id: str) -> Path:
    """Record that this process serves ``url``; returns the file, for ``forget``."""
    directory = records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(UpRecord(url=url, pid=os.getpid(), worker_id=worker_id,
                                                 started_at=time.time())))
    tmp.replace(path)  # a reader never sees half a record
    return path


def forget(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone already, or not ours to delete: nothing to do
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid: not our up
        return False
    return True


def running_ups() -> list[UpRecord]:
    """The records of ``up`` processes still running, most recently started first."""
    found: list[UpRecord] = []
    for path in records_dir().glob("*.json"):
        try:
            rec = msgspec.json.decode(path.read_bytes(), type=UpRecord)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        if _alive(rec.pid):
            found.append(rec)
        else:
            forget(path)
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def recorded_url() -> str | None:
    """The URL of the most recently started running ``up`` on this host, if any."""
    ups = running_ups()
    return ups[0].url if ups else None
