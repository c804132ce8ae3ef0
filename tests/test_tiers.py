"""The test tiers hold: every test that starts a real process carries the ``process``
marker (so `make test-fast` leaves it out), and test modules share code only through
tests/helpers.py and the conftest fixtures. Read from the sources with ast."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# What starts a process: the subprocess module, Popen, and the helpers that run the CLI.
SPAWNERS = {"subprocess", "Popen", "run_cli", "start_cli", "seal_argv", "kill_9_when"}


def _calls(node: ast.AST) -> set[str]:
    """The names a piece of code calls: ``f(...)`` gives f, ``a.b.f(...)`` gives a and f."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            func = n.func
            if isinstance(func, ast.Attribute):
                names.add(func.attr)
                while isinstance(func, ast.Attribute):
                    func = func.value
            if isinstance(func, ast.Name):
                names.add(func.id)
    return names


def _has_mark(node: ast.AST | None, mark: str) -> bool:
    """Whether ``node`` (a decorator, or a pytestmark value) names ``pytest.mark.<mark>``."""
    return node is not None and any(
        isinstance(n, ast.Attribute) and n.attr == mark and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"
        for n in ast.walk(node))


def unmarked_process_tests(source: str) -> list[str]:
    """The test functions of a module that start a process, directly or through a
    function or class of the module, and lack the ``process`` marker."""
    tree = ast.parse(source)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    calls = {name: _calls(node) for name, node in defs.items()}
    spawning = set()
    while True:  # a def spawns if it calls a spawner or a def that spawns
        more = {name for name, called in calls.items() if called & (SPAWNERS | spawning)} - spawning
        if not more:
            break
        spawning |= more
    module_mark = any(_has_mark(n.value, "process") for n in tree.body
                      if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets))
    tests = {name: node for name, node in defs.items() if name.startswith("test") and isinstance(node, ast.FunctionDef)}
    return [name for name, node in tests.items()
            if (name in spawning or {a.arg for a in node.args.args} & spawning)  # or a fixture of the module that does
            and not module_mark and not any(_has_mark(d, "process") for d in node.decorator_list)]


def test_the_check_finds_an_unmarked_process_test():
    source = (
        "import subprocess\nimport pytest\n"
        "from tests.helpers import run_cli\n"
        "def _through(cmd):\n    return run_cli(cmd)\n"
        "class Term:\n    def send(self):\n        subprocess.run(['tmux'])\n"
        "def test_direct():\n    subprocess.Popen(['seal'])\n"
        "def test_helper():\n    _through(['seal'])\n"
        "def test_class():\n    Term().send()\n"
        "@pytest.mark.process\ndef test_marked():\n    subprocess.run(['seal'])\n"
        "def test_in_process(seal):\n    seal('queue')\n"
        "@pytest.fixture\ndef daemon():\n    yield subprocess.Popen(['seal', 'daemon', 'run'])\n"
        "def test_fixture(daemon):\n    assert daemon\n"
    )
    assert unmarked_process_tests(source) == ["test_direct", "test_helper", "test_class", "test_fixture"]
    assert unmarked_process_tests("import pytest\npytestmark = [pytest.mark.process]\n" + source) == []


def test_every_test_that_starts_a_process_is_marked():
    unmarked = {path.name: found for path in sorted(TESTS.glob("test_*.py"))
                if (found := unmarked_process_tests(path.read_text(encoding="utf-8")))}
    assert unmarked == {}, "add @pytest.mark.process to these (they start a real process)"


def test_test_modules_import_only_the_helpers_from_tests():
    imported = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] == "tests" and name != "tests.helpers":
                    imported.setdefault(path.name, []).append(name)
    assert imported == {}, "share code through tests/helpers.py (or a conftest fixture)"
