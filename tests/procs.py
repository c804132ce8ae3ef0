"""Killing a real seal process at a chosen moment (the crash tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_9_when(proc: subprocess.Popen, marker: str, timeout_s: float = 120) -> None:
    """Read the process's stderr (its -v log) until a line contains ``marker``, then
    SIGKILL it and wait; fails the test if the marker never came."""
    seen = []
    try:
        deadline = time.monotonic() + timeout_s
        for line in proc.stderr:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        assert any(marker in line for line in seen), "".join(seen)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
