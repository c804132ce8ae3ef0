"""Shared fixtures. Fast tests use a tiny random model (TRL's habit: build it from a
config) and a temp-dir home; tests marked ``real_model`` load SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SQUAD = REPO.parent / "shared" / "data" / "squad_dev.json"


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
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent.runtime import Runtime

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Runtime(LlamaForCausalLM(cfg), tokenizer, name="tiny")


@pytest.fixture(scope="session")
def real_runtime():
    """SmolLM2-135M-Instruct, loaded once per test session."""
    from agent.runtime import ModelConfig, Runtime

    return Runtime.load(ModelConfig())
