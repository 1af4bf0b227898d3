"""One writer per run directory: a lock file holding the writer's pid and host.

    with RunLock(run_dir, log):        # CovidCTError if another live process holds it
        ... write checkpoints, history ...

Inside one process the lock nests: ``covidct.train.train`` takes it before it
loads any data, and the loop's own ``with RunLock`` inside is then a no-op.

The lock is ``RUN_DIR/.lock``, created atomically (O_CREAT | O_EXCL) with
"pid host" inside and removed on exit, also on Ctrl-C or an exception. After a
``kill -9`` the file stays behind: a lock whose pid no longer runs on this host
is stale and is taken over, with a log line. A lock from another host cannot be
checked; the message says which file to delete if no run is using it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import CovidCTError
from .paths import writable_dir

LOCK_NAME = ".lock"
_held: set[Path] = set()        # lock files this process holds: taking one again nests, it does not block


def pid_running(pid: int) -> bool:
    """Is a process with this pid alive on this machine?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # alive, owned by another user
        return True
    return True


class RunLock:
    """Context manager: hold ``run_dir/.lock`` while the block runs."""

    def __init__(self, run_dir, log=print):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log
        self.held = False

    def holder(self) -> tuple[int | None, str]:
        """(pid, host) written in the lock file; (None, "") when it is unreadable."""
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def _create(self) -> bool:
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as file:
            file.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def acquire(self) -> "RunLock":
        writable_dir(self.path.parent, "--out")
        if self.path.resolve() in _held:               # train() holds it around Trainer(...).fit()
            return self
        if not self._create():
            pid, host = self.holder()
            if host == socket.gethostname() and pid is not None and not pid_running(pid):
                self.log(f"removing the stale lock of process {pid} (no longer running): {self.path}")
                self.path.unlink(missing_ok=True)
            if not self._create():                         # still held (or taken by a racing process)
                pid, host = self.holder()
                where = f"process {pid} on {host}" if pid is not None else "another process"
                raise CovidCTError(f"{self.path.parent}: the run directory is in use by {where}; wait for it, "
                                   f"choose another --out, or delete {self.path} if no run is using it")
        self.held = True
        _held.add(self.path.resolve())
        return self

    def release(self) -> None:
        if self.held:
            _held.discard(self.path.resolve())
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
