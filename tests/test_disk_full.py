"""A full disk under the worker's state dir (its spool) must not stop crash recovery: the
supervisor's event lines are lost, logged once, and the crashed model is restarted anyway
(an ENOSPC from the event write used to propagate through ``_fail`` and skip the restart)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import wait_for
from worker_helpers import model, worker  # noqa: F401  (worker: the fixture)

FULL = "cannot write worker events to the spool"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted afterwards (lazily: the worker may still hold files)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "state"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path) -> None:
    """No byte left: a filler file, then each spool file's last page topped up with lines."""
    for target, chunk in [(path / "filler", b"\0" * 65536), *((f, b"filler\n") for f in path.rglob("*.log"))]:
        with open(target, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass


def test_a_crashed_model_is_restarted_on_a_full_disk_and_the_failure_logged_once(worker, tiny_disk):
    worker.start([model("m", restart="on-failure", max_restarts=10, auto_start=True)],
                 env={"LLM_ROUTER_STATE_DIR": str(tiny_disk)})
    first = worker.wait_state("m", "running")
    fill(tiny_disk)
    os.kill(first.pid, signal.SIGKILL)
    # the crash is handled: a restart is begun although its event lines cannot be written
    worker.wait_state("m", "starting", timeout=15, restarts=1)
    assert worker.proc.poll() is None
    (tiny_disk / "filler").unlink()  # room again: the engine (which writes its stdout there) comes up
    wait_for(lambda: (i := worker.instance("m")) and i.state == "running" and i.pid != first.pid, timeout=30,
             message="m running again")
    log = worker.log()
    assert log.count(FULL) == 1, log
