"""Web pages against a keyless loopback router (router/http/origin.py): cross-site writes, the
``Host`` of a rebound name, non-JSON bodies, CORS, the dashboard's headers; then a real headless
Chromium that opens an attacker's page on another loopback address.

Real router processes, the session Redis, a real mock engine announced by ``FakeWorker``, real
sockets (raw ones where a header is what browsers send and HTTP libraries do not)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from conftest import ROOT, wait_for
from helpers import FakeWorker, chat_body, engine_stats, request, start_router, wait_engine, wait_routable
from llm_lab_router.protocol import CatalogEntry, Keys
from llm_lab_router.redis_server import free_port
from test_dashboard import CHROMIUM, launch_chromium, open_page, text_of

CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)
WID = "w-origin"


@pytest.fixture
def stack(procs, redis_url, rds, mock_engine):
    """A keyless router on 127.0.0.1 and a running ``chat``: (router, engine URL)."""
    fake = FakeWorker(rds, WID)
    fake.publish(CHAT)
    _, url = mock_engine("--quiet", model="chat")
    wait_engine(url)
    fake.instance("chat", "running", url)
    router = start_router(procs, redis_url)
    wait_routable(router, "chat")
    return router, url


def commands_sent(rds) -> int:
    return rds.xlen(Keys().commands(WID))


def raw(router, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request as bytes (any ``Host``): status, headers (lower-case names), body."""
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_text, _, rest = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:]))
    return int(lines[0].split()[1]), headers, rest


def test_cross_site_writes_are_refused_and_change_nothing(stack, rds) -> None:
    router, engine = stack
    own = router.url  # http://127.0.0.1:<port>: the Origin of the router's own pages
    for headers in ({"Origin": "http://attacker.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": own.replace("127.0.0.1", "localhost")},
                    {"Origin": "null"}):
        resp = request("POST", f"{router.url}/api/models/stop-all", headers=headers)
        assert resp.status == 403 and resp.json()["success"] is False, (headers, resp.body)
        assert "LLM_ROUTER_ALLOW_ORIGINS" in resp.json()["message"]
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"), headers=headers)
        assert resp.status == 403 and resp.json()["error"]["code"] == "cross_site_refused", (headers, resp.body)
    assert commands_sent(rds) == 0 and engine_stats(engine)["requests"] == 0
    # the router's own pages, and clients that are no browser, go through
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"),
                   headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert resp.status == 200, resp.body
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat")).status == 200
    # reads are not writes: a cross-site GET is answered, but without CORS no page can read it
    read = request("GET", f"{router.url}/v1/models", headers={"Origin": "http://attacker.example",
                                                             "Sec-Fetch-Site": "cross-site"})
    assert read.status == 200 and "Access-Control-Allow-Origin" not in read.headers
    status, headers, _ = raw(router, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Origin: http://attacker.example\r\nAccess-Control-Request-Method: POST\r\n")
    assert "access-control-allow-origin" not in headers, (status, headers)


def test_json_routes_take_json_only(stack) -> None:
    router, engine = stack
    body = json.dumps(chat_body("chat")).encode()
    for label in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        resp = request("POST", f"{router.url}/v1/chat/completions", body, headers={"Content-Type": label})
        assert resp.status == 415 and resp.json()["error"]["code"] == "unsupported_media_type", (label, resp.body)
    assert engine_stats(engine)["requests"] == 0
    for label in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        assert request("POST", f"{router.url}/v1/chat/completions", body,
                       headers={"Content-Type": label}).status == 200, label
    # multipart stays where OpenAI's API takes uploads: refused further on, not for its label
    form = (b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nchat\r\n--x--\r\n")
    resp = request("POST", f"{router.url}/v1/audio/transcriptions", form,
                   headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert resp.status != 415, resp.body


def test_a_loopback_router_answers_loopback_host_names_only(stack) -> None:
    router, _ = stack
    port = router.url.rsplit(":", 1)[1].encode()
    for host in (b"localhost:" + port, b"127.0.0.1:" + port, b"[::1]:" + port, b"localhost", b"127.0.0.2"):
        status, _, _ = raw(router, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n")
        assert status == 200, host
    # DNS rebinding: a name of the attacker's, resolved to 127.0.0.1
    for host in (b"attacker.example:" + port, b"attacker.example", b"127.0.0.1.attacker.example"):
        status, _, body = raw(router, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n")
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed", (host, body)
        status, _, body = raw(router, b"GET /api/models/chat/logs/stream HTTP/1.1\r\nHost: " + host + b"\r\n")
        assert status == 403 and json.loads(body)["success"] is False, (host, body)
    assert request("GET", f"{router.url}/health").status == 200  # still serving


def test_allowed_origins_pass_and_get_cors(procs, redis_url, stack, rds) -> None:
    _, engine = stack
    app = "https://app.lab.example"
    router = start_router(procs, redis_url, env={"LLM_ROUTER_ALLOW_ORIGINS": f"{app}, http://other.example:8080"})
    wait_routable(router, "chat")
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"),
                   headers={"Origin": app, "Sec-Fetch-Site": "cross-site"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == app, resp.body
    listed = request("GET", f"{router.url}/v1/models", headers={"Origin": app})  # the app's own routes too
    assert listed.status == 200 and listed.headers["Access-Control-Allow-Origin"] == app
    status, headers, _ = raw(router, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Origin: https://app.lab.example\r\nAccess-Control-Request-Method: POST\r\n"
                                     b"Access-Control-Request-Headers: authorization, content-type\r\n")
    assert status == 204 and headers["access-control-allow-origin"] == app
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    denied = request("POST", f"{router.url}/api/models/stop-all", headers={"Origin": "https://evil.example"})
    assert denied.status == 403 and "Access-Control-Allow-Origin" not in denied.headers
    assert commands_sent(rds) == 0


def test_a_bad_allowed_origin_stops_the_router_with_one_line(redis_url) -> None:
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", redis_url,
                           "--port", str(free_port()), "--allow-origin", "https://ok.example",
                           "--allow-origin", "app.lab.example"], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "LLM_ROUTER_ALLOW_ORIGINS: allowed origin 'app.lab.example': expected scheme://host[:port]" in done.stderr


def test_the_dashboard_cannot_be_framed_or_sniffed(stack) -> None:
    router, _ = stack
    for path in ("/ui/", "/ui/app.js", "/ui/style.css"):
        resp = request("GET", f"{router.url}{path}")
        assert resp.status == 200
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
        assert "script-src" not in resp.headers["Content-Security-Policy"]  # default-src 'self': no inline script
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["X-Frame-Options"] == "DENY"


# --------------------------------------------------------------------------- a real browser

ATTACK = """<!doctype html><html><body>
<iframe name="sink" style="display:none"></iframe>
<form id="form" target="sink" method="POST" enctype="text/plain" action="%(router)s/v1/chat/completions">
<input name='{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "x": "' value='"}'>
</form>
<script>
window.results = {};
const R = "%(router)s";
const chat = JSON.stringify({model: "chat", messages: [{role: "user", content: "hi"}]});
const tries = {
  stopAll: () => fetch(R + "/api/models/stop-all", {method: "POST", mode: "no-cors"}),
  start: () => fetch(R + "/api/models/chat/start", {method: "POST", mode: "no-cors"}),
  chat: () => fetch(R + "/v1/chat/completions", {method: "POST", mode: "no-cors",
                    headers: {"Content-Type": "text/plain"}, body: chat}),
  chatJson: () => fetch(R + "/v1/chat/completions", {method: "POST",
                        headers: {"Content-Type": "application/json"}, body: chat}).then(r => r.text()),
  models: () => fetch(R + "/v1/models").then(r => r.text()),
  logs: () => fetch(R + "/api/models/chat/logs/stream?tail=5").then(r => r.text()),
};
(async () => {
  document.getElementById("form").submit();
  for (const [name, attempt] of Object.entries(tries)) {
    try {
      const got = await attempt();
      window.results[name] = typeof got === "string" ? "read " + got.slice(0, 80) : "sent " + got.type;
    } catch (e) {
      window.results[name] = "failed " + e.name;
    }
  }
  window.results.done = true;
})();
</script></body></html>"""


def serve_attacker_page(html: str) -> tuple[ThreadingHTTPServer, str]:
    """The attacker's site: one page, on another loopback address (another origin and site)."""
    page = html.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.2:{server.server_address[1]}/"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_an_attacker_page_changes_nothing_and_reads_nothing_and_the_dashboard_works(
        procs, stack, rds, tmp_path) -> None:
    router, engine = stack
    server, attacker = serve_attacker_page(ATTACK % {"router": router.url})
    try:
        devtools_port = launch_chromium(procs, tmp_path)
        results = asyncio.run(drive_attack(attacker, router.url, devtools_port, rds))
    finally:
        server.shutdown()
        server.server_close()
    # the browser sent the no-cors requests (opaque answers); the router refused every one
    assert results["stopAll"] == "sent opaque" and results["chat"] == "sent opaque", results
    for name in ("chatJson", "models", "logs"):  # nothing read: no CORS for that origin
        assert results[name] == "failed TypeError", results
    assert engine_stats(engine)["requests"] == 0  # neither the fetches nor the text/plain form
    assert "refused POST /api/models/stop-all" in procs.log(router.proc)


async def drive_attack(attacker: str, router_url: str, devtools_port: int, rds) -> dict:
    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=attacker)
            try:  # (a stop-all that got through would wait for the fake worker's reply: no results)
                results = await page.wait("window.results && window.results.done && window.results",
                                          message="the attacker page's attempts")
            finally:
                assert commands_sent(rds) == 0, "the attacker page sent a command to the worker"
            # the dashboard, on the router's own origin, still works: it lists chat and its Stop
            # button sends the stop command (a same-origin POST)
            await page.send("Page.navigate", url=f"{router_url}/ui/")
            await page.wait(f"{text_of('status-chat')} === 'running'", message="chat listed as running")
            await page.click("stop-chat")
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
                lambda: commands_sent(rds) == 1, timeout=10, message="the dashboard's stop command"))
            return results
        finally:
            await page.close()
