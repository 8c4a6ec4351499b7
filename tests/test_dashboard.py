"""The web dashboard (``/ui/``): its routes, then a real headless Chromium against the real stack.

The browser is Debian's ``chromium`` driven over the DevTools protocol with aiohttp's
websocket client (no Selenium, no new dependency). It runs in its own process group through
the ``procs`` fixture, so teardown kills it and every helper process it forked. Without
chromium the browser test is skipped with the reason; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import tornado.web
from conftest import ROOT, wait_for
from helpers import STACK_WORKER as WORKER
from helpers import request, start_stack
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.app import make_app
from llm_lab_router.router.http.dashboard import STATIC_DIR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"


# --------------------------------------------------------------------------- routes only

@pytest.fixture
def app() -> tornado.web.Application:
    """The router's application (its /ui routes come from router/http/routes.py); no API route
    is called, so the services are a stand-in with the options only."""
    return make_app(SimpleNamespace(options=RouterOptions()))  # type: ignore[arg-type]


@pytest.mark.gen_test
async def test_ui_redirects_and_serves_versioned_assets(http_client, base_url: str) -> None:
    resp = await http_client.fetch(f"{base_url}/ui", follow_redirects=False, raise_error=False)
    assert resp.code in (301, 302) and resp.headers["Location"] == "/ui/"

    page = await http_client.fetch(f"{base_url}/ui/")
    html = page.body.decode()
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Cache-Control"] == "no-cache"
    assert 'data-testid="models-body"' in html
    versioned = [part.split('"')[0] for part in html.split('src="')[1:] + html.split('href="')[1:]
                 if part.startswith(("app.js?v=", "style.css?v="))]
    assert len(versioned) == 2, html

    for asset in versioned:  # versioned: cached for long; the version changes with the content
        resp = await http_client.fetch(f"{base_url}/ui/{asset}")
        assert "max-age=" in resp.headers["Cache-Control"] and resp.headers["Cache-Control"] != "no-cache"
        assert resp.body == (STATIC_DIR / asset.split("?")[0]).read_bytes()
    resp = await http_client.fetch(f"{base_url}/ui/app.js")
    assert resp.headers["Cache-Control"] == "no-cache"

    missing = await http_client.fetch(f"{base_url}/ui/nope.js", raise_error=False)
    assert missing.code == 404
    escape = await http_client.fetch(f"{base_url}/ui/../dashboard.py", raise_error=False)
    assert escape.code in (403, 404)


# --------------------------------------------------------------------------- DevTools driver

class DevTools:
    """A minimal DevTools-protocol session on one page: commands, JS evaluation, real clicks."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.errors: list[str] = []  # uncaught page exceptions and console errors
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.waiting:
                self.waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in data["params"]["args"]))

    async def send(self, method: str, **params: Any) -> dict:
        msg_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait(self, expression: str, timeout: float = 20, message: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {message or expression}")
            await asyncio.sleep(0.1)

    async def click(self, testid: str) -> None:
        """A real mouse click at the element's centre (not ``el.click()``): what a person does."""
        rect = await self.wait(f"""(() => {{
            const el = document.querySelector('[data-testid="{testid}"]');
            if (!el || el.disabled) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
        }})()""", message=f"clickable {testid}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=rect["x"], y=rect["y"],
                            button="left", clickCount=1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


def launch_chromium(procs, tmp_path: Path, width: int = 1440, height: int = 900) -> int:
    """Start headless Chromium in its own process group; return its DevTools port."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = procs.start([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--remote-debugging-port=0",
                        f"--window-size={width},{height}", "about:blank"], name="chromium")
    port_file = profile / "DevToolsActivePort"

    def port() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited: {procs.log(proc)[-2000:]}")
        text = port_file.read_text() if port_file.exists() else ""
        return int(text.split()[0]) if text.strip() else None

    # 60 s: on a loaded 2-core machine a cold Chromium once took over 30 s to open its port
    return wait_for(port, timeout=60, interval=0.1, message="chromium's DevTools port")


async def open_page(devtools_port: int, session: aiohttp.ClientSession) -> DevTools:
    async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as resp:
        targets = await resp.json()
    page = next(t for t in targets if t["type"] == "page")
    ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
    dt = DevTools(ws)
    await dt.send("Runtime.enable")
    await dt.send("Page.enable")
    return dt


# --------------------------------------------------------------------------- real stack

DEMO_TOML = """
[worker]
port_range = [%(port)d, %(port_end)d]
heartbeat_interval = 0.5
devices_interval = 0.5

[[models]]
id = "tiny"
aliases = ["gpt-3.5-turbo"]
command = ["{python}", "%(engine)s", "--port", "{port}", "--model", "{id}", "--startup-delay", "3"]
startup_timeout = 30

[[models]]
id = "embedder"
aliases = ["text-embedding-ada-002"]
mode = "embedding"
command = ["{python}", "%(engine)s", "--port", "{port}", "--model", "{id}"]
"""


def start_dashboard_stack(procs, redis_url: str, tmp_path: Path) -> str:
    """The real worker and router serving the demo models; fails clearly if /ui/ is not mounted."""
    url = start_stack(procs, redis_url, tmp_path, DEMO_TOML)
    try:
        urllib.request.urlopen(f"{url}/ui/", timeout=5).close()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}/ui/ answers {exc.code}: the /ui rows of router/http/routes.py are missing") from None
    return url


def text_of(testid: str) -> str:
    return f"""(document.querySelector('[data-testid="{testid}"]')?.textContent ?? "")"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_in_a_real_browser(procs, redis_url: str, tmp_path: Path) -> None:
    url = start_dashboard_stack(procs, redis_url, tmp_path)
    devtools_port = launch_chromium(procs, tmp_path)
    asyncio.run(drive_dashboard(url, devtools_port))


async def drive_dashboard(url: str, devtools_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/")

            # the demo models, the host and the router's health are shown
            await page.wait(f"{text_of('status-tiny')} === 'stopped' && {text_of('status-embedder')} === 'stopped'",
                            message="both demo models listed as stopped")
            assert "gpt-3.5-turbo" in await page.js(text_of("row-tiny"))
            await page.wait(f"{text_of('host-' + WORKER)}.includes('RAM')", message="the host with its memory")
            assert await page.js("document.querySelector('[data-testid=health]').dataset.state") == "ok"
            assert "healthy" in await page.js(text_of("health-text"))

            # open tiny's log, record the 'latest line' shown while it starts, then click Start
            await page.click("row-tiny")
            await page.wait(f"{text_of('log-model')} === 'tiny' && "
                            "document.querySelector('[data-testid=log-conn]').dataset.state === 'live'",
                            message="log view following tiny")
            await page.js("""window.__latest = new Set();
                new MutationObserver(() => {
                  const el = document.querySelector('[data-testid="latest-tiny"]');
                  if (el) window.__latest.add(el.textContent);
                }).observe(document.body, {subtree: true, childList: true, characterData: true}); true""")
            await page.click("start-tiny")
            await page.wait(f"{text_of('status-tiny')} === 'starting'", timeout=5, message="tiny starting")
            await page.wait(f"{text_of('status-tiny')} === 'running'", timeout=30, message="tiny running")
            latest = await page.js("[...window.__latest]")
            assert any("loading model tiny" in line for line in latest), latest

            # the engine's log lines arrived live, with their host and stream
            lines = await page.wait("""(() => {
                const rows = [...document.querySelectorAll('[data-testid=log-view] .ln:not(.marker)')];
                const text = rows.map(r => r.textContent);
                return text.some(t => t.includes('ready; listening')) ? rows.map(r => ({
                  host: r.querySelector('.h').textContent, stream: r.querySelector('.s').textContent,
                  message: r.querySelector('.m').textContent})) : null;
            })()""", message="the engine's 'ready' line in the log view")
            assert any(ln["host"] == WORKER and ln["stream"] == "stdout" and "loading model tiny" in ln["message"]
                       for ln in lines), lines
            instances = await page.js(text_of("row-tiny"))
            assert "pid " in instances and "127.0.0.1:" in instances, instances
            # the engine's address is text: a link to 127.0.0.1 is wrong from another machine
            assert await page.js("!document.querySelector('[data-testid=row-tiny] a')"), "an instance links its engine"
            await page.wait("!!document.querySelector('[data-testid=stop-tiny]')", message="a Stop button")

            await asyncio.sleep(0.5)  # let the bars' width transition settle for the picture
            await page.screenshot(SCREENSHOT)
            assert SCREENSHOT.stat().st_size > 10_000

            await page.click("stop-tiny")
            await page.wait(f"{text_of('status-tiny')} === 'stopped'", timeout=20, message="tiny stopped")
            await page.wait("!!document.querySelector('[data-testid=start-tiny]')", message="Start offered again")

            # each instance has its own Start/Stop, which name its host (?worker=)
            await page.js("""window.__posts = []; const realFetch = window.fetch;
                window.fetch = (url, opts) => { if (opts?.method === 'POST') window.__posts.push(String(url));
                                                return realFetch(url, opts); }; true""")
            await page.click(f"start-tiny@{WORKER}")
            await page.wait(f"{text_of('status-tiny')} === 'running'", timeout=30, message="tiny running on its host")
            await page.click(f"stop-tiny@{WORKER}")
            await page.wait(f"{text_of('status-tiny')} === 'stopped'", timeout=20, message="tiny stopped on its host")
            assert await page.js("window.__posts") == [f"/api/models/tiny/start?worker={WORKER}&wait=false",
                                                       f"/api/models/tiny/stop?worker={WORKER}"]
            assert page.errors == [], page.errors
        except BaseException:
            await page.screenshot(SCREENSHOT.with_name("dashboard-failure.png"))  # what the page showed
            raise
        finally:
            await page.close()


# --------------------------------------------------------------------------- a model that waits

@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_shows_why_a_model_waits(procs, redis_url: str, tmp_path: Path) -> None:
    """A request waits for a swap (``a`` holds the stand-in GPU for its ``min_residency``): the
    waiting model's row says why, its position, the requests waiting and the ETA, readably; a
    model started from the dashboard that must wait behind it says so too (not "starting")."""
    from test_placement import gpu_model, uid
    from test_scheduling import b_waits_for_a

    c = uid("c")
    with b_waits_for_a(procs, redis_url, tmp_path, extra=(gpu_model(c, 12000),)) as (a, b, (router,)):
        devtools_port = launch_chromium(procs, tmp_path)
        asyncio.run(drive_waiting(router.url, devtools_port, a, b, c))


async def drive_waiting(url: str, devtools_port: int, a: str, b: str, c: str) -> None:
    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/")
            text = await page.wait(f"{text_of('pending-' + b)}", message="b's pending line")
            for part in ("position 1", f"'{a}' stays loaded", "min_residency", "1 request waiting for ", "ETA 9m"):
                assert part in text, text
            # readable: the whole line shows (wrapped in its cell, not clipped by it)
            fit = await page.js(f"""(() => {{
                const el = document.querySelector('[data-testid="pending-{b}"]');
                const cell = el.closest('td');
                return {{line: [el.scrollWidth, el.clientWidth], cell: [cell.scrollWidth, cell.clientWidth],
                         shown: el.getBoundingClientRect().bottom <= cell.getBoundingClientRect().bottom}};
            }})()""")
            assert fit["line"][0] <= fit["line"][1] and fit["cell"][0] <= fit["cell"][1] and fit["shown"], fit
            # a model that requests wait for is not "stopped" and offers no Start (it will start)
            assert await page.js(text_of("status-" + b)) == "waiting"
            assert await page.js(f"!document.querySelector('[data-testid=\"start-{b}\"]')")
            # Start clicked on a model that must wait behind b: the row says so, with its place
            await page.click("start-" + c)
            await page.wait(f"{text_of('status-' + c)} === 'waiting' && "
                            f"{text_of('pending-' + c)}.includes(\"position 2): '{b}' has waited longer\")",
                            timeout=10, message="c waiting behind b after its Start click")
            await page.screenshot(SCREENSHOT.with_name("dashboard-waiting.png"))
            assert page.errors == [], page.errors
        except BaseException:
            await page.screenshot(SCREENSHOT.with_name("dashboard-waiting-failure.png"))
            raise
        finally:
            await page.close()


# --------------------------------------------------------------------------- prefetch and plan

@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_shows_a_prefetch_and_the_plan(procs, redis_url: str, tmp_path: Path) -> None:
    """``b`` waits behind ``a`` (issue 29): its instance line shows its weights prefetched on
    the host, and the host card shows the plan: starting ``b`` would evict ``a``; the two fit
    the GPU one at a time."""
    from test_prefetch import prefetch_stack

    wid, a, b, _, router, thread, results = prefetch_stack(procs, redis_url, tmp_path, 8, prefetch_reserve_mb=0)
    try:
        devtools_port = launch_chromium(procs, tmp_path)
        asyncio.run(drive_plan(router.url, devtools_port, wid, a, b))
    finally:
        request("POST", f"{router.url}/api/models/{a}/stop", timeout=30)
        thread.join(60)
    assert results["b"].status == 200


async def drive_plan(url: str, devtools_port: int, wid: str, a: str, b: str) -> None:
    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/")
            await page.wait(f"{text_of(f'prefetch-{b}@{wid}')} === 'prefetched 8 / 8 MiB'", message="b's prefetch")
            line = await page.wait(f"{text_of(f'plan-{wid}-{b}')}", message="the plan of b")
            assert line == f"{b} 11.7 GiB declared · would evict {a}", line
            together = await page.js(text_of(f"together-{wid}"))
            assert together in (f"fit together: {{{a}}} · {{{b}}}", f"fit together: {{{b}}} · {{{a}}}"), together
            assert page.errors == [], page.errors
        except BaseException:
            await page.screenshot(SCREENSHOT.with_name("dashboard-plan-failure.png"))
            raise
        finally:
            await page.close()


# --------------------------------------------------------------------------- the lab panel


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_shows_usage_and_the_audit_trail(procs, redis_url: str, tmp_path: Path) -> None:
    url = start_dashboard_stack(procs, redis_url, tmp_path)
    post = urllib.request.Request(f"{url}/api/models/embedder/start", method="POST")
    urllib.request.urlopen(post, timeout=30).close()
    embed = urllib.request.Request(f"{url}/v1/embeddings", method="POST", headers={"Content-Type": "application/json"},
                                   data=json.dumps({"model": "embedder", "input": "hello"}).encode())
    urllib.request.urlopen(embed, timeout=30).close()

    def used() -> bool:
        with urllib.request.urlopen(f"{url}/api/usage?by=group", timeout=5) as resp:
            return any(r["name"] == "-" and r["requests"] >= 1 for r in json.load(resp)["rows"])
    wait_for(used, timeout=10, message="the request in the usage ledger")
    devtools_port = launch_chromium(procs, tmp_path)
    asyncio.run(drive_lab(url, devtools_port))


async def drive_lab(url: str, devtools_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/")
            audit = await page.wait(f"(() => {{ const t = {text_of('audit-body')}; "
                                    "return t.includes('embedder') && t.includes('start') && t; })()",
                                    message="the operator's start in the audit list")
            assert "ok" in audit, audit
            row = await page.wait(f"{text_of('usage--')}", message="the usage of keys without a group")
            assert row.startswith("-") and "/" in row, row
            assert page.errors == [], page.errors
        finally:
            await page.close()
