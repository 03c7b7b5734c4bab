"""One process at a time owns a run folder: an OS lock (``fcntl.flock``) on ``<run>/run.lock``.

The lock file names its holder (host, pid, SLURM job, start time) so that a second launch
refuses at once and says who holds the folder. The kernel drops a flock when its process ends,
however it ends (on NFS, the lock server does the same for a crashed client), so a lock left
by a dead process is free: the next run takes it over and names the process it replaces. A
SLURM requeue keeps its job id; if it finds its previous incarnation still exiting, it waits
for it (blocked in ``flock``, at most ``REQUEUE_WAIT_S``) instead of refusing.

No torch here: the module is cheap to import and to test.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REQUEUE_WAIT_S = 120
LOCK_NAME = "run.lock"


class RunLocked(Exception):
    """Another live process owns the run folder."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    since: str

    @classmethod
    def me(cls, slurm_job: str | None) -> Holder:
        since = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), slurm_job, since)

    def __str__(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host}{job}, since {self.since}"


def _read_holder(fd: int) -> Holder | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return Holder(**json.loads(raw)) if raw.strip() else None
    except (OSError, ValueError, TypeError):
        return None


def _flock_with_timeout(fd: int, seconds: int) -> bool:
    """Block in ``flock`` for up to ``seconds`` (SIGALRM interrupts it); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def give_up(signum: int, frame: Any) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, give_up)
    pending, start = signal.alarm(seconds), time.monotonic()  # someone else's alarm: re-armed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except TimeoutError:
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if pending:
            signal.alarm(max(1, pending - int(time.monotonic() - start)))


class RunLock:
    """``acquire()`` the folder or raise :class:`RunLocked` naming the live holder."""

    def __init__(self, run_dir: Path, *, slurm_job: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.slurm_job = slurm_job
        self._fd: int | None = None

    def acquire(self) -> Holder | None:
        """Take the lock; returns the dead holder it replaced (None when the file was clean)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # retried only if the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                self._lock(fd)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # unlinked by a holder that just released it
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.me(self.slurm_job))).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return stale

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:  # a file system without flock: say so and go on unlocked
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(
                f"ngbench: warning: cannot lock {self.path} ({exc.strerror}); nothing stops "
                "a second process from writing this run folder",
                file=sys.stderr,
            )
            return
        holder = _read_holder(fd)
        requeued = holder is not None and self.slurm_job and holder.slurm_job == self.slurm_job
        if requeued and _flock_with_timeout(fd, REQUEUE_WAIT_S):
            return
        who = str(holder) if holder else "another process (it has not written its name yet)"
        raise RunLocked(
            f"{self.path.parent} is in use by {who}. One process at a time owns a run folder: "
            "wait for that run to end or stop it (it resumes later), or send this run to "
            "another folder (runs_root=... or hydra.run.dir=...)."
        )

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: the next owner starts clean
        os.close(self._fd)
        self._fd = None


def live_holder(run_dir: Path) -> Holder | None:
    """The process that owns ``run_dir`` now, or None (no lock, or one left by a dead process):
    tells a live ``running`` record from one whose process died. Takes nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held: read who holds it
        return _read_holder(fd) or Holder("?", 0, None, "?")
    finally:
        os.close(fd)  # also drops our shared lock, if we got it
    return None


@contextmanager
def hold(
    run_dir: Path,
    *,
    slurm_job: str | None,
    owner: bool = True,
    share: Callable[[Any], Any] = lambda x: x,
) -> Iterator[None]:
    """Own ``run_dir`` for the ``with`` block. Under several processes only the ``owner`` (rank 0)
    locks and ``share`` (a broadcast from it) tells every rank whether to refuse."""
    lock = RunLock(run_dir, slurm_job=slurm_job)
    refusal, stale = None, None
    if owner:
        try:
            stale = lock.acquire()
        except RunLocked as exc:
            refusal = str(exc)
    refusal = share(refusal)
    if refusal:
        raise RunLocked(refusal)
    if stale is not None:
        print(
            f"ngbench: taking over {run_dir}: its lock was left by {stale}, which is no "
            "longer running",
            file=sys.stderr,
        )
    try:
        yield
    finally:
        lock.release()
