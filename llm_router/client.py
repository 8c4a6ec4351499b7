"""Client commands of ``llm-router`` (``models``, ``start``, ``stop``, ``logs``, ``devices``,
``status``): thin wrappers over the router's HTTP API, for operators and for scripts.

Why the stdlib for HTTP: every call is one short request (or one SSE stream) from a
process that lives a few seconds, so an event loop buys nothing and ``urllib`` keeps the
command importable anywhere the package is.

Exit codes are part of the interface, so scripts can branch on them:

====  ===========================================================
0     ok
1     the operation failed (start failed, timed out, 5xx, 503 ...)
2     usage error (click's own, or a 400 from the router)
3     router unreachable (one line on stderr, no traceback)
4     not found (404: unknown model)
====  ===========================================================

``--json`` prints the router's JSON as is (one document, or one per line for ``logs``).
Otherwise the commands print their own English, worded from the answer's fields (``model``,
``workers``, ``deleted`` ...), never the API's ``message``, which keeps the manual's Chinese.

The router: ``--url``, else ``LLM_ROUTER_URL``, else the URL a running ``llm-router up`` on
this host recorded (``llm_router.up_url``), else ``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import csv
import functools
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import click
from llm_lab_router.sse import sse_events

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 1, 2, 3, 4
POLL_INTERVAL = 0.5


class CliError(click.ClickException):
    """A failure worded for the operator, carrying its exit code (click prints ``Error: …``)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, body: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.body = body  # the router's error body, when it sent one


def _exit_code_for(status: int) -> int:
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 400:
        return EXIT_USAGE
    return EXIT_FAILED


def _error_message(body: Any, fallback: str) -> str:
    """The message of an ``/api`` error (``{"success": false, "message"}``) or an OpenAI one."""
    if isinstance(body, dict):
        if isinstance(body.get("message"), str):
            return body["message"]
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
    return fallback


@dataclass
class Api:
    """The router's HTTP API. Every failure becomes a ``CliError`` with the right exit code."""

    url: str
    api_key: str = ""
    timeout: float = 30.0

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "llm-router-cli"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def endpoint(self, path: str, **params: Any) -> str:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self.url.rstrip("/") + path + (f"?{query}" if query else "")

    def _unreachable(self, exc: BaseException) -> CliError:
        reason = getattr(exc, "reason", exc)
        return CliError(f"cannot reach the router at {self.url}: {reason} (give its URL with --url or "
                        f"LLM_ROUTER_URL)", EXIT_UNREACHABLE)

    def call(self, method: str, path: str, *, ok_statuses: tuple[int, ...] = (), **params: Any) -> tuple[int, Any]:
        """One request; returns (status, decoded JSON). Raises ``CliError`` on an error status
        unless it is listed in ``ok_statuses`` (``status`` reports an unhealthy router itself)."""
        req = urllib.request.Request(self.endpoint(path, **params), method=method, headers=self._headers(),
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            body = _decode(exc.read())
            if exc.code in ok_statuses:
                return exc.code, body
            raise CliError(_error_message(body, f"HTTP {exc.code} {exc.reason}"), _exit_code_for(exc.code),
                           body) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, **params)[1]

    def post(self, path: str, **params: Any) -> Any:
        return self.call("POST", path, **params)[1]

    def open_stream(self, path: str) -> tuple[http.client.HTTPResponse, socket.socket]:
        """Open an SSE stream; also return its socket so another thread can end the read."""
        parts = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=None)
        headers = {**self._headers(), "Accept": "text/event-stream"}
        try:
            conn.connect()
            sock = conn.sock
            conn.request("GET", parts.path.rstrip("/") + path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc) from None
        if resp.status >= 400:
            body = _decode(resp.read())
            conn.close()
            raise CliError(_error_message(body, f"HTTP {resp.status} {resp.reason}"), _exit_code_for(resp.status))
        return resp, sock


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {"message": data.decode("utf-8", "replace").strip()[:200]}


def json_events(lines: Iterable[bytes]) -> Iterator[tuple[str, dict]]:
    """``(last event id, data)`` for every event of a stream whose data is a JSON object
    (parsed by ``llm_router.sse``); comments are skipped, and a frame that is not JSON is
    skipped rather than ending the stream."""
    last_id = ""
    for event in sse_events(lines):
        last_id = last_id if event.id is None else event.id
        try:
            payload = event.json()
        except ValueError:
            continue
        if isinstance(payload, dict):
            yield last_id, payload


def format_log(log: dict) -> str:
    """``HH:MM:SS host stream message`` — the one line format of every log view."""
    ts = time.strftime("%H:%M:%S", time.localtime(float(log.get("timestamp") or 0)))
    return f"{ts} {log.get('host') or '-'} {log.get('stream') or 'stdout':<6} {log.get('message', '')}"


def describe_wait(reason: dict) -> str:
    """A model's pending reason (``router/control/explain.py``) in one line: why, position, the requests
    waiting on all routers and for how long, ETA."""
    eta, since = float(reason.get("eta") or 0), float(reason.get("since") or 0)
    parts = [str(reason.get("message") or reason.get("kind", "?"))]
    if reason.get("waiting"):
        parts.append(f"{reason['waiting']} request(s) waiting" + (f" for {max(0.0, time.time() - since):.0f}s"
                                                                   if since else ""))
    if eta:
        parts.append(f"ETA {max(0.0, eta - time.time()):.0f}s")
    return "; ".join(parts)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _mib(value: Any) -> str:
    return f"{int(value or 0)}"


def _alias_path(alias: str) -> str:
    return urllib.parse.quote(alias, safe="")


# --- options shared by every command ---

def router_url(given: str | None) -> str:
    """``--url`` or ``LLM_ROUTER_URL`` (``given``), else the running ``up``'s, else the default."""
    from llm_lab_router.up_url import recorded_url

    return given or recorded_url() or DEFAULT_URL


def api_command(func: Callable[..., None]) -> Callable[..., None]:
    """Adds ``--url`` and ``--json`` to a command and hands it an ``Api`` and the json flag."""

    @click.option("--json", "as_json", is_flag=True, help="Print the router's raw JSON (for scripts).")
    @click.option("--url", envvar="LLM_ROUTER_URL", default=None,
                  help="Router base URL (also LLM_ROUTER_URL). Default: the URL of the llm-router up running "
                       f"on this host, else {DEFAULT_URL}.")
    @functools.wraps(func)
    def wrapper(url: str | None, as_json: bool, **kwargs: Any) -> None:
        api = Api(router_url(url), os.environ.get("LLM_ROUTER_API_KEY", ""))
        func(api, as_json, **kwargs)

    return wrapper


def post_action(api: Api, path: str, what: str, **params: Any) -> Any:
    """POST an action; a failure on some hosts (``failed``: worker -> why) is worded here, in
    English, rather than the API's message."""
    try:
        return api.post(path, **params)
    except CliError as exc:
        failed = exc.body.get("failed") if isinstance(exc.body, dict) else None
        if not isinstance(failed, dict):
            raise
        reasons = "; ".join(f"{worker}: {why}" for worker, why in failed.items())
        raise CliError(f"could not {what} on {plural(len(failed), 'host')} ({reasons})", exc.exit_code) from None


def hosts_text(workers: list[str]) -> str:
    return ", ".join(workers) if workers else "no host"


def plural(count: int, word: str, many: str = "") -> str:
    """``1 host``, ``2 hosts``; ``many``: an irregular plural."""
    return f"{count} {word if count == 1 else many or word + 's'}"


worker_option = click.option("--worker", "worker", default=None, metavar="ID",
                             help="On this host only (a worker id, as `models` lists them).")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


# --- commands ---

@click.command()
@api_command
def models(api: Api, as_json: bool) -> None:
    """List every model of every live host, with its status."""
    body = api.get("/v1/models")
    if as_json:
        return _echo_json(body)
    rows = []
    for m in body.get("data", []):
        aliases = [a for a in m.get("aliases", []) if a != m.get("id")]
        hosts = [f"{i.get('worker')}:{i.get('state')}" for i in m.get("instances", [])]
        rows.append([m.get("id", ""), m.get("status", "-"), m.get("mode", "-"),
                     ",".join(aliases) or "-", " ".join(hosts) or "-"])
    click.echo(table(["ID", "STATUS", "MODE", "ALIASES", "HOSTS"], rows))


class LatestLog:
    """Follows a model's log stream in a thread and keeps only the latest line, so a start
    can show what the model is doing without polling logs. ``close()`` shuts the socket,
    which ends the blocked read at once (no lingering thread)."""

    def __init__(self, api: Api, alias: str) -> None:
        self.line = ""
        self._sock: socket.socket | None = None
        self._closed = False
        try:
            # tail=0: the history's last line would be the previous run's
            resp, self._sock = api.open_stream(f"/api/models/{_alias_path(alias)}/logs/stream?tail=0")
        except CliError:
            return  # the latest line is a nicety; the start itself still reports
        self._thread = threading.Thread(target=self._run, args=(resp,), daemon=True)
        self._thread.start()

    def _run(self, resp: http.client.HTTPResponse) -> None:
        try:
            for _, event in json_events(iter(resp.readline, b"")):
                log = event.get("log")
                if isinstance(log, dict) and log.get("message"):
                    self.line = str(log["message"])
        except (OSError, ValueError, http.client.HTTPException):
            pass

    def close(self) -> None:
        if self._sock is not None and not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._thread.join(2)


def progress(model: dict, worker: str | None) -> str:
    """How a start stands: the model's status, or, for a start on one host, its instance's state."""
    if worker is None:
        return model.get("status", "")
    return next((i.get("state", "") for i in model.get("instances", []) if i.get("worker") == worker), "stopped")


@click.command()
@api_command
@click.argument("alias")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the model to be running.")
@worker_option
def start(api: Api, as_json: bool, alias: str, timeout: float, worker: str | None) -> None:
    """Start a model and follow it until it is running (exit 0) or failed (exit 1)."""
    path = f"/api/models/{_alias_path(alias)}"
    api.post(f"{path}/start", wait="false", worker=worker)
    tty = sys.stdout.isatty() and not as_json
    latest = LatestLog(api, alias)
    deadline = time.monotonic() + timeout
    seen_starting, last_shown = False, ""
    try:
        while True:
            model = api.get(f"{path}/info").get("model", {})
            status = progress(model, worker)
            seen_starting = seen_starting or status == "starting"
            done = status in ("running", "failed") or (status == "stopped" and seen_starting)
            # "stopped" before any "starting" only means the worker has not picked the command up yet
            shown = "starting" if status == "stopped" and not seen_starting else status
            if tty:
                width = shutil.get_terminal_size((100, 20)).columns
                text = f"{alias}: {shown}" + (f"  {latest.line}" if latest.line and not done else "")
                click.echo("\r\x1b[2K" + text[: width - 1], nl=False)
            elif not as_json and shown != last_shown:  # a log file gets one line per change
                click.echo(f"{alias}: {shown}")
            last_shown = shown
            if done or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
    finally:
        latest.close()
        if tty:
            click.echo("")
    if as_json:
        _echo_json(model)
    if status == "running":
        urls = [f"{i.get('worker')} {i.get('url')}" for i in model.get("instances", [])
                if i.get("state") == "running" and worker in (None, i.get("worker"))]
        if not as_json:
            click.echo(f"{model.get('id', alias)} is running on {', '.join(urls)}")
        return
    if status in ("failed", "stopped"):
        errors = [f"{i.get('worker')}: {i['last_error']}" for i in model.get("instances", [])
                  if i.get("last_error") and worker in (None, i.get("worker"))]
        raise CliError(f"{alias} failed to start" + (f" ({'; '.join(errors)})" if errors else ""))
    raise CliError(f"{alias} is still {status or 'not running'} after {timeout:g}s")


@click.command()
@api_command
@click.argument("alias")
@worker_option
def stop(api: Api, as_json: bool, alias: str, worker: str | None) -> None:
    """Stop a model on every host (or on one, with --worker)."""
    body = post_action(api, f"/api/models/{_alias_path(alias)}/stop", f"stop {alias}", worker=worker)
    if as_json:
        return _echo_json(body)
    click.echo(f"{body.get('model', alias)} stopped on {hosts_text(body.get('workers', []))}")


@click.command("stop-all")
@api_command
def stop_all(api: Api, as_json: bool) -> None:
    """Stop every model on every host."""
    body = post_action(api, "/api/models/stop-all", "stop every model")
    if as_json:
        return _echo_json(body)
    models, workers = body.get("models", []), body.get("workers", [])
    stopped = f"stopped {plural(len(models), 'model')}" + (f" ({', '.join(models)})" if models else "")
    click.echo(f"{stopped} on {plural(len(workers), 'host')}")


@click.command()
@api_command
@click.argument("alias")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="Only the last N lines of history.")
@click.option("--clear", is_flag=True, help="Delete the model's log instead (all of it, or see --keep-minutes).")
@click.option("--keep-minutes", type=click.IntRange(min=0), default=None,
              help="With --clear: keep the entries of the last N minutes.")
def logs(api: Api, as_json: bool, alias: str, follow: bool, tail: int | None, clear: bool,
         keep_minutes: int | None) -> None:
    """Print a model's log (history, then live lines with -f), or delete it (--clear)."""
    if keep_minutes is not None and not clear:
        raise click.UsageError("--keep-minutes goes with --clear")
    if clear:
        return clear_logs(api, as_json, alias, keep_minutes)
    query = f"?tail={tail}" if tail is not None else ""  # else the router's default history
    resp, sock = api.open_stream(f"/api/models/{_alias_path(alias)}/logs/stream{query}")
    history: list[dict] = []

    def show(event: dict) -> None:
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
        elif isinstance(event.get("log"), dict):
            click.echo(format_log(event["log"]))

    def show_history() -> None:  # --tail is applied here too, whatever the router sent
        for item in history[max(0, len(history) - tail):] if tail is not None else history:
            show(item)
        history.clear()

    try:
        for _, event in json_events(iter(resp.readline, b"")):
            kind = event.get("type")
            if kind == "historical":
                history.append(event)
                continue
            show_history()
            if kind == "error":
                raise CliError(_error_message(event, "log stream error"))
            if kind == "stream_end" or (kind == "historical_complete" and not follow):
                return
            if kind == "realtime":
                show(event)
        show_history()
        if follow:
            raise CliError("the router closed the log stream")
    except KeyboardInterrupt:
        return
    finally:
        sock.close()


def clear_logs(api: Api, as_json: bool, alias: str, keep_minutes: int | None) -> None:
    """``logs --clear``: one POST, one English line."""
    body = api.post(f"/api/logs/{_alias_path(alias)}/clear", keep_minutes=keep_minutes)
    if as_json:
        return _echo_json(body)
    kept = f", kept the last {plural(body['keep_minutes'], 'minute')}" if body.get("keep_minutes") else ""
    click.echo(f"deleted {plural(int(body.get('deleted', 0)), 'log entry', 'log entries')} of "
               f"{body.get('model', alias)}{kept}")


@click.command()
@api_command
def devices(api: Api, as_json: bool) -> None:
    """GPU and CPU memory of every host (MiB)."""
    body = api.get("/api/devices/info")
    if as_json:
        return _echo_json(body)
    rows = []
    for wid, host in sorted((body.get("hosts") or {}).items()):
        name = f"{wid} ({host.get('host')})" if host.get("host") and host.get("host") != wid else wid
        cuda = host.get("cuda") or {}
        if cuda.get("online"):
            for gpu in cuda.get("gpus", []):
                rows.append([name, f"cuda:{gpu.get('index')}",
                             f"{_mib(gpu.get('memory_used'))}/{_mib(gpu.get('memory_total'))}",
                             f"{gpu.get('utilization', 0)}%", gpu.get("name", "")])
                name = ""
        else:
            rows.append([name, "cuda", "-", "-", f"offline: {cuda.get('error') or 'no GPU'}"])
            name = ""
        cpu = host.get("cpu") or {}
        rows.append([name, "cpu", f"{_mib(cpu.get('memory_used'))}/{_mib(cpu.get('memory_total'))}",
                     f"{cpu['cpu_percent']:.0f}%" if isinstance(cpu.get("cpu_percent"), (int, float)) else "-",
                     f"{cpu.get('cpu_count', '?')} cores"])
    if not rows:
        click.echo("no live hosts")
        return
    # NAME last: GPU names and offline reasons are long, and the last column is not padded
    click.echo(table(["HOST", "DEVICE", "USED/TOTAL MiB", "UTIL", "NAME"], rows))


@click.command()
@click.option("--redis", "redis_url", envvar="LLM_ROUTER_REDIS_URL", default=None,
              help="Also show which Redis node is master (asks the Sentinels of a redis+sentinel:// URL).")
@api_command
def status(api: Api, as_json: bool, redis_url: str | None) -> None:
    """Router health, model counts and a one-line summary per host; with ``--redis``, the Redis
    master and replicas. Exit 1 if unhealthy or Redis has no master."""
    redis_line, redis_info = _redis_status(redis_url) if redis_url else (None, None)
    code, health = api.call("GET", "/health", ok_statuses=(503,))
    healthy = code == 200 and health.get("status") == "healthy"
    # a degraded router still serves its last view, and a 503 on devices only means that no
    # worker has published metrics yet: both are part of the summary, not a reason to stop
    model_list = api.call("GET", "/v1/models", ok_statuses=(503,))[1].get("data", [])
    hosts = api.call("GET", "/api/devices/info", ok_statuses=(503,))[1].get("hosts") or {}
    if as_json:
        _echo_json({"health": health, "models": model_list, "hosts": hosts,
                    **({"redis": redis_info} if redis_url else {})})
    else:
        extra = ", ".join(f"{k}: {v}" for k, v in health.items()
                          if k not in ("status", "models_count", "running_models"))
        click.echo(f"router   {api.url}  {health.get('status', 'unknown')}" + (f" ({extra})" if extra else ""))
        if redis_line:
            click.echo(redis_line)
        counts: dict[str, int] = {}
        for m in model_list:
            counts[m.get("status", "?")] = counts.get(m.get("status", "?"), 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        click.echo(f"models   {len(model_list)}" + (f" ({detail})" if detail else ""))
        for m in model_list:
            if pending := m.get("pending"):
                click.echo(f"waiting  {m.get('id')}: {describe_wait(pending)}")
        click.echo(f"hosts    {len(hosts)}")
        for wid, host in sorted(hosts.items()):
            running = [m["id"] for m in model_list
                       if any(i.get("worker") == wid and i.get("state") == "running" for i in m.get("instances", []))]
            cuda, cpu = host.get("cuda") or {}, host.get("cpu") or {}
            gpus = cuda.get("gpus", [])
            gpu_text = (f"{len(gpus)} GPU {sum(g.get('memory_used', 0) for g in gpus)}/"
                        f"{sum(g.get('memory_total', 0) for g in gpus)} MiB") if gpus else "no GPU"
            if not cuda.get("online"):
                gpu_text = "GPU offline"
            click.echo(f"  {wid:<12} {gpu_text}  cpu {_mib(cpu.get('memory_used'))}/{_mib(cpu.get('memory_total'))} MiB"
                       f"  running: {', '.join(running) or '-'}")
    if not healthy:
        raise CliError(f"router is {health.get('status', 'unhealthy')}")
    if redis_info is not None and "error" in redis_info:
        raise CliError(f"redis: {redis_info['error']}")


def _redis_status(url: str) -> tuple[str, dict[str, Any]]:
    """The ``redis`` line of ``status`` and its JSON: which node is master, asked now."""
    import redis
    from llm_lab_router.redis_url import describe, redis_nodes

    try:
        nodes = redis_nodes(url)
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"redis    {describe(url)}  no master: {exc}", {"url": describe(url), "error": str(exc)}
    replicas = ", ".join(nodes.replicas) or "none"
    return (f"redis    master {nodes.master}  replicas: {replicas}  ({nodes.via})",
            {"url": describe(url), "master": nodes.master, "replicas": nodes.replicas, "via": nodes.via})


@click.command()
@click.option("--host", "host", default=None, metavar="ID", help="This host only (a worker id).")
@api_command
def plan(api: Api, as_json: bool, host: str | None) -> None:
    """What fits where: per host and GPU, what starting a model now would evict, models that
    fit nowhere, estimates far from their measurement (VRAM in MiB per GPU)."""
    from llm_lab_router.plan_text import plan_text

    body = api.get("/api/plan", **({"worker": host} if host else {}))
    if as_json:
        return _echo_json(body)
    click.echo(plan_text(body))


@click.command()
@api_command
@click.option("--since", default="1d", show_default=True, help="How far back: 90s, 15m, 12h, 1d, 2w.")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=1000, show_default=True,
              help="At most this many entries, the latest ones.")
def audit(api: Api, as_json: bool, since: str, limit: int) -> None:
    """Who started, stopped, evicted or cleared what, when and from where (an admin key)."""
    body = api.get("/api/audit", since=since, limit=limit)
    if as_json:
        return _echo_json(body)
    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("at", 0))), e.get("who", "-"),
             e.get("action", "-"), e.get("model") or ",".join(e.get("models", [])) or "-", e.get("host") or "-",
             e.get("client") or "-", e.get("result", "ok"),
             "; ".join(x for x in (", ".join(e.get("models", [])) if e.get("model") else "", e.get("detail", ""))
                       if x)]
            for e in body.get("entries", [])]
    click.echo(table(["WHEN", "WHO", "ACTION", "MODEL", "HOST", "CLIENT", "RESULT", "DETAIL"], rows)
               if rows else f"no action recorded in the last {since}")


USAGE_COLUMNS = ("requests", "errors", "tokens_in", "tokens_out", "tokens_estimated", "gpu_hours")


@click.command()
@api_command
@click.option("--since", default="30d", show_default=True, help="How far back: 12h, 7d, 30d, 2w.")
@click.option("--by", type=click.Choice(["group", "key", "model"]), default="key", show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated values, a header line first.")
def usage(api: Api, as_json: bool, since: str, by: str, as_csv: bool) -> None:
    """Requests, errors, tokens and GPU hours per key, group or model (a client key: its own)."""
    body = api.get("/api/usage", since=since, by=by)
    if as_json:
        return _echo_json(body)
    rows = [[r.get("name", ""), *(r.get(c, 0) for c in USAGE_COLUMNS)] for r in [*body.get("rows", []), body["total"]]]
    if as_csv:
        out = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
        out.writerow((by, *USAGE_COLUMNS))
        out.writerows(rows)
        return
    click.echo(table([by.upper(), "REQUESTS", "ERRORS", "TOKENS IN", "TOKENS OUT", "ESTIMATED", "GPU HOURS"],
                     [[str(v) if not isinstance(v, float) else f"{v:.3f}" for v in row] for row in rows]))


COMMANDS = [models, start, stop, stop_all, logs, devices, status, plan, audit, usage]


def register(group: click.Group) -> None:
    """Add the client commands to the ``llm-router`` group (called once by ``llm_router.cli``)."""
    for command in COMMANDS:
        group.add_command(command)
