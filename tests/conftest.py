"""Shared fixtures. Fast tests use a tiny random model (tests.helpers.tiny_llama) and
a temp-dir home; tests marked ``real_model`` load SmolLM2-135M-Instruct. What test
modules share besides fixtures lives in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def seal(home: Path):
    """Run the CLI in-process: ``seal("ingest", path)`` -> click Result."""
    from agent.cli import main

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(main, ["--home", str(home), *map(str, args)], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (cached after the first de-quantisation)."""
    from agent.runtime import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_runtime(tokenizer):
    """A tiny randomly initialised Llama with the real tokenizer: fast, deterministic."""
    from agent.runtime import Runtime
    from tests.helpers import tiny_llama

    return Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")


@pytest.fixture(scope="session")
def real_runtime():
    """SmolLM2-135M-Instruct, loaded once per test session."""
    from agent.runtime import ModelConfig, Runtime

    return Runtime.load(ModelConfig())


@pytest.fixture
def one_thread():
    """Tiny models are thousands of times slower with 2 threads when another process
    keeps the cores busy (OpenMP threads wait for each other): use one while a test runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama and the real tokenizer as an HF folder, for ``seal --model DIR``."""
    from tests.helpers import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
