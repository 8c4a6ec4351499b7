"""Files of the worker's state directory that only its own user may read or lock.

Spool files hold engine output not yet shipped (prompts, in some engines' logs), the lock
file tells the linger whether a worker took over (a group member who could ``flock`` it would
fool the linger), spawn records say which processes are engines. So directories are 0700 and
files 0600, whatever the umask, and a directory that exists already is narrowed to 0700.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents 0700; narrow it to 0700 if it exists and is ours."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):  # ``mkdir -p`` would create the parents with the umask's mode
        p.mkdir(mode=DIR_MODE, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if st.st_uid == os.geteuid() and st.st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` with ``O_CREAT`` and mode 0600; an existing file of ours is narrowed to it."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and st.st_mode & 0o777 != FILE_MODE:
        os.fchmod(fd, FILE_MODE)
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a 0600 file holding ``data``."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
