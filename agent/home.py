"""The home folder: seal.toml, store.db, adapters/, inbox/, logs/; and its writer lock.

One writer per home: every command that writes adapters or the active pointer
(``learn``, ``sleep``, ``rollback``, ``prune``, ``daemon run``) holds an exclusive
``flock`` on ``<home>/writer.lock`` for as long as it runs, so that two of them never
race for version numbers, a rollback is never undone by a commit already under way,
and one's crash recovery never removes the other's fresh files. The kernel drops the
lock when its process dies, even by kill -9; the file says who holds it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

WRITER_LOCK = "writer.lock"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "seal.toml"

    @property
    def store_file(self) -> Path:
        return self.root / "store.db"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> Home:
        """Create the folders, private to their owner: the home is 0700 (a home made
        before, with wider rights, is narrowed), the store's files 0600; what seal
        writes inside is kept private by the CLI's umask (``private_umask``)."""
        for d in (self.root, self.adapters, self.inbox, self.logs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.root, *(self.root / n for n in ("store.db", "store.db-wal", "store.db-shm"))):
            with contextlib.suppress(FileNotFoundError):
                if not path.is_symlink() and path.stat().st_mode & 0o077:
                    path.chmod(0o700 if path.is_dir() else 0o600)
        return self


def private_umask() -> None:
    """Files and folders this process creates are its owner's alone (0600 / 0700):
    the documents fed to seal, its store, logs and adapters are not other users' to read."""
    os.umask(os.umask(0o077) | 0o077)


class HomeBusy(RuntimeError):
    """Another process holds the home's writer lock: the message is one line, naming it."""


class WriterLock:
    """The home's writer lock (see the module's docstring). ``acquire`` takes it or
    raises HomeBusy; ``release`` (or the process's end) gives it back."""

    def __init__(self, home: Home, command: str):
        self.home, self.command = home, command
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        self.home.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home.root / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise HomeBusy(busy_message(self.home, holder)) from None
        info = {"command": self.command, "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict | None:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def busy_message(home: Home, holder: dict | None) -> str:
    if not holder or not holder.get("pid"):
        return f"another seal process is writing to {home.root}: wait for it to finish, or stop it"
    since = dt.datetime.fromtimestamp(holder.get("since") or 0).strftime("%Y-%m-%d %H:%M:%S")
    return (f"`seal {holder.get('command', '?')}` (pid {holder['pid']}, since {since}) is writing to {home.root}: "
            f"wait for it to finish, or stop it")
