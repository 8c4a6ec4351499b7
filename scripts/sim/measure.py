"""The scale benchmark: the simulated fleet (``fleet``) on a private Redis under M real routers.

For each (hosts, routers) point it measures, on this machine:

- at rest (the fleet heartbeats, publishes devices, changes states and ships logs; no request):
  each router's CPU (% of a core, from /proc via psutil) and RSS, redis-server's CPU, its
  commands/s (``INFO`` ``total_commands_processed`` delta) and ``used_memory``;
- state propagation: a probe host (this process, speaking the worker protocol) flips a model
  between running and stopped; every router is polled (``GET /v1/models/sim-probe``, a small
  answer, every ``--poll-ms``, only while a flip is in flight) until it shows the new state;
  the delay from the write is the propagation time (its resolution is the poll interval);
- the hot path: chat requests to router 0 alternating with the same request straight to the
  engine, for ``--hot-seconds`` while the fleet keeps changing; "added" = router - direct;
- time of ``/v1/models``, ``/api/devices/info``, ``/metrics`` and of the dashboard's first
  render in headless Chromium (when installed): navigate to ``/ui/`` until every host card
  and the chat model's status are shown.

Results: a JSON file and a Markdown table on stdout; ``--svg`` draws cost against hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from llm_lab_router.lifeline import stop_group
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_server import RedisServer, free_port
from llm_lab_router.redis_url import async_client

from scripts.bench.procs import ROOT, Procs
from scripts.sim.fleet import CHAT, Fleet, make_host

PROBE = "sim-probe"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", default="2,50,200,500", help="comma-separated host counts")
    p.add_argument("--routers", default="4,16", help="comma-separated router counts")
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--engines", type=int, default=2, help="real mock engines behind the running instances")
    p.add_argument("--change-rate", type=float, default=1.0, help="state changes per host per minute")
    p.add_argument("--devices-interval", type=float, default=5.0)
    p.add_argument("--rest-seconds", type=float, default=8.0)
    p.add_argument("--settle-seconds", type=float, default=3.0, help="wait after the routers synced")
    p.add_argument("--probes", type=int, default=15)
    p.add_argument("--poll-ms", type=float, default=5.0)
    p.add_argument("--hot-seconds", type=float, default=4.0)
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--label", default="after", help="the name of this checkout's figures")
    p.add_argument("--baseline", type=Path, help="a checkout of another release (e.g. `git archive REV`): each "
                   "point is measured with its fleet and routers first, then with this checkout's, side by side")
    p.add_argument("--baseline-label", default="before")
    p.add_argument("--out", type=Path, default=Path("scale.json"))
    p.add_argument("--svg", type=Path, help="also draw cost against hosts (scripts/plots.py; needs the `plots` extra)")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            total += sum(child.cpu_times()[:2])
        return total
    except psutil.Error:
        return 0.0


def rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20
    except psutil.Error:
        return 0.0


class Point:
    """One (hosts, routers) point: its processes, then its measurements."""

    def __init__(self, opts: argparse.Namespace, procs: Procs, work: Path, engines: list[str], hosts: int,
                 routers: int, session: aiohttp.ClientSession, root: Path = ROOT, label: str = "") -> None:
        """``root``: the checkout whose fleet and routers run (another release's, to compare)."""
        self.opts, self.procs, self.work, self.engines = opts, procs, work, engines
        self.root, self.label = root, label
        self.n_hosts, self.n_routers, self.http = hosts, routers, session
        self.result: dict = {"hosts": hosts, "routers": routers, "models": opts.models}

    async def run(self, browser: "Browser | None") -> dict:
        o = self.opts
        tag = f"{self.label}p{self.n_hosts}x{self.n_routers}"
        server = RedisServer(self.work / f"redis-{tag}", extra=["--appendonly", "no", "--save", ""]).start()
        self.redis_pid = server.proc.pid  # type: ignore[union-attr]
        rds = async_client(server.url)
        keys = Keys()
        probe_host = make_host(f"sim-probe-{os.getpid()}", [PROBE], "")
        probe = Fleet(rds, keys, [probe_host], self.engines, change_rate=0, log_rate=0)
        stop_probe = asyncio.Event()
        fleet_proc = router_procs = None
        try:
            ready = self.work / f"ready-{tag}"
            fleet_proc = self.fleet_proc = self.procs.start(f"fleet-{tag}", [
                sys.executable, "-m", "scripts.sim", "fleet", "--redis", server.url, "--hosts", str(self.n_hosts),
                "--models", str(o.models), "--engines", ",".join(self.engines), "--change-rate", str(o.change_rate),
                "--devices-interval", str(o.devices_interval), "--tag", tag, "--ready-file", str(ready)], cwd=self.root)
            probe_task = asyncio.create_task(probe.run(stop_probe))
            await self._until(lambda: ready.exists(), 120, "the fleet to publish")
            ports = [free_port() for _ in range(self.n_routers)]
            router_procs = [self.procs.start(f"router-{tag}-{n}", [
                sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", server.url, "--port", str(port)],
                cwd=self.root)
                for n, port in enumerate(ports)]
            self.urls = [f"http://127.0.0.1:{port}" for port in ports]
            self.router_pids = [p.pid for p in router_procs]
            await self._synced()
            await asyncio.sleep(o.settle_seconds)
            await self._rest(rds)
            await self._propagation(probe, probe_host)
            await self._hot_path()
            await self._endpoints()
            if browser is not None:
                self.result["dashboard_ms"] = await browser.first_render(f"{self.urls[0]}/ui/", self.n_hosts + 1)
            self.procs.check_alive()
        finally:
            stop_probe.set()
            for proc in [*(router_procs or []), *([fleet_proc] if fleet_proc else [])]:
                stop_group(proc, signal.SIGTERM, 10.0, reap=2.0)
            self.procs.procs = [(name, p) for name, p in self.procs.procs if p.poll() is None]
            await rds.aclose()
            server.stop()
        return self.result

    async def _until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await _value(predicate()):
            self.procs.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.2)

    async def _get(self, url: str) -> tuple[int, bytes]:
        async with self.http.get(url) as resp:
            return resp.status, await resp.read()

    async def _synced(self) -> None:
        """Every router sees every host (and the probe) and every model."""
        want = self.n_hosts + 1

        async def all_synced() -> bool:
            for url in self.urls:
                try:
                    status, body = await self._get(f"{url}/health")
                except aiohttp.ClientError:
                    return False
                if status != 200 or json.loads(body).get("workers") != want:
                    return False
            return True
        t0 = time.monotonic()
        await self._until(all_synced, 120, f"every router to see {want} workers")
        self.result["sync_s"] = round(time.monotonic() - t0, 2)

    async def _rest(self, rds) -> None:
        o = self.opts
        pids = self.router_pids
        cpu0 = [cpu_seconds(p) for p in pids]
        rcpu0 = cpu_seconds(self.redis_pid)
        fcpu0 = cpu_seconds(self.fleet_proc.pid)
        info0 = await rds.info("stats")
        t0 = time.monotonic()
        await asyncio.sleep(o.rest_seconds)
        dt = time.monotonic() - t0
        info1 = await rds.info("stats")
        router_cpu = [100 * (cpu_seconds(p) - c) / dt for p, c in zip(pids, cpu0)]
        mem = await rds.info("memory")
        self.result.update({
            "router_cpu_pct": round(statistics.median(router_cpu), 2),
            "router_cpu_pct_max": round(max(router_cpu), 2),
            "router_rss_mb": round(statistics.median(rss_mb(p) for p in pids), 1),
            "redis_cpu_pct": round(100 * (cpu_seconds(self.redis_pid) - rcpu0) / dt, 2),
            "redis_ops_s": round((info1["total_commands_processed"] - info0["total_commands_processed"]) / dt),
            "redis_mem_mb": round(mem["used_memory"] / 2**20, 1),
            "fleet_cpu_pct": round(100 * (cpu_seconds(self.fleet_proc.pid) - fcpu0) / dt, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),  # the whole machine (shared), at the window's end
        })

    async def _propagation(self, probe: Fleet, host) -> None:
        o = self.opts
        delays: list[float] = []
        timeouts = 0
        state = "stopped"
        for _ in range(o.probes):
            await asyncio.sleep(random.uniform(0.2, 0.4))
            state = "running" if state == "stopped" else "stopped"
            inst = host.set_state(PROBE, state, self.engines[0])
            t0 = time.monotonic()
            await probe.write_instance(host, inst)
            results = await asyncio.gather(*(self._watch(url, state, t0) for url in self.urls))
            delays += [d for d in results if d is not None]
            timeouts += sum(d is None for d in results)
        self.result.update({"prop_p50_ms": round(pct(delays, 0.5), 1), "prop_p99_ms": round(pct(delays, 0.99), 1),
                            "prop_max_ms": round(max(delays, default=float("nan")), 1), "prop_n": len(delays),
                            "prop_timeouts": timeouts})

    async def _watch(self, url: str, state: str, t0: float, timeout: float = 10.0) -> float | None:
        poll = self.opts.poll_ms / 1000
        while time.monotonic() - t0 < timeout:
            status, body = await self._get(f"{url}/v1/models/{PROBE}")
            if status == 200 and json.loads(body).get("status") == state:
                return (time.monotonic() - t0) * 1000
            await asyncio.sleep(poll)
        return None

    async def _hot_path(self) -> None:
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        headers = {"Content-Type": "application/json"}
        routed: list[float] = []
        direct: list[float] = []
        errors = 0
        end = time.monotonic() + self.opts.hot_seconds
        while time.monotonic() < end:
            for base, out in ((self.urls[0], routed), (self.engines[0], direct)):
                t0 = time.perf_counter()
                async with self.http.post(f"{base}/v1/chat/completions", data=body, headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 200
                out.append((time.perf_counter() - t0) * 1000)
        self.result.update({
            "hot_n": len(routed), "hot_errors": errors,
            "hot_router_p50_ms": round(pct(routed, 0.5), 2), "hot_router_p99_ms": round(pct(routed, 0.99), 2),
            "hot_direct_p50_ms": round(pct(direct, 0.5), 2), "hot_direct_p99_ms": round(pct(direct, 0.99), 2),
            "hot_added_p50_ms": round(pct(routed, 0.5) - pct(direct, 0.5), 2),
            "hot_added_p99_ms": round(pct(routed, 0.99) - pct(direct, 0.99), 2),
        })

    async def _endpoints(self) -> None:
        for name, path in (("models", "/v1/models"), ("devices", "/api/devices/info"), ("metrics", "/metrics")):
            times, size = [], 0
            for _ in range(5):
                t0 = time.perf_counter()
                status, body = await self._get(self.urls[0] + path)
                times.append((time.perf_counter() - t0) * 1000)
                size = len(body)
            self.result[f"{name}_ms"] = round(statistics.median(times), 2)
            self.result[f"{name}_kb"] = round(size / 1024, 1)


async def _value(v):
    return await v if asyncio.iscoroutine(v) else v


class Browser:
    """Headless Chromium over the DevTools protocol: time to the dashboard's first full render."""

    def __init__(self, procs: Procs, work: Path, session: aiohttp.ClientSession) -> None:
        self.procs, self.work, self.http = procs, work, session
        self._ids = iter(range(1, 1 << 30))

    async def start(self) -> None:
        profile = self.work / "chromium-profile"
        profile.mkdir(exist_ok=True)
        self.procs.start("chromium", [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",  # type: ignore[list-item]
                                      "--disable-background-networking", "--disable-component-update",
                                      "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "--window-size=1440,900", "about:blank"])
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            page = next(t for t in await resp.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        await self.send("Page.enable")

    async def send(self, method: str, **params) -> dict:
        mid = next(self._ids)
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == mid:
                return msg.get("result", {})

    async def first_render(self, url: str, hosts: int, timeout: float = 60) -> float:
        await self.send("Page.navigate", url="about:blank")
        check = (f"document.querySelectorAll('[data-testid^=\"host-\"]').length >= {hosts} && "
                 f"(document.querySelector('[data-testid=\"status-{CHAT}\"]')?.textContent ?? '') === 'running'")
        t0 = time.monotonic()
        await self.send("Page.navigate", url=url)
        while time.monotonic() - t0 < timeout:
            res = await self.send("Runtime.evaluate", expression=check, returnByValue=True)
            if res.get("result", {}).get("value"):
                return round((time.monotonic() - t0) * 1000)
            await asyncio.sleep(0.02)
        return float("nan")


async def run(opts: argparse.Namespace) -> int:
    if opts.svg:  # matplotlib only when a plot is asked for; a missing `plots` extra fails now, not after the run
        from scripts.plots import PLOTS
    work = Path(tempfile.mkdtemp(prefix="llm-sim-"))
    procs = Procs(work)
    sides = ([(opts.baseline_label, opts.baseline.resolve())] if opts.baseline else []) + [(opts.label, ROOT)]
    runs = [{"label": label, "root": str(root), "points": []} for label, root in sides]
    points = [(h, r) for h in map(int, opts.hosts.split(",")) for r in map(int, opts.routers.split(","))]
    try:
        engines = []
        for n in range(opts.engines):
            port = free_port()
            procs.start(f"engine-{n}", [sys.executable, str(ROOT / "scripts" / "mock_engine.py"), "--port", str(port),
                                        "--model", CHAT, "--quiet"])
            engines.append(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            for url in engines:
                await _wait_http(session, f"{url}/health")
            browser = None
            if CHROMIUM and not opts.no_browser:
                browser = Browser(procs, work, session)
                await browser.start()
            for hosts, routers in points:
                for run_, (label, root) in zip(runs, sides):
                    print(f"# {label}: {hosts} hosts x {opts.models} models, {routers} routers ...", file=sys.stderr,
                          flush=True)
                    point = Point(opts, procs, work, engines, hosts, routers, session, root, label)
                    run_["points"].append(await point.run(browser))
                    print(json.dumps(run_["points"][-1]), file=sys.stderr, flush=True)
                    opts.out.write_text(json.dumps({"args": _args(opts), "machine": _machine(), "runs": runs},
                                                   indent=1))
    finally:
        procs.stop_all()
    for run_ in runs:
        print(f"\n{run_['label']}:\n{table(run_['points'])}")
    if opts.svg:
        PLOTS["scale"].write({"runs": runs}, opts.svg)
    return 0


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}


def _args(opts: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}


async def _wait_http(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


COLUMNS = [("hosts", "hosts"), ("routers", "routers"), ("router_cpu_pct", "router CPU %"),
           ("router_rss_mb", "router RSS MB"), ("redis_cpu_pct", "Redis CPU %"), ("redis_ops_s", "Redis cmd/s"),
           ("redis_mem_mb", "Redis MB"), ("prop_p50_ms", "prop p50 ms"), ("prop_p99_ms", "prop p99 ms"),
           ("hot_added_p50_ms", "added p50 ms"), ("hot_added_p99_ms", "added p99 ms"),
           ("models_ms", "/v1/models ms"), ("devices_ms", "devices ms"), ("metrics_ms", "/metrics ms"),
           ("dashboard_ms", "dashboard ms"), ("fleet_cpu_pct", "fleet CPU %"), ("loadavg_1m", "load")]


def table(points: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for p in points:
        lines.append("| " + " | ".join(str(p.get(k, "")) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)
