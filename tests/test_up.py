"""``llm-router up`` as a user gets it: built as a wheel, installed into a fresh venv, run from
an empty directory, nothing of the checkout in reach.

It must find what it ships (``redis.conf``, the demo config and its mock engine, the ACL
users) as package data, serve the demo models, and run its private Redis locked down:
data directory 0700, ``default`` user off, the worker and the router logging in as their own
users, passwords generated once, kept 0600 in the data directory, reused by the next ``up``
and never printed.

The venv holds only the wheel, installed beside two stand-ins for the registry's ``router`` and
``worker`` distributions (each owning a top-level package of that name, as theirs do): the
project's one import name, ``llm_lab_router``, must leave both alone. Its dependencies come
from this test's own environment through a ``.pth`` line (no network, no index), which adds a
directory to ``sys.path`` without running the checkout's editable-install hooks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import ROOT, Processes, wait_for
from helpers import chat_body, get_json, request
from llm_lab_router.redis_server import free_port

SOURCES = ("pyproject.toml", "README.md", "llm_router", "router", "worker", "redis.conf", "examples", "scripts")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from its wheel (built from a copy of the
    sources, so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline: the build backend is the one installed here (the test extras), no index is asked.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, timeout=240)
    (wheel,) = (tmp / "dist").glob("llm_lab_router-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    standins = [standin_wheel(tmp / "dist", name) for name in STANDINS]
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", *map(str, standins)],
                   check=True, timeout=120)
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(python), "-c", "import llm_lab_router, llm_lab_router.router, llm_lab_router.worker; "
                                              "print(llm_lab_router.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp).stdout
    assert where.startswith(site), where  # the wheel's code, not the checkout's
    return venv


STANDINS = ("router", "worker")  # distributions on the registry, each with a top-level package of its name


def standin_wheel(folder: Path, name: str) -> Path:
    """A minimal wheel of distribution ``name`` whose one package, ``name``, says whose it is."""
    files = {f"{name}/__init__.py": f"OWNER = 'the {name} distribution'\n",
             f"{name}-9.9.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n",
             f"{name}-9.9.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test_up\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-9.9.dist-info/RECORD"] = "\n".join([*record, f"{name}-9.9.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{name}-9.9-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
    return path


def test_the_wheel_installs_beside_the_registrys_router_and_worker(wheel_venv: Path, tmp_path: Path) -> None:
    (wheel,) = (wheel_venv.parent / "dist").glob("llm_lab_router-*.whl")
    tops = {member.split("/")[0] for member in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"llm_lab_router"}  # one import name, nothing else
    python, cli = str(wheel_venv / "bin" / "python"), str(wheel_venv / "bin" / "llm-router")
    help_text = subprocess.run([cli, "--help"], check=True, capture_output=True, text=True, cwd=tmp_path,
                               timeout=60).stdout
    assert "config" in help_text and "up" in help_text
    owners = subprocess.run([python, "-c", "import llm_lab_router.router.http.app, llm_lab_router.worker.agent, "
                                           "router, worker; print(router.OWNER, '|', worker.OWNER)"],
                            check=True, capture_output=True, text=True, cwd=tmp_path, timeout=60).stdout
    assert owners.strip() == "the router distribution | the worker distribution"
    listed = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python, "list",
                             "--format", "json"], check=True, capture_output=True, text=True, timeout=60).stdout
    assert {d["name"] for d in json.loads(listed)} >= {"llm-lab-router", "router", "worker"}


def start_up(procs: Processes, venv: Path, workdir: Path, port: int):
    proc = procs.start([str(venv / "bin" / "llm-router"), "up", "--port", str(port)], name="up", cwd=workdir)
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        assert proc.poll() is None, procs.log(proc)
        try:
            return request("GET", f"{url}/health", timeout=1).status == 200 and \
                len(get_json(f"{url}/v1/models")["data"]) == 2
        except OSError:
            return False

    wait_for(serving, timeout=60, interval=0.1, message="up serving the demo models")
    return proc, url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_wheel_up_serves_the_demo_with_its_redis_locked_down(procs, wheel_venv: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    port = free_port()
    proc, url = start_up(procs, wheel_venv, workdir, port)

    assert {m["id"] for m in get_json(f"{url}/v1/models")["data"]} == {"demo-chat", "demo-embed"}
    chat = request("POST", f"{url}/v1/chat/completions", chat_body("gpt-3.5-turbo"), timeout=60)
    assert chat.status == 200, chat.body  # the shipped mock engine, started on demand

    data = workdir / ".llm-router"
    rdir = data / "redis"
    assert mode(data) == mode(rdir) == 0o700
    worker_user = f"worker.{socket.gethostname()}"  # the demo config names no worker id: the host's
    for name in ("passwords.json", "users.acl", "admin.url", f"{worker_user}.url", "router.url", "reader.url"):
        assert mode(rdir / name) == 0o600, name
    passwords = json.loads((rdir / "passwords.json").read_text())
    assert not any(pw in (rdir / "users.acl").read_text() for pw in passwords.values())

    admin = redis_sync.Redis.from_url((rdir / "admin.url").read_text().strip(), decode_responses=True)
    try:
        assert admin.config_get("maxmemory")["maxmemory"] == str(512 * 1024 * 1024)  # the shipped redis.conf
        assert admin.config_get("appendonly")["appendonly"] == "yes"
        users = {entry["user"] for entry in admin.client_list()}
        assert {worker_user, "router", "reader"} <= users and "default" not in users
        rport = admin.connection_pool.connection_kwargs["port"]
    finally:
        admin.close()
    with socket.create_connection(("127.0.0.1", rport), timeout=5) as s:  # anyone else: no way in
        s.sendall(b"SET llm:w:forged:lease 1\r\n")
        assert s.recv(100).startswith(b"-NOAUTH")

    assert procs.stop(proc) == 0
    output = procs.log(proc)
    assert not [role for role, pw in passwords.items() if pw in output], "a password was printed"
    assert "admin.url" in output  # ... but it says where the operator finds them

    proc, url = start_up(procs, wheel_venv, workdir, port)  # the same data directory again
    assert json.loads((rdir / "passwords.json").read_text()) == passwords
    assert procs.stop(proc) == 0


def test_up_never_prints_the_password_of_the_redis_it_is_given(procs, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = procs.start([sys.executable, "-m", "llm_lab_router.cli", "up", "--redis", redis_url, "--port", str(port),
                        "--data-dir", str(tmp_path / "data")], name="up-given")
    wait_for(lambda: "serving http://" in procs.log(proc) or proc.poll() is not None, timeout=60,
             message="up serving")
    assert procs.stop(proc) == 0, procs.log(proc)
    output = procs.log(proc)
    password = redis_url.split("@")[0].rsplit(":", 1)[1]
    assert password not in output and "using Redis at redis://admin:***@" in output, output
    assert not (tmp_path / "data").exists()  # a Redis that answers is used as it is: no private one


def test_a_missing_shipped_file_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    from llm_lab_router.redis_server import RedisServer
    from llm_lab_router.shipped import MissingFile, shipped

    assert shipped("redis.conf").read_text().count("maxmemory 512mb") == 1
    with pytest.raises(MissingFile, match="nothing.conf is missing"):
        shipped("nothing.conf")
    with pytest.raises(RuntimeError, match="not found"):
        RedisServer(tmp_path, conf=tmp_path / "missing.conf").start()


def test_acl_users_hold_hashes_only_and_follow_the_prefix() -> None:
    from llm_lab_router.redis_users import ROLES, acl_text

    passwords = {role: f"pw-{role}-0123456789" for role in ROLES}
    text = acl_text(passwords, prefix="lab:", workers={"gpu1": "pw-gpu1-0123456789"})
    assert "user default off" in text and not [pw for pw in [*passwords.values(), "pw-gpu1"] if pw in text]
    assert "~lab:cmd:*" in text and "&lab:events:*" in text and "llm:" not in text and "WORKER-ID" not in text
    assert "user worker.gpu1 on #" in text and " ~lab:w:gpu1:* ~lab:cmd:gpu1 " in text and " &lab:events:gpu1 " in text


def test_up_users_one_per_worker_and_the_old_shared_worker_user_gone(tmp_path: Path) -> None:
    """A data directory of an older release (one shared ``worker`` user) gets the worker's own
    user at the next ``up``; the old user's password and URL file go."""
    from llm_lab_router.redis_users import PrivateUsers

    rdir = tmp_path / "redis"
    rdir.mkdir(mode=0o700)
    (rdir / "passwords.json").write_text(json.dumps({"admin": "a" * 48, "worker": "w" * 48, "router": "r" * 48}))
    (rdir / "worker.url").write_text("redis://worker:" + "w" * 48 + "@127.0.0.1:1/0\n")
    users = PrivateUsers(rdir, workers=["gpu1"])
    assert users.passwords["admin"] == "a" * 48 and users.passwords["router"] == "r" * 48  # kept
    assert set(users.passwords) == {"admin", "router", "reader", "worker.gpu1"}
    text = users.acl_file().read_text()
    assert "user worker.gpu1 on #" in text and "user worker " not in text and "w" * 48 not in text
    urls = users.urls("redis://127.0.0.1:7000/0")
    assert urls["worker.gpu1"].startswith("redis://worker.gpu1:") and not (rdir / "worker.url").exists()
    assert sorted(p.name for p in rdir.glob("*.url")) == ["admin.url", "reader.url", "router.url", "worker.gpu1.url"]
    assert all(mode(p) == 0o600 for p in rdir.iterdir())


def up_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm_lab_router.cli", "up", *args]


def test_up_on_a_busy_port_says_so_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(up_argv("--port", str(port), "--data-dir", str(tmp_path / "data")),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--port" in lines[0], done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # no Redis was started


def test_up_with_its_own_port_worker_id_and_state_dir_is_found_by_the_cli(procs, redis_url: str,
                                                                        tmp_path: Path) -> None:
    port, wid = free_port(), f"up{os.getpid()}"
    env = {"LLM_ROUTER_STATE_DIR": str(tmp_path / "user-state")}  # where up records its URL
    proc = procs.start(up_argv("--redis", redis_url, "--port", str(port), "--worker-id", wid,
                               "--state-dir", str(tmp_path / "wstate")), name="up-ids", env=env)
    wait_for(lambda: "up: serving" in procs.log(proc) or proc.poll() is not None, timeout=60, message="up serving")
    output = procs.log(proc)
    assert f"serving http://127.0.0.1:{port} " in output, output
    # printed once the router answers, not when it was spawned
    assert output.index("router listening on") < output.index("up: serving"), output
    assert (tmp_path / "wstate" / wid).is_dir()  # the worker's state under --state-dir, by its id
    wait_for(lambda: any(i["worker"] == wid for m in get_json(f"http://127.0.0.1:{port}/v1/models")["data"]
                         for i in m["instances"]), timeout=20, message="the worker by its --worker-id")

    # no --url, no LLM_ROUTER_URL: the client commands find this up's router, not :8000
    cli_env = {k: v for k, v in os.environ.items() if k != "LLM_ROUTER_URL"} | env
    models = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "models"], env=cli_env,
                            capture_output=True, text=True, timeout=30)
    assert models.returncode == 0 and "demo-chat" in models.stdout and wid in models.stdout, models.stderr

    assert procs.stop(proc) == 0, procs.log(proc)
    assert not list((tmp_path / "user-state" / "up").glob("*.json"))  # the record goes with it
