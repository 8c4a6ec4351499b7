"""Every GPU path of llm-router, checked against a real GPU in a few minutes (scripts/gpu_check.sh).

A GPU machine is lent now and then, for minutes: this runs Redis, a worker and a router with the
real NVML, and mock engines that hold real GPU memory (``scripts/mock_engine.py --gpu-mb``), then
compares what the system reports with what the driver says (``nvidia-smi``):

1. ``/api/devices/info`` matches ``nvidia-smi`` (GPU count, names, total memory, used memory);
2. an engine's per-process VRAM is its allocation plus the CUDA context (margin stated below);
3. the learned VRAM (``measured_vram_mb`` in the worker's catalog) is what the engine used;
4. each engine's ``CUDA_VISIBLE_DEVICES`` is the GPU it was placed on, and the GPU it uses;
5. memory held by a foreign process (a mock engine the worker did not start) shows as used;
6. placement: a model that fits nowhere is not started (503), and a swap evicts an idle model
   to make room for one that does not fit beside it.

It prints a PASS/FAIL table and exits 1 if any check failed. ``--stand-in`` runs the same checks
on the stand-in NVML of the test suite (tests/fake_nvml.py; engines claim memory with
``--vram-mb``): that is how CI keeps this script honest without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis

from llm_lab_router.protocol import CatalogEntry, Keys, from_json
from llm_lab_router.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "scripts" / "mock_engine.py"
WORKER_ID = "gpu-check"
# A CUDA context costs memory beside the allocation (about 300-600 MiB on recent GPUs and
# drivers): the per-process reading may exceed the allocation by up to this much.
CONTEXT_MARGIN_MB = 1024
USED_MARGIN_MB = 256  # two readings of used memory a second apart (other tenants, the driver)


@dataclass
class Gpu:
    index: int
    name: str
    total: int  # MiB
    used: int
    uuid: str = ""


@dataclass
class ProcessUse:
    gpus: list[int]
    mb: int


class Truth:
    """What the driver says: ``nvidia-smi``."""

    driver = ""

    def gpus(self) -> list[Gpu]:
        out = self._smi("--query-gpu=index,name,memory.total,memory.used,uuid,driver_version")
        gpus = []
        for row in out:
            index, name, total, used, uuid, driver = row
            gpus.append(Gpu(int(index), name, int(total), int(used), uuid))
            self.driver = driver
        return gpus

    def process(self, pid: int) -> ProcessUse | None:
        by_uuid = {g.uuid: g.index for g in self.gpus()}
        rows = [r for r in self._smi("--query-compute-apps=pid,gpu_uuid,used_memory") if int(r[0]) == pid]
        if not rows:
            return None
        return ProcessUse(sorted(by_uuid[r[1]] for r in rows), max(int(r[2]) for r in rows))

    @staticmethod
    def _smi(query: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


class StandInTruth(Truth):
    """The stand-in NVML's own state: its GPUs and the claims engines wrote (tests/fake_nvml.py)."""

    driver = "stand-in"

    def __init__(self, totals: list[int], folder: Path) -> None:
        self.totals = totals
        self.folder = folder

    def claims(self) -> dict[int, dict]:
        out = {}
        for path in self.folder.glob("*.json"):
            pid = int(path.stem)
            if Path(f"/proc/{pid}").exists():
                out[pid] = json.loads(path.read_text())
        return out

    def gpus(self) -> list[Gpu]:
        used = [0] * len(self.totals)
        for claim in self.claims().values():
            for g in claim["gpus"]:
                used[g] += claim["mb"]
        return [Gpu(i, "NVIDIA H100", t, used[i]) for i, t in enumerate(self.totals)]

    def process(self, pid: int) -> ProcessUse | None:
        claim = self.claims().get(pid)
        return ProcessUse(sorted(claim["gpus"]), claim["mb"]) if claim else None


@dataclass
class Result:
    name: str
    ok: bool
    detail: str


@dataclass
class Lab:
    """Redis, one worker, one router; every process in its own group, all stopped at the end."""

    work: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""
    redis: RedisServer | None = None

    def start(self, config: str) -> None:
        self.redis = RedisServer(self.work / "redis", extra=["--appendonly", "no", "--save", ""]).start()
        self.procs.append(self.redis.proc)  # type: ignore[arg-type]
        (self.work / "models.toml").write_text(config)
        cli = [sys.executable, "-P", "-m", "llm_lab_router.cli"]
        self.spawn("worker", [*cli, "worker", "--config", str(self.work / "models.toml"), "--redis",
                              self.redis.url, "--worker-id", WORKER_ID])
        port = free_port()
        self.spawn("router", [*cli, "serve", "--redis", self.redis.url, "--port", str(port)])
        self.url = f"http://127.0.0.1:{port}"
        wait(lambda: self.get("/health")[0] == 200, 30, "the router to answer")
        wait(lambda: WORKER_ID in self.get("/api/devices/info")[1].get("hosts", {}), 30, "the worker's devices")

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env={**os.environ, **self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if proc is not self.procs[0] else signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except OSError:
            return 0, {}

    def get(self, path: str) -> tuple[int, dict]:
        return self.call("GET", path, timeout=10)

    def instance(self, model: str) -> dict:
        status, info = self.get(f"/api/models/{model}/info")
        found = [i for i in info.get("model", {}).get("instances", []) if i["worker"] == WORKER_ID] if status == 200 else []
        return found[0] if found else {}

    def learned(self, model: str) -> list[int]:
        assert self.redis is not None
        raw = redis.Redis.from_url(self.redis.url).hget(Keys().catalog(WORKER_ID), model)
        return from_json(raw, CatalogEntry).measured_vram_mb if raw else []


def wait(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class Check:
    def __init__(self, stand_in: bool, work: Path) -> None:
        self.stand_in = stand_in
        self.work = work
        self.results: list[Result] = []
        fake_dir = work / "nvml"
        fake_dir.mkdir()
        if stand_in:
            self.truth: Truth = StandInTruth([81559], fake_dir)
            env = {"LLM_ROUTER_NVML_MODULE": "tests.fake_nvml", "PYTHONPATH": str(ROOT),
                   "LLM_ROUTER_FAKE_GPUS": json.dumps([{"name": "NVIDIA H100", "memory_total": 81559,
                                                        "memory_used": 0}]),
                   "LLM_ROUTER_FAKE_NVML_DIR": str(fake_dir)}
        else:
            self.truth = Truth()
            env = {}
        env["LLM_ROUTER_STATE_DIR"] = str(work / "state")
        self.lab = Lab(work, env)
        self.fake_dir = fake_dir

    def record(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append(Result(name, ok, detail))
        return ok

    def engine_args(self, mib: int) -> list[str]:
        if self.stand_in:
            return ["--vram-mb", str(mib), "--fake-nvml-dir", str(self.fake_dir)]
        return ["--gpu-mb", str(mib)]

    def model(self, model_id: str, hold_mb: int, declared_mb: int) -> str:
        argv = ["{python}", str(MOCK), "--port", "{port}", "--host", "{host}", "--model", "{id}", "--quiet",
                *self.engine_args(hold_mb)]
        return "\n".join(["[[models]]", f"id = {json.dumps(model_id)}", f"command = {json.dumps(argv)}",
                          'devices = ["cuda"]', f"vram_mb = {declared_mb}", "startup_timeout = 60.0",
                          "stop_grace = 5.0", 'restart = "no"', ""])

    def run(self) -> list[Result]:
        gpus = self.truth.gpus()
        first = gpus[0]
        free = first.total - first.used
        self.small = 1024
        self.big = free * 40 // 100  # two do not fit beside the foreign process; one does
        self.foreign_mb = free * 25 // 100
        config = "[worker]\nheartbeat_interval = 0.5\nlease_ttl = 5.0\ndevices_interval = 0.5\n\n" + "\n".join([
            self.model("small", self.small, self.small + CONTEXT_MARGIN_MB),
            self.model("big-1", self.big, self.big + CONTEXT_MARGIN_MB),
            self.model("big-2", self.big, self.big + CONTEXT_MARGIN_MB),
            self.model("too-big", 1, first.total + 1),
        ])
        try:
            self.lab.start(config)
            self.check_devices(gpus)
            self.check_engine("small", self.small)
            self.check_foreign()
            self.check_no_room()
            self.check_swap()
        except Exception as exc:  # noqa: BLE001 — any failure is a FAIL row, and the lab still stops
            self.record("setup/run", False, f"{type(exc).__name__}: {exc}")
        finally:
            self.lab.stop()
        return self.results

    def reported_gpus(self) -> list[dict]:
        return self.lab.get("/api/devices/info")[1]["hosts"][WORKER_ID]["cuda"]["gpus"]

    def check_devices(self, gpus: list[Gpu]) -> None:
        reported = self.reported_gpus()
        same = [(g["index"], g["name"], g["memory_total"]) for g in reported] == [(g.index, g.name, g.total) for g in gpus]
        self.record("devices: count, names, total MiB match the driver", same,
                    f"router {[(g['index'], g['name'], g['memory_total']) for g in reported]}, "
                    f"driver {[(g.index, g.name, g.total) for g in gpus]}")
        gaps = [abs(r["memory_used"] - g.used) for r, g in zip(reported, self.truth.gpus())]
        self.record(f"devices: used MiB within {USED_MARGIN_MB} of the driver", bool(gaps) and max(gaps) <= USED_MARGIN_MB,
                    f"gaps {gaps} MiB")

    def start(self, model: str) -> dict:
        status, body = self.lab.call("POST", f"/api/models/{model}/start", timeout=120)
        if status != 200:
            raise RuntimeError(f"starting {model}: HTTP {status} {body}")
        return wait(lambda: (i := self.lab.instance(model)) and i["state"] == "running" and i, 60,
                    f"{model} running")  # type: ignore[return-value]

    def check_engine(self, model: str, mib: int) -> None:
        inst = self.start(model)
        pid = inst["pid"]
        use = wait(lambda: self.truth.process(pid), 30, f"the driver to list pid {pid}")
        assert isinstance(use, ProcessUse)
        over = use.mb - mib
        self.record(f"{model}: per-process VRAM = allocation (+0..{CONTEXT_MARGIN_MB} MiB context)",
                    0 <= over <= CONTEXT_MARGIN_MB, f"driver {use.mb} MiB for {mib} MiB allocated")
        visible = environ_of(pid).get("CUDA_VISIBLE_DEVICES", "")
        self.record(f"{model}: CUDA_VISIBLE_DEVICES is the GPU it was placed on and uses",
                    visible == inst["gpus"] and [int(g) for g in visible.split(",") if g] == use.gpus,
                    f"env {visible!r}, placed on {inst['gpus']!r}, driver sees it on {use.gpus}")
        try:
            learned = wait(lambda: [v for v in self.lab.learned(model) if v > 0], 30, f"{model}'s learned VRAM")
        except TimeoutError:
            learned = []
        self.record(f"{model}: learned VRAM = what the driver saw (within {USED_MARGIN_MB} MiB)",
                    bool(learned) and abs(max(learned) - use.mb) <= USED_MARGIN_MB,  # type: ignore[arg-type]
                    f"learned {learned}, driver {use.mb} MiB")

    def check_foreign(self) -> None:
        before = self.reported_gpus()[0]["memory_used"]
        port = free_port()
        self.lab.spawn("foreign", [sys.executable, str(MOCK), "--port", str(port), "--model", "foreign", "--quiet",
                                   *self.engine_args(self.foreign_mb)], env={"CUDA_VISIBLE_DEVICES": "0"})
        try:
            grown = wait(lambda: (u := self.reported_gpus()[0]["memory_used"]) - before >= self.foreign_mb and u, 60,
                         "the foreign process's memory to show")
            ok, detail = True, f"used {before} -> {grown} MiB for {self.foreign_mb} MiB held"
        except TimeoutError:
            ok, detail = False, f"used stayed near {before} MiB although {self.foreign_mb} MiB are held"
        self.record("foreign process: its memory counts as used", ok, detail)

    def check_no_room(self) -> None:
        status, body = self.lab.call("POST", "/api/models/too-big/start", timeout=60)
        inst = self.lab.instance("too-big")
        self.record("placement: a model that fits nowhere is refused, not started",
                    status == 503 and inst.get("state") in (None, "stopped"),
                    f"HTTP {status}: {body.get('message', body)}; instance {inst.get('state')}")

    def check_swap(self) -> None:
        self.lab.call("POST", "/api/models/small/stop")
        self.start("big-1")
        chat = {"model": "big-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        status, _ = self.lab.call("POST", "/v1/chat/completions", chat, timeout=120)
        one, two = self.lab.instance("big-1"), self.lab.instance("big-2")
        self.record("swap: big-2 (no room beside big-1 and the foreign process) evicts idle big-1",
                    status == 200 and one.get("state") == "stopped" and two.get("state") == "running",
                    f"HTTP {status}; big-1 {one.get('state')}, big-2 {two.get('state')}")


def table(results: list[Result], gpus: list[Gpu], driver: str) -> str:
    head = f"GPU: {', '.join(f'{g.index}: {g.name} ({g.total} MiB)' for g in gpus)}; driver {driver}"
    width = max(len(r.name) for r in results)
    rows = [f"| {'check':<{width}} | result | detail |", f"|{'-' * (width + 2)}|--------|--------|"]
    rows += [f"| {r.name:<{width}} | {'PASS' if r.ok else 'FAIL':<6} | {r.detail} |" for r in results]
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stand-in", action="store_true", help="use the test suite's stand-in NVML (no GPU needed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    opts = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        check = Check(opts.stand_in, work)
        results = check.run()
        print(table(results, check.truth.gpus(), check.truth.driver))
        failed = [r for r in results if not r.ok]
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if failed:
            print(f"logs: {work}" if opts.keep else "(rerun with --keep for the logs)")
        return 1 if failed else 0
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
