"""A worker trusts no process for what it says about itself, and its children import nothing
from their cwd (issue 24, items 1, 4 and the state-directory part of 8).

Another local user is played by a real process running as uid 4242 (the tests run as root),
carrying the engine markers a worker used to believe (``LLM_ROUTER_WORKER``, the model, the
spec hash anyone can compute from the config, the port, ``LLM_ROUTER_WORKER_PID``). Workers,
engines, the linger, ``up`` and ``serve --workers`` are real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, role_url, wait_for
from helpers import get_json
from llm_lab_router.config import load_config
from llm_lab_router.redis_server import free_port
from llm_lab_router.worker.adoption import engine_spec
from worker_helpers import Worker, alive, model, processes_of, worker  # noqa: F401 (fixture)

OTHER_UID = 4242
FAKE_ENGINE = '''
import http.server, pathlib, sys
port, hits, ready = int(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])

class Claim(http.server.BaseHTTPRequestHandler):
    def answer(self):
        with hits.open("a") as f:
            f.write(f"{self.command} {self.path}\\n")
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Claim)
ready.write_text("ready")
server.serve_forever()
'''
PLANTED = ("click", "redis", "msgspec", "psutil", "tornado", "uvloop", "prometheus_client")


def other_user_python() -> str:
    """An interpreter uid 4242 may run (this venv's may live under root's 0700 home)."""
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        path = Path(candidate).resolve() if candidate else None
        if path and path.is_file() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            return str(path)
    pytest.skip("no Python interpreter that another user may run")


@pytest.fixture
def shared_dir():
    """A directory uid 4242 can read and write (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="llm-router-other-user-"))
    path.chmod(0o755)
    os.chown(path, OTHER_UID, OTHER_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_impostor(procs, worker: Worker, shared: Path, model_id: str = "m1", **env: str):
    """A uid-4242 HTTP server that says it is ``model_id``'s engine of ``worker``, with the spec
    hash the worker's config gives it on its port; it notes every request it gets."""
    script = shared / "impostor.py"
    script.write_text(FAKE_ENGINE)
    cfg = load_config(str(worker.config))
    entry = cfg.model(model_id)
    port = free_port()
    spec = engine_spec(entry, entry.device_profiles()[0], port=port, gpus=[], settings=cfg.worker,
                       config_dir=str(Path(cfg.path).resolve().parent))
    markers = {"LLM_ROUTER_WORKER": worker.wid, "LLM_ROUTER_WORKER_PID": "1", "LLM_ROUTER_MODEL": model_id,
               "LLM_ROUTER_SPEC_HASH": spec.hash, "LLM_ROUTER_PORT": str(port), "LLM_ROUTER_PROFILE": "0",
               "LLM_ROUTER_NONCE": "a-guess", **env}
    hits, ready = shared / "hits", shared / "ready"
    proc = procs.start([other_user_python(), str(script), str(port), str(hits), str(ready)], name="impostor",
                       env=markers, cwd=shared, uid=OTHER_UID)
    wait_for(lambda: ready.exists() or proc.poll() is not None, message="the impostor listening")
    assert proc.poll() is None, procs.log(proc)
    return proc, hits


def state_dir(worker: Worker) -> Path:
    return Path(os.environ["LLM_ROUTER_STATE_DIR"]) / worker.wid


def linger_saw_the_takeover(worker: Worker) -> None:
    """The linger of a SIGTERMed worker has seen the next one and exited (none is left behind)."""
    log = state_dir(worker) / "linger.log"
    wait_for(lambda: log.exists() and "a worker took over" in log.read_text(), message="the linger to leave")


def claims_logged(worker: Worker, pid: int) -> int:
    return worker.log().count(f"pid {pid} (uid {OTHER_UID}: ")


def test_an_impostor_of_another_user_is_not_adopted_at_a_cold_start(worker, procs, shared_dir):
    worker.write_config([model("m1", auto_start=True)])
    impostor, hits = start_impostor(procs, worker, shared_dir)
    worker.start()
    inst = worker.wait_state("m1", "running")
    assert inst.pid != impostor.pid and alive(inst.pid)
    assert impostor.poll() is None and not hits.exists()  # left alone: not even a health probe
    assert claims_logged(worker, impostor.pid) == 1, worker.log()


def test_an_impostor_is_neither_adopted_nor_killed_at_an_upgrade(worker, procs, shared_dir):
    worker.start([model("m1", auto_start=True)], adopt_timeout=60.0)
    real = worker.wait_state("m1", "running").pid
    impostor, hits = start_impostor(procs, worker, shared_dir)
    assert procs.stop(worker.proc, signal.SIGTERM) == 0

    worker.start()
    wait_for(lambda: "adopted pid" in " ".join(worker.messages("m1", "event")), message="the adoption")
    assert worker.instance("m1").pid == real and alive(real)
    assert impostor.poll() is None and not hits.exists()
    assert claims_logged(worker, impostor.pid) == 1, worker.log()
    linger_saw_the_takeover(worker)


def test_a_second_worker_with_a_live_workers_id_is_refused_whatever_its_state_dir(worker, procs, rds, tmp_path):
    worker.start([model("m1", auto_start=True)])
    pid = worker.wait_state("m1", "running").pid
    (tmp_path / "twin").mkdir()
    twin = Worker(procs, rds, worker.redis_url, tmp_path / "twin")
    twin.wid = worker.wid
    twin.write_config([model("m1", auto_start=True)], state_dir=str(tmp_path / "another-state-dir"))
    twin.start(wait=False)
    assert twin.proc.wait(30) == 2, twin.log()
    holder = f"is in use by a running worker on this host (pid {worker.proc.pid}, uid 0, whatever its state directory)"
    assert holder in twin.log()
    assert worker.proc.poll() is None and alive(pid)
    assert worker.instance("m1").pid == pid and worker.instance("m1").state == "running"


@pytest.mark.parametrize("how", ["linger", "stop-models"])
def test_a_forged_worker_pid_neither_blocks_nor_is_stopped(how, worker, procs, shared_dir):
    worker.start([model("m1", auto_start=True)], adopt_timeout=0.5)
    real = worker.wait_state("m1", "running").pid
    impostor, _ = start_impostor(procs, worker, shared_dir)  # LLM_ROUTER_WORKER_PID=1: a pid that lives
    state = state_dir(worker)
    if how == "linger":
        assert procs.stop(worker.proc, signal.SIGTERM) == 0
        wait_for(lambda: not alive(real), timeout=15, message="the linger to stop the real engine")
        wait_for(lambda: "stopped pid" in (state / "linger.log").read_text(), message="the linger's report")
        assert "in use" not in (state / "linger.log").read_text()
    else:
        procs.stop(worker.proc, signal.SIGKILL)
        done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(worker.config),
                               "--worker-id", worker.wid, "--stop-models"],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert done.returncode == 0, done.stderr
        assert f"{real} m1" in done.stdout and str(impostor.pid) not in done.stdout
        assert not alive(real)
    assert impostor.poll() is None


def test_the_state_directory_is_the_workers_own(worker, procs):
    worker.write_config([model("m1", auto_start=True)], adopt_timeout=60.0)
    state = state_dir(worker)
    (state / "spool").mkdir(parents=True, mode=0o755)  # as an older version left it
    state.chmod(0o755)
    worker.start()
    pid = worker.wait_state("m1", "running").pid
    assert procs.stop(worker.proc, signal.SIGTERM) == 0  # the linger's log and the spawn record too
    worker.start()
    worker.wait_state("m1", "running", pid=pid)
    linger_saw_the_takeover(worker)
    dirs, files = [state], []
    for root, subdirs, names in os.walk(state):
        dirs += [Path(root, d) for d in subdirs]
        files += [Path(root, n) for n in names]
    names = {p.name for p in files}
    assert {"worker.lock", "linger.log", f"{pid}.json", "stdout.log", "stderr.log", "stdout.pos"} <= names, names
    assert {str(d): oct(d.stat().st_mode & 0o777) for d in dirs} == {str(d): "0o700" for d in dirs}
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): "0o600" for f in files}


def test_an_engine_whose_spawn_record_cannot_be_written_is_not_left_running(worker):
    state = state_dir(worker)
    state.mkdir(parents=True)
    (state / "engines").write_text("not a directory")  # every record write fails
    worker.start([model("m1")])
    reply = worker.command("start", "m1")
    assert not reply.ok and "cannot record the engine" in worker.instance("m1").last_error, reply
    assert processes_of(worker.wid) == []  # no engine nobody could identify later


# --- python -m children import nothing from their cwd ---


@pytest.fixture
def planted(tmp_path):
    """A directory holding modules our children import by name; each notes its import."""
    where, marker = tmp_path / "planted", tmp_path / "planted-ran"
    where.mkdir()
    for name in PLANTED:
        (where / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    return where, marker


def cli(*args: str) -> list[str]:
    """The test's own launch of the CLI: -P, so only the children it starts are on trial."""
    return [sys.executable, "-P", "-m", "llm_lab_router.cli", *args]


def test_the_linger_imports_nothing_from_the_workers_cwd(worker, procs, planted):
    where, marker = planted
    worker.write_config([model("m1", auto_start=True)], adopt_timeout=0.5)
    worker.proc = procs.start(cli("worker", "--config", str(worker.config), "--redis",
                                  role_url(worker.redis_url, "worker", worker.wid), "--worker-id", worker.wid),
                              name="worker", cwd=where, stop_signal=signal.SIGINT)
    pid = worker.wait_state("m1", "running").pid
    assert procs.stop(worker.proc, signal.SIGTERM) == 0
    wait_for(lambda: not alive(pid), timeout=15, message="the linger to stop the model")
    assert not marker.exists(), marker.read_text()


def test_up_and_serve_workers_children_import_nothing_from_their_cwd(procs, planted, tmp_path, redis_url):
    where, marker = planted
    config = tmp_path / "models.toml"
    low = free_port()
    config.write_text(f'[worker]\nid = "up-{uuid.uuid4().hex[:8]}"\nport_range = [{low}, {low + 20}]\n\n'
                      f'[[models]]\nid = "m1"\ncommand = {json.dumps(model("m1")["command"])}\n')
    up_port, serve_port = free_port(), free_port()
    up = procs.start(cli("up", "--config", str(config), "--port", str(up_port), "--data-dir", str(tmp_path / "data")),
                     name="up", cwd=where, stop_signal=signal.SIGINT)
    serve = procs.start(cli("serve", "--workers", "2", "--port", str(serve_port)), name="serve", cwd=where,
                        env={"LLM_ROUTER_REDIS_URL": role_url(redis_url, "router"),
                             "LLM_ROUTER_REDIS_READ_URL": role_url(redis_url, "reader")})

    def listed(port: int, proc) -> bool:
        assert proc.poll() is None, procs.log(proc)
        try:
            return any(m["id"] == "m1" for m in get_json(f"http://127.0.0.1:{port}/v1/models")["data"]) \
                if proc is up else get_json(f"http://127.0.0.1:{port}/health") is not None
        except (OSError, AssertionError):
            return False

    wait_for(lambda: listed(up_port, up), timeout=60, interval=0.2, message="up's worker and router serving")
    wait_for(lambda: listed(serve_port, serve), timeout=30, interval=0.2, message="serve --workers 2 answering")
    assert procs.stop(up, signal.SIGINT) == 0 and procs.stop(serve) == 0
    assert not marker.exists(), marker.read_text()


def test_a_pidfd_handle_refuses_a_reused_pid_and_signals_nothing_once_its_process_is_gone(procs):
    from llm_lab_router.worker.ownership import ProcHandle, proc_starttime

    proc = procs.start([sys.executable, "-c", "import time; time.sleep(60)"], name="sleeper")
    started = proc_starttime(proc.pid)
    assert ProcHandle.open(proc.pid, started + 1) is None  # the same pid, another process
    handle = ProcHandle.open(proc.pid, started)
    assert handle is not None and handle.alive()
    procs.stop(proc)
    assert not handle.alive() and not handle.signal(signal.SIGKILL)  # never what holds the pid now
    handle.close()


def test_what_a_leader_left_in_its_group_is_signalled_through_pidfds(procs):
    import psutil
    from llm_lab_router.worker.ownership import ProcHandle

    leader = procs.start(["sh", "-c", "sleep 60 & sleep 1"], name="group")  # its own group and session
    handle = ProcHandle.open(leader.pid)
    child = wait_for(lambda: psutil.Process(leader.pid).children(), message="the child in the group")[0]
    leader.wait(10)  # the leader exits (and is reaped: its pid is free), the child stays
    assert not handle.alive() and alive(child.pid)
    handle.signal_group(signal.SIGKILL)
    wait_for(lambda: not alive(child.pid), message="the group's leftover killed")
    handle.close()
