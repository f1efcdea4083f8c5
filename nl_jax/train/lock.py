"""One writer per workdir: the lock a training run holds for its whole life.

``WORKDIR/train.lock`` records the holder (host, pid, start time) and is kept
fresh by a heartbeat thread.  Process 0 of a run takes it for all of the
run's processes; ``eval`` and ``generate`` never take it.  The file stays in
place after a run (its content is cleared); a lock is free when

* no live process holds its ``flock`` (the kernel drops it when the holder
  dies, so a crash or SIGKILL on this machine leaves no stale lock), and
* its recorded holder is not a live process of this host, and not another
  host whose heartbeat is younger than ``STALE_AFTER_S`` (``flock`` does not
  reach across hosts on every network file system).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from nl_jax.errors import WorkdirError

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


class RunLock:
    """The workdir's writer lock (see the module doc)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            holder = json.loads(text) if text else {}
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict, workdir: str):
        raise WorkdirError(
            f"the workdir {workdir} is in use by another train process ({_describe(holder)}); "
            f"wait for it to finish or stop it, or use another --workdir. If that "
            f"process is gone (a crashed host), delete {self.path}")

    def acquire(self) -> None:
        workdir = os.path.dirname(self.path)
        try:
            os.makedirs(workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot write to the workdir {workdir}: {e.strerror}; give "
                               f"a writable --workdir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._refuse(holder, workdir)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            fd = os.open(self.path, os.O_RDWR)   # no flock here: the record decides
        holder = self._read_holder(fd)
        here = socket.gethostname()
        if holder.get("pid") and (
                (holder.get("host") == here and holder["pid"] != os.getpid()
                 and _pid_alive(int(holder["pid"])))
                or (holder.get("host") != here
                    and time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S)):
            os.close(fd)
            self._refuse(holder, workdir)
        now = time.time()
        self._fd = fd
        self._write({"host": here, "pid": os.getpid(), "started": now, "heartbeat": now})
        self._thread = threading.Thread(target=self._beat, name="nl_jax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _write(self, holder: dict) -> None:
        text = json.dumps(holder).encode() if holder else b""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError, ValueError):
                holder = self._read_holder(self._fd)
                holder["heartbeat"] = time.time()
                self._write(holder)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._write({})
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
