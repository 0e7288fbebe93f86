"""Per-run lock files, so that several workers (processes, machines sharing the folder) can share a study."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive claim on one run, shared through the file system (the protocol: patchbench.study's docstring).

    acquire() never waits: it returns False when a live worker holds the run.
    """

    def __init__(self, path: str | os.PathLike, *, stale_after: float = 600.0):
        self.path = Path(path)
        self.stale_after = stale_after
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> tuple[dict | None, float] | None:
        """(the lock's JSON or None if unreadable, its mtime); None when there is no lock."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text), mtime
        except ValueError:
            return None, mtime  # being written right now, or its writer died mid-write

    def is_stale(self, info: dict | None, mtime: float) -> bool:
        if time.time() - mtime > self.stale_after:
            return True
        return bool(info) and info.get("host") == self.host and not _pid_alive(int(info.get("pid", -1)))

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._remove_if_stale():
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": self.host, "time": time.time()}, f)
            self._start_heartbeat()
            return True
        return False

    def _remove_if_stale(self) -> bool:
        """Remove a stale lock; True when the path is free now. Only one worker may judge at a time
        (a second lock, `.break`), so two workers cannot both remove it, one of them the new holder's."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker that died in these few lines leaves its file; clear it after a while
                if time.time() - breaker.stat().st_mtime > 30:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            return False
        try:
            held = self.holder()
            if held is None:
                return True
            if self.is_stale(*held):
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        interval = max(0.05, min(60.0, self.stale_after / 4))

        def beat():
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._stop.clear()
        self._beat = threading.Thread(target=beat, daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        held = self.holder()
        if held and held[0] and held[0].get("pid") == os.getpid() and held[0].get("host") == self.host:
            self.path.unlink(missing_ok=True)
