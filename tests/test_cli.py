"""The command line starts fast: `seal --help`, `seal CMD --help` and shell completion
import no model library; a bad setting still stops a command that runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

HEAVY = ("torch", "transformers", "peft", "trl")


def imported(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m agent.cli ARGS``; the top-level modules it imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent.cli", *args], cwd=REPO,
                       env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", r.stderr, flags=re.MULTILINE))
    assert names, r.stderr[-2000:]  # -X importtime did report
    return r, {n.split(".")[0] for n in names}


@pytest.mark.parametrize("args", [("--help",), ("learn", "--help"), ("bench", "squad", "--help"),
                                  ("daemon", "run", "--help"), ("history", "--help")])
@pytest.mark.process
def test_help_imports_no_model_library(args, tmp_path):
    r, mods = imported("--home", str(tmp_path), *args)
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr
    assert mods.isdisjoint(HEAVY), sorted(mods & set(HEAVY))


@pytest.mark.process
def test_completion_imports_no_model_library(tmp_path):
    env = {"_SEAL_COMPLETE": "bash_complete", "COMP_WORDS": "seal bench s", "COMP_CWORD": "2"}
    r, mods = imported("--home", str(tmp_path), env=env)
    assert "squad" in r.stdout and "speed" in r.stdout, r.stdout + r.stderr
    assert mods.isdisjoint(HEAVY), sorted(mods & set(HEAVY))


@pytest.mark.process
def test_the_check_sees_a_model_library_when_one_is_imported(tmp_path):
    # a command that reads the configuration imports them: the check above can fail
    r, mods = imported("--home", str(tmp_path), "config", "show")
    assert r.returncode == 0, r.stderr
    assert "torch" in mods


@pytest.mark.parametrize("args", [("queue",), ("bench", "show", "nosuch.json"), ("daemon", "status")])
def test_a_bad_setting_stops_every_command_but_not_its_help(seal, args):
    r = seal("--set", "wake.nope=1", *args)
    assert r.exit_code == 1 and r.output.strip().startswith("Error: unknown setting wake.nope"), r.output
    assert len(r.output.strip().splitlines()) == 1
    assert seal("--set", "wake.nope=1", *args, "--help").exit_code == 0


def test_the_old_daemon_heartbeat_setting_names_its_new_key(seal, home):
    (home / "seal.toml").write_text("[daemon]\nheartbeat_s = 5\n", encoding="utf-8")
    r = seal("config", "show")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "daemon.heartbeat_s: renamed to daemon.status_every_s" in r.output
    (home / "seal.toml").write_text("[daemon]\nstatus_every_s = 5\n", encoding="utf-8")
    shown = seal("config", "show").output
    assert re.search(r"^daemon\.status_every_s += 5\.0 ", shown, flags=re.MULTILINE), shown


def test_the_home_and_what_seal_writes_in_it_are_private(seal, home, tmp_path):
    """Other local users cannot read the documents fed to seal: the home is 0700, the
    store and logs 0600, and a home made before with wider rights is narrowed."""
    import stat

    doc = tmp_path / "doc.md"
    doc.write_text("# Velmoor\n\nVelmoor is a small lakeside town on Lake Quillon.\n", encoding="utf-8")
    home.mkdir(mode=0o755, exist_ok=True)
    home.chmod(0o755)
    r = seal("ingest", doc)
    assert r.exit_code == 0, r.output

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(home) == 0o700
    assert mode(home / "store.db") == 0o600
    for p in home.rglob("*"):
        if not p.is_symlink():
            assert mode(p) & 0o077 == 0, p


def test_an_inbox_reason_never_follows_a_planted_symlink(tmp_path):
    from agent.daemon.inbox import Inbox

    inbox = tmp_path / "inbox"
    (inbox / "failed").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("not seal's\n")
    (inbox / "failed" / "bad.pdf.reason.txt").symlink_to(outside)
    (inbox / "bad.pdf").write_bytes(b"%PDF")
    r = Inbox(inbox, settle_s=0).file(inbox / "bad.pdf", "failed", "not a text document")
    assert r.outcome == "failed" and (inbox / "failed" / "bad.pdf").is_file()
    assert outside.read_text() == "not seal's\n"


@pytest.mark.process
def test_make_demo_never_removes_a_folder_it_did_not_make(tmp_path):
    import shutil
    import subprocess

    from tests.helpers import REPO

    if shutil.which("make") is None or not (REPO / ".venv" / ".seal-installed").is_file():
        pytest.skip("needs make and the set-up .venv")
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    r = subprocess.run(["make", "-s", "demo", f"DEMO_HOME={precious}"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "refusing to remove it" in r.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
