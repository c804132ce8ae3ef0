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
