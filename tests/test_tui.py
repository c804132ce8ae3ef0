"""`seal tui` in a real terminal: a private tmux server with an 80x24 window runs it;
keys sent with send-keys switch panels, open an adapter's details and go back, and q
quits with status 0 and the terminal's mode (stty) and main screen restored."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bench.views import sample_log
from agent.home import Home
from store import Store
from tests.helpers import REPO, one_adapter

TMUX = shutil.which("tmux")
pytestmark = [pytest.mark.process, pytest.mark.skipif(TMUX is None, reason="tmux is not installed")]


class Term:
    """One tmux session on its own server socket (the user's tmux is never touched)."""

    def __init__(self, sock: Path, width: int, height: int, command: str):
        self.sock = str(sock)
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "seal", command)

    def tmux(self, *args: str) -> str:
        r = subprocess.run([TMUX, "-S", self.sock, "-f", "/dev/null", *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "seal")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "seal", *keys)

    def wait_for(self, text: str, timeout: float = 30.0, gone: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if (text in screen) != gone:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{'still' if gone else 'never'} saw {text!r}; the screen:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.sock, "kill-server"], capture_output=True, timeout=30)


def test_keys_switch_panels_and_q_quits_cleanly(tmp_path):
    home = Home(tmp_path / "home").ensure()
    with Store(home.store_file) as store:
        one_adapter(store)
    sample_log(home.logs / "daemon.log", 50)
    done = tmp_path / "done"
    script = tmp_path / "run.sh"
    script.write_text(
        f"cd {shlex.quote(str(REPO))}\n"
        "export OMP_NUM_THREADS=1 PYTHONPATH=. TERM=xterm-256color\n"
        "before=$(stty -g)\n"
        f"{shlex.quote(sys.executable)} -m agent.cli --home {shlex.quote(str(home.root))} tui --interval 0.5\n"
        "rc=$?\n"
        "after=$(stty -g)\n"
        f'if [ "$before" = "$after" ]; then tty=restored; else tty=changed; fi\n'
        f"echo \"$rc $tty\" > {shlex.quote(str(done))}\n"
        "echo shell prompt is back\n"
        "sleep 60\n"
    )
    term = Term(tmp_path / "tmux.sock", 80, 24, f"sh {shlex.quote(str(script))}")
    try:
        screen = term.wait_for("adapter lineage", timeout=120)  # python, rich and torch take a while to import
        lines = screen.rstrip("\n").split("\n")
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert "seal" in lines[0] and "knowledge-0001" in lines[0]
        assert "1 overview" in screen and "─ daemon ─" in screen and "● v1" in screen

        term.keys("4")
        screen = term.wait_for("─ forgetting matrix ─")
        assert "adapter lineage" not in screen and "avg acc 1.00" in screen
        term.keys("3")
        screen = term.wait_for("─ recent passages ─")
        assert "+0.42★" in screen and "implications" in screen
        term.keys("Tab")
        term.wait_for("─ forgetting matrix ─")

        term.keys("2")
        term.wait_for("─ adapter lineage ─")
        term.keys("Down", "Enter")  # select the active version, open its details
        screen = term.wait_for("wake version 1 of knowledge, active")
        assert "training data: passage #1 Isle of Varn" in screen
        term.keys("Escape")
        term.wait_for("─ adapter lineage ─")

        term.keys("q")
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.read_text().split() == ["0", "restored"]
        screen = term.wait_for("shell prompt is back")
        assert "adapter lineage" not in screen and "1 overview" not in screen  # the main screen is back
    finally:
        term.close()
